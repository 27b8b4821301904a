"""The training step and loop learn the embedded task and are deterministic."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mechconn import train
from mechconn.data.prototypes import make_prototype_images
from mechconn.models import get_model


@pytest.fixture(scope="module")
def data():
  train_xy = make_prototype_images(1, 2048, image_size=16, noise=0.8)
  test_xy = make_prototype_images(2, 256, image_size=16, noise=0.8)
  return train_xy, test_xy


def test_fit_learns_and_is_deterministic(data):
  (x, y), (xt, yt) = data
  model = get_model("small_cnn", 10, width=8)
  tx = optax.sgd(0.05, momentum=0.9)
  runs = [train.fit(model, tx, x, y, batch_size=64, num_epochs=3, seed=3, progress=False)
          for _ in range(2)]
  (state, history), (state2, _) = runs
  chex.assert_trees_all_equal(state.params, state2.params)
  assert history[-1]["loss"] < history[0]["loss"]
  logits = model.apply(state.variables, jnp.asarray(xt), train=False)
  assert np.mean(np.argmax(logits, -1) == yt) > 0.8  # chance is 0.1
  assert int(state.step) == 3 * (2048 // 64)


def test_train_step_matches_manual_sgd(data):
  (x, y), _ = data
  model = get_model("mlp", 10, hidden=(8,))
  tx = optax.sgd(0.1)
  state = train.create_train_state(model, tx, jax.random.key(0), jnp.asarray(x[:2]))
  params0 = state.params
  batch = {"image": jnp.asarray(x[:16]), "label": jnp.asarray(y[:16])}
  grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, batch["image"]), batch["label"]).mean())(params0)
  expected = jax.tree.map(lambda p, g: p - 0.1 * g, params0, grads)
  new_state, metrics = train.train_step(state, batch, apply_fn=model.apply, tx=tx)
  chex.assert_trees_all_close(new_state.params, expected, rtol=1e-5, atol=1e-6)
  assert int(new_state.step) == 1 and set(metrics) >= {"loss", "accuracy", "grad_norm"}


def test_epoch_permutation_depends_only_on_seed_and_epoch():
  a = train.epoch_permutation(0, 1, 100)
  np.testing.assert_array_equal(a, train.epoch_permutation(0, 1, 100))
  assert not np.array_equal(a, train.epoch_permutation(0, 2, 100))
  assert sorted(a) == list(range(100))
