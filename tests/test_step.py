"""mechconn.step: the pure step, its randomness, the losses, torch-style SGD and the schedules."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mechconn import adapters
from mechconn import evaluation
from mechconn import objectives
from mechconn import step as step_lib
from mechconn.data import sequences
from mechconn.data.prototypes import make_prototype_images
from mechconn.models import CausalLM
from mechconn.models import get_model


def test_the_step_module_imports_only_jax_flax_optax_chex_and_pure_helpers():
  import ast
  import inspect
  tree = ast.parse(inspect.getsource(step_lib))
  roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
           for alias in node.names}
  roots |= {node.module.split(".")[0] for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)}
  assert roots <= {"functools", "flax", "jax", "optax", "chex", "mechconn"}, roots
  mechconn_imports = {node.module for node in ast.walk(tree)
                      if isinstance(node, ast.ImportFrom) and node.module.startswith("mechconn")}
  mechconn_imports |= {f"mechconn.{alias.name}" for node in ast.walk(tree)
                       if isinstance(node, ast.ImportFrom) and node.module == "mechconn"
                       for alias in node.names}
  assert mechconn_imports - {"mechconn"} == {"mechconn.types", "mechconn.trees",
                                             "mechconn.objectives"}


def test_train_step_matches_manual_sgd():
  x, y = make_prototype_images(1, 64, image_size=16, noise=0.8)
  model = get_model("mlp", 10, hidden=(8,))
  tx = optax.sgd(0.1)
  state = step_lib.create_train_state(model, tx, jax.random.key(0), jnp.asarray(x[:2]))
  params0 = state.params
  batch = {"image": jnp.asarray(x[:16]), "label": jnp.asarray(y[:16])}
  grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, batch["image"]), batch["label"]).mean())(params0)
  expected = jax.tree.map(lambda p, g: p - 0.1 * g, params0, grads)
  new_state, metrics = step_lib.train_step(state, batch, jax.random.key(1),
                                        loss_fn=step_lib.ClassificationLoss(model.apply), tx=tx)
  chex.assert_trees_all_close(new_state.params, expected, rtol=1e-5, atol=1e-6)
  assert int(new_state.step) == 1
  assert set(metrics) == {"loss", "accuracy", "grad_norm", "param_norm"}
  np.testing.assert_allclose(metrics["param_norm"], optax.tree.norm(expected), rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-5)


def _noise_loss(params, batch_stats, batch, rng):
  """A loss whose gradient is the step's random draw: params move by -lr * draw."""
  draw = jax.random.normal(rng, params["w"].shape)
  return jnp.sum(params["w"] * draw), (batch_stats, {})


def test_step_randomness_is_fold_in_of_root_key_and_step():
  root = jax.random.key(7)
  tx = optax.sgd(1.0)
  params = {"w": jnp.zeros(3)}
  state = step_lib.fresh_state(params, tx).replace(step=jnp.asarray(5, jnp.int32))
  state, _ = step_lib.train_step(state, {}, root, loss_fn=jax.tree_util.Partial(_noise_loss), tx=tx)
  state, _ = step_lib.train_step(state, {}, root, loss_fn=jax.tree_util.Partial(_noise_loss), tx=tx)
  expected = -(jax.random.normal(jax.random.fold_in(root, 5), (3,)) +
               jax.random.normal(jax.random.fold_in(root, 6), (3,)))
  np.testing.assert_allclose(state.params["w"], expected, rtol=1e-6)


def test_sgd_is_torch_sgd_with_weight_decay_in_the_gradient():
  lr, mu, wd = 0.1, 0.9, 0.01
  tx = step_lib.sgd(lr, momentum=mu, weight_decay=wd)
  p = jnp.asarray([1.0, -2.0])
  state = tx.init(p)
  grads = [jnp.asarray([0.5, 0.25]), jnp.asarray([-1.0, 2.0])]
  p_ref, buf = np.array([1.0, -2.0]), np.zeros(2)
  for g in grads:  # torch.optim.SGD: d = g + wd p; buf = mu buf + d; p -= lr buf
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
    buf = mu * buf + (np.asarray(g) + wd * p_ref)
    p_ref = p_ref - lr * buf
  np.testing.assert_allclose(p, p_ref, rtol=1e-6)


def test_step_schedule_decays_every_k_epochs():
  schedule = step_lib.learning_rate_schedule("step", 0.1, total_steps=100 * 10, steps_per_epoch=10,
                                          decay_every_epochs=40, decay_factor=0.1)
  for step, expected in [(0, 0.1), (399, 0.1), (400, 0.01), (799, 0.01), (800, 0.001),
                         (999, 0.001)]:
    np.testing.assert_allclose(schedule(step), expected, rtol=1e-6)
  cosine = step_lib.learning_rate_schedule("cosine", 0.2, total_steps=10)
  np.testing.assert_allclose([cosine(0), cosine(5), cosine(10)], [0.2, 0.1, 0.0], atol=1e-7)
  with pytest.raises(ValueError, match="valid schedules"):
    step_lib.learning_rate_schedule("linear", 0.1, total_steps=10)


