"""Fine-tuning methods: CBFT's gradients and losses by definition; each method lowers its objective."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mechconn import finetune
from mechconn import finite
from mechconn import loop
from mechconn import mesh as mesh_lib
from mechconn import paths
from mechconn import step as step_lib
from mechconn import timing
from mechconn.models import get_model


@pytest.fixture(scope="module")
def setup():
  model = get_model("small_cnn", 10, width=4)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(32, 8, 8, 3)).astype(np.float32)
  labels = (np.arange(32) % 10).astype(np.int32)
  reference = model.init(jax.random.key(1), jnp.asarray(images))
  theta = model.init(jax.random.key(2), jnp.asarray(images))
  return model, images, labels, reference, theta


def test_barrier_gradient_is_one_minus_t_times_the_gradient_at_the_point(setup):
  model, images, labels, reference, theta = setup
  loss = finetune.CBFTLoss(model.apply, reference["params"], 10)
  t = jnp.float32(0.3)
  grads = jax.jit(jax.grad(lambda p: loss.barrier(p, theta["batch_stats"], images, labels,
                                                   t)[0]))(theta["params"])
  point = paths.linear(theta["params"], reference["params"], t)

  def at_point(q):
    return loss.barrier_at(q, theta["batch_stats"], images, labels)

  expected = jax.tree.map(lambda g: (1 - t) * g, jax.jit(jax.grad(at_point))(point))
  chex.assert_trees_all_close(grads, expected, rtol=2e-4, atol=1e-7)


def test_invariance_loss_by_definition():
  rng = np.random.default_rng(3)
  z = rng.normal(size=(12, 5)).astype(np.float32)
  y = np.array([0, 1, 2] * 4)
  assert float(finetune.invariance_loss(z, y, 3.0 * z, y, 4)) == pytest.approx(0.0, abs=1e-6)
  z_cue = rng.normal(size=(8, 5)).astype(np.float32)
  y_cue = np.array([0, 1, 3, 3, 0, 1, 3, 0])
  expected, k = 0.0, 0
  for c in range(4):  # classes in both batches: 0 and 1
    if (y == c).any() and (y_cue == c).any():
      a, b = z[y == c].mean(0), z_cue[y_cue == c].mean(0)
      expected += np.sum((a / np.linalg.norm(a) - b / np.linalg.norm(b)) ** 2)
      k += 1
  assert k == 2
  np.testing.assert_allclose(finetune.invariance_loss(z, y, z_cue, y_cue, 4), expected / k,
                             rtol=1e-5)


def test_invariance_loss_gradient_is_finite_when_a_class_mean_is_zero():
  # Dead ReLUs give all-zero features; the norm's derivative at 0 used to make the
  # gradient NaN (and CBFT's parameters with it), silently.
  z = np.zeros((6, 5), np.float32)
  z_cue = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
  y = np.array([0, 1, 2, 0, 1, 2])
  grads = jax.grad(lambda a, b: finetune.invariance_loss(a, y, b, y, 3), argnums=(0, 1))(
      jnp.asarray(z), jnp.asarray(z_cue))
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
  # By definition a zero mean normalises to zero: each class contributes |unit vector|^2 = 1.
  assert float(finetune.invariance_loss(z, y, z_cue, y, 3)) == pytest.approx(1.0, rel=1e-6)
  # A class absent from a batch (its mean is the zero vector, masked out of the loss)
  # made the gradient NaN too: 0 x NaN. At CIFAR-100 with batch 256 that is nearly
  # every batch.
  rng = np.random.default_rng(1)
  a, b = (jnp.asarray(rng.normal(size=(8, 5)).astype(np.float32)) for _ in range(2))
  y_a, y_b = np.array([0, 1, 2, 3] * 2), np.array([0, 1, 2, 0] * 2)  # class 3 not in b
  grads = jax.grad(lambda u, v: finetune.invariance_loss(u, y_a, v, y_b, 4), argnums=(0, 1))(a, b)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_t_distributions_stay_in_the_middle_half():
  keys = jax.random.split(jax.random.key(0), 2000)
  for dist in finetune.T_DISTRIBUTIONS:
    ts = jax.vmap(lambda k: finetune.sample_t(k, dist))(keys)
    assert float(ts.min()) >= 0.25 and float(ts.max()) <= 0.75
  clipped = jax.vmap(lambda k: finetune.sample_t(k, "clip"))(keys)
  assert 0.5 < float(jnp.mean(clipped == 0.75)) + float(jnp.mean(clipped == 0.25)) < 0.75
  with pytest.raises(ValueError, match="valid"):
    finetune.sample_t(keys[0], "uniform")


def test_cbft_step_lowers_both_objectives(setup):
  model, images, labels, reference, theta = setup
  loss = finetune.CBFTLoss(model.apply, reference["params"], 10, margin=1.0)
  tx = optax.sgd(0.02, momentum=0.9)
  state = step_lib.fresh_state(theta["params"], tx, theta["batch_stats"])
  batch = {"clean_image": images[:16], "clean_label": labels[:16],
           "cue_image": images[16:], "cue_label": labels[16:]}
  t = jnp.float32(0.5)

  def objectives(s):
    barrier = loss.barrier(s.params, s.batch_stats, batch["cue_image"], batch["cue_label"], t)[0]
    clean = loss.clean(s.params, s.batch_stats, batch, 1.0)[0]
    return float(barrier), float(clean)

  before = objectives(state)
  for _ in range(15):
    state, metrics = finetune.cbft_step(state, batch, jax.random.key(0), loss_fn=loss, tx=tx,
                                        warmup_steps=5)
  after = objectives(state)
  assert after[0] < before[0] and after[1] < before[1]
  assert set(metrics) >= {"loss", "barrier_loss", "clean_ce", "invariance", "t"}


def test_cbft_without_the_barrier_loss_is_the_clean_step_alone(setup):
  """barrier_loss=False (the C11 ablation): one optimiser step on the clean objective, exactly."""
  model, images, labels, reference, _ = setup
  theta = model.init(jax.random.key(5), jnp.asarray(images))  # the fixture's may be donated
  loss = finetune.CBFTLoss(model.apply, reference["params"], 10, barrier_loss=False)
  tx = optax.sgd(0.02, momentum=0.9)
  state = step_lib.fresh_state(theta["params"], tx, theta["batch_stats"])
  batch = {"clean_image": images[:16], "clean_label": labels[:16],
           "cue_image": images[16:], "cue_label": labels[16:]}
  copy = lambda: jax.tree.map(jnp.copy, state)  # cbft_step donates its state
  new, metrics = finetune.cbft_step(copy(), batch, jax.random.key(0), loss_fn=loss, tx=tx)
  (_, (stats, _)), grads = jax.value_and_grad(loss.clean, has_aux=True)(
      state.params, state.batch_stats, batch, 1.0)
  updates, _ = tx.update(grads, state.opt_state, state.params)
  chex.assert_trees_all_close(new.params, optax.apply_updates(state.params, updates),
                              rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(new.batch_stats, stats, rtol=1e-6)
  assert float(metrics["barrier_loss"]) == 0.0
  with_barrier, _ = finetune.cbft_step(
      copy(), batch, jax.random.key(0), tx=tx,
      loss_fn=finetune.CBFTLoss(model.apply, reference["params"], 10))
  assert not np.allclose(jax.tree.leaves(with_barrier.params)[0], jax.tree.leaves(new.params)[0])


def test_lp_leaves_the_backbone_bitwise_and_lowers_its_loss(setup):
  model, images, labels, reference, theta = setup
  before = jax.tree.map(np.array, reference)
  feats = finetune.extract_features(model.apply, reference, images, batch_size=8)
  head = finetune.fit_head(feats, labels, 10, epochs=30, learning_rate=0.5, batch_size=16,
                           seed=0)
  new_params = finetune.with_head(reference["params"], head)
  for name in reference["params"]:
    if name != "head":
      chex.assert_trees_all_equal(new_params[name], before["params"][name])
  chex.assert_trees_all_equal(reference, before)  # nothing was modified in place
  loss = lambda h: float(finetune.HeadLoss()(h, {}, {"feature": feats, "label": labels}, None)[0])
  assert loss(head) < 0.7 * loss(finetune.fresh_head(jax.random.key(0), feats.shape[1], 10))
  logits = model.apply({"params": new_params, "batch_stats": reference["batch_stats"]}, images)
  np.testing.assert_allclose(logits, feats @ head["kernel"] + head["bias"][None, :], rtol=1e-4,
                             atol=1e-5)


def test_dfr_head_solves_its_regularised_problem(setup):
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(60, 6)).astype(np.float32) * 3 + 1
  labels = (np.arange(60) % 3).astype(np.int32)
  feats[:, 0] += 2.0 * labels  # a separable direction
  head = finetune.fit_dfr_head(feats, labels, 3, l2=0.1)
  std = (feats - feats.mean(0)) / (feats.std(0) + 1e-6)
  ce = lambda k, b: optax.softmax_cross_entropy_with_integer_labels(
      jnp.asarray(std) @ k + b[None, :], labels).mean() + 0.05 * jnp.sum(k**2)
  # The head's standardised-space parameters are a stationary point of the objective.
  k_std = head["kernel"] * (feats.std(0) + 1e-6)[:, None]
  b_std = head["bias"] + jnp.asarray(feats.mean(0)) @ head["kernel"]
  gk, gb = jax.grad(ce, (0, 1))(k_std, b_std)
  assert float(jnp.abs(gk).max()) < 1e-3 and float(jnp.abs(gb).max()) < 1e-3
  assert float(ce(k_std, b_std)) < float(ce(jnp.zeros((6, 3)), jnp.zeros(3)))
  idx = finetune.balanced_subset(np.array([0] * 5 + [1] * 2 + [2] * 9), 3, seed=0)
  assert np.bincount(np.array([0] * 5 + [1] * 2 + [2] * 9)[idx]).tolist() == [2, 2, 2]



def test_head_fits_compile_once_for_every_seed():
  """A study fits a head per seed: the second fit reuses the first's compiled programs (the
  L-BFGS step takes the features as arguments; the LP optimiser is one object per recipe)."""
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(57, 5)).astype(np.float32)  # shapes no other test compiles
  labels = (np.arange(57) % 3).astype(np.int32)
  compiled = []
  for seed in (0, 1):
    with timing.recording() as clock:
      dfr = finetune.fit_dfr_head(feats[::-1] if seed else feats, labels, 3, l2=0.37)
      lp = finetune.fit_head(feats, labels, 3, epochs=2, learning_rate=0.07, batch_size=19,
                             seed=seed)
    compiled.append(dict(clock.compiled_functions))
    assert np.isfinite(np.asarray(dfr["kernel"])).all() and lp["kernel"].shape == (5, 3)
  assert "jit(_dfr_step)" in compiled[0] and "jit(train_step)" in compiled[0]
  assert "jit(_dfr_step)" not in compiled[1] and "jit(train_step)" not in compiled[1]
  assert step_lib.sgd_cosine(0.07, 6, momentum=0.9, weight_decay=0.0) is step_lib.sgd_cosine(
      0.07, 6, momentum=0.9, weight_decay=0.0)

def test_unknown_method_lists_the_valid_ones():
  with pytest.raises(ValueError, match=r"valid methods: \['naive', 'lp', 'lp_ft', 'dfr', 'cbft', "
                                       r"'scratch'\]"):
    finetune.check_method("ft")
  method = finetune.check_method("cbft")
  assert method is finetune.METHODS["cbft"]
  assert (method.head, method.step, method.sections) == ("none", "cbft", ("cbft",))
  with pytest.raises(ValueError, match=r"head='probe'.*one of \['none', 'lp', 'dfr', 'init'\]"):
    finetune.Method(head="probe", step="classification", sections=())


def test_cbft_and_heads_stop_on_non_finite_numbers(setup, tmp_path):
  model, images, labels, _, _ = setup
  # Fresh variables: steps donate their state, and other tests share the fixture's.
  reference, theta = (model.init(jax.random.key(k), jnp.asarray(images)) for k in (11, 12))
  loss = finetune.CBFTLoss(model.apply, reference["params"], 10)
  tx = optax.sgd(0.02, momentum=0.9)
  cue = np.array(images[16:])
  cue[3, 0, 0, 0] = np.nan  # one NaN pixel in the cue batch of the barrier step
  batch = {"clean_image": images[:16], "clean_label": labels[:16], "cue_image": cue,
           "cue_label": labels[16:]}

  def init():
    return step_lib.fresh_state(theta["params"], tx, theta["batch_stats"])

  step = functools.partial(finetune.cbft_step, root_key=jax.random.key(0), loss_fn=loss, tx=tx)
  with pytest.raises(finite.NonFiniteError, match=r"diverged at step 1 .*param_norm"):
    loop.train_loop(init, step, lambda s: batch, str(tmp_path),
                    loop.LoopOptions(num_steps=4, log_every=2, progress=False),
                    mesh=mesh_lib.data_mesh(jax.devices()[:1]))
  feats = finetune.extract_features(model.apply, reference, images, batch_size=8)
  feats[5, 2] = np.inf
  with pytest.raises(finite.NonFiniteError, match=r"fit_head: the features hold NaN or infinity "
                                                  r"in 1 of 32 examples"):
    finetune.fit_head(feats, labels, 10, epochs=2, learning_rate=0.5, batch_size=16, seed=0)
  with pytest.raises(finite.NonFiniteError, match="fit_dfr_head: the features"):
    finetune.fit_dfr_head(feats, labels, 10)
  clean = np.nan_to_num(feats, posinf=0.0)
  with pytest.raises(ValueError, match=r"fit_head: labels must be 32 integers"):
    finetune.fit_head(clean, labels[:-1], 10, epochs=1, learning_rate=0.5, batch_size=16, seed=0)
  with pytest.raises(ValueError, match=r"fit_dfr_head: labels must be in \[0, 10\), got \[0, 12\]"):
    finetune.fit_dfr_head(clean, np.where(labels == 9, 12, labels), 10)
  with pytest.raises(finite.NonFiniteError, match=r"diverged at step \d+"):
    finetune.fit_head(np.nan_to_num(feats, posinf=0.0), labels, 10, epochs=3,
                      learning_rate=1e30, batch_size=16, seed=0)