def test_warmup_cosine_rises_linearly_then_decays_to_zero():
  schedule = step_lib.learning_rate_schedule("warmup_cosine", 0.4, total_steps=110,
                                             warmup_steps=10)
  # Linear from 0 to the peak over 10 steps, then half a cosine over the other 100.
  np.testing.assert_allclose([schedule(s) for s in (0, 5, 10, 60, 110)],
                             [0.0, 0.2, 0.4, 0.2, 0.0], atol=1e-7)
  with pytest.raises(ValueError, match="warmup_steps=10, total_steps=10"):
    step_lib.learning_rate_schedule("warmup_cosine", 0.4, total_steps=10, warmup_steps=10)


def test_next_token_loss_is_the_masked_cross_entropy_of_the_next_tokens():
  model = CausalLM(sequences.VOCAB_SIZE, sequences.SEQ_LEN, width=8, depth=1, num_heads=2)
  batch = {k: jnp.asarray(v) for k, v in sequences.recall_sequences(6, seed=0).items()}
  params = model.init(jax.random.key(0), batch["tokens"])["params"]
  loss_fn = step_lib.NextTokenLoss(adapters.without_train(model.apply))
  loss, (batch_stats, metrics) = jax.jit(loss_fn)(params, {}, batch, jax.random.key(1))
  # A plain loop over the rows and positions whose next token is a target.
  logits = np.asarray(jax.jit(model.apply)({"params": params}, batch["tokens"][:, :-1]),
                      np.float64)
  tokens, mask = np.asarray(batch["tokens"]), np.asarray(batch["mask"])
  terms = [(np.log(np.exp(logits[b, i]).sum()) - logits[b, i, tokens[b, i + 1]],
            logits[b, i].argmax() == tokens[b, i + 1])
           for b in range(6) for i in range(sequences.SEQ_LEN - 1) if mask[b, i + 1]]
  assert len(terms) == int(mask[:, 1:].sum()) < mask.size  # the prompt and padding count 0
  np.testing.assert_allclose(loss, np.mean([t[0] for t in terms]), rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], np.mean([t[1] for t in terms]), rtol=1e-6)
  assert batch_stats == {}
  # The evaluation's next-token objective measures the same numbers.
  stacked = jax.tree.map(lambda x: x[None], batch)
  means = jax.jit(lambda p, b: evaluation.mean_metrics(
      loss_fn.apply_fn, {"params": p}, b, objectives.next_token()))(params, stacked)
  np.testing.assert_allclose(means["loss"], loss, rtol=1e-6)
  np.testing.assert_allclose(means["accuracy"], metrics["accuracy"], rtol=1e-6)



def test_one_training_step_golden_values():
  """One step of a fixed tiny MLP on a fixed batch: the loss and the updated parameters'
  checksums, recorded once (a change in any number the step computes shows here)."""
  model = get_model("mlp", 3, hidden=(5,))
  images = jax.random.normal(jax.random.key(1), (6, 2, 2, 1))
  labels = jnp.array([0, 1, 2, 2, 1, 0])
  tx = step_lib.sgd(0.1, momentum=0.9, weight_decay=5e-4)
  state = step_lib.create_train_state(model, tx, jax.random.key(0), images[:2])
  p0 = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(state.params))
  state, metrics = step_lib.train_step(state, {"image": images, "label": labels},
                                       jax.random.key(2),
                                       loss_fn=step_lib.ClassificationLoss(model.apply), tx=tx)
  # The loss by its definition, in float64: mean of -log softmax(logits)[label].
  x = np.asarray(images, np.float64).reshape(6, -1)
  hidden = np.maximum(x @ p0["Dense_0"]["kernel"] + p0["Dense_0"]["bias"], 0)
  logits = hidden @ p0["head"]["kernel"] + p0["head"]["bias"]
  log_z = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
  cross_entropy = np.mean(log_z - logits[np.arange(6), np.asarray(labels)])
  np.testing.assert_allclose(metrics["loss"], cross_entropy, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], 1.131224, rtol=1e-5)
  assert float(metrics["accuracy"]) == 0.5
  leaves = jax.tree.leaves(state.params)
  np.testing.assert_allclose(sum(float(jnp.sum(x)) for x in leaves), -1.798970, rtol=1e-5)
  np.testing.assert_allclose(sum(float(jnp.sum(x * x)) for x in leaves), 8.590300, rtol=1e-5)
  assert int(state.step) == 1
