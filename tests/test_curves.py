"""Curve fitting: the gradient reaches the control point through the path, by autodiff."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mechconn import checkpoint
from mechconn import curves
from mechconn import finite
from mechconn import loop
from mechconn import mesh as mesh_lib
from mechconn import paths
from mechconn import step as step_lib
from mechconn.models import get_model


@pytest.fixture(scope="module")
def setup():
  model = get_model("small_cnn", 10, width=4)
  x = jax.random.normal(jax.random.key(0), (16, 8, 8, 3))
  batch = {"image": x, "label": jnp.arange(16) % 10}
  a, m, b = (model.init(jax.random.key(k), x) for k in (1, 2, 3))
  loss_fn = curves.CurveLoss(model.apply, "bezier", a["params"], b["params"], a["batch_stats"])
  return model, batch, a, m, b, loss_fn


def test_gradient_is_the_chain_rule_through_the_bezier_path(setup):
  model, batch, a, m, b, loss_fn = setup
  rng = jax.random.key(7)
  t = jax.random.uniform(rng, (), jnp.float32)
  grads = jax.jit(jax.grad(lambda free: loss_fn(free, {}, batch, rng)[0]))((m["params"],))[0]

  def loss_at(params):  # the loss as a function of the point on the path
    logits, _ = model.apply({"params": params, "batch_stats": a["batch_stats"]}, batch["image"],
                            train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

  theta_t = paths.bezier((a["params"], m["params"], b["params"]), t)
  expected = jax.tree.map(lambda g: 2 * t * (1 - t) * g, jax.jit(jax.grad(loss_at))(theta_t))
  chex.assert_trees_all_close(grads, expected, rtol=2e-4, atol=1e-6)
  _, (_, metrics) = loss_fn((m["params"],), {}, batch, rng)
  np.testing.assert_allclose(metrics["t"], t)


def _loss_at_t(loss_fn, free, batch, t):
  """The curve's loss at a given t (train-mode BatchNorm, as in fitting)."""
  params = paths.bezier(curves.curve_points(loss_fn.start, free, loss_fn.end), t)
  logits, _ = loss_fn.apply_fn({"params": params, "batch_stats": loss_fn.batch_stats},
                               batch["image"], train=True, mutable=["batch_stats"])
  return float(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean())


def test_fitting_lowers_the_midpoint_loss_and_keeps_the_end_points(setup):
  model, batch, a, m, b, loss_fn = setup
  tx = optax.sgd(0.05, momentum=0.9)
  free = curves.init_free_points(a["params"], b["params"], 1, "fresh", [m["params"]])
  state = step_lib.fresh_state(free, tx)
  before = _loss_at_t(loss_fn, state.params, batch, 0.5)
  for _ in range(30):
    state, _ = step_lib.train_step(state, batch, jax.random.key(3), loss_fn=loss_fn, tx=tx)
  assert _loss_at_t(loss_fn, state.params, batch, 0.5) < before - 0.3
  # The end points are not trained: the fitted curve starts and ends at them, bitwise.
  points = curves.curve_points(loss_fn.start, state.params, loss_fn.end)
  chex.assert_trees_all_equal(paths.bezier(points, jnp.float32(0.0)), a["params"])
  chex.assert_trees_all_equal(paths.bezier(points, jnp.float32(1.0)), b["params"])
  assert len(state.params) == 1  # only the free point is in the optimised state


def test_init_free_points():
  a = {"w": jnp.zeros(3)}
  b = {"w": jnp.full(3, 3.0)}
  (mid,) = curves.init_free_points(a, b, 1, "linear")
  np.testing.assert_allclose(mid["w"], 1.5)
  p1, p2 = curves.init_free_points(a, b, 2, "linear")
  np.testing.assert_allclose([p1["w"][0], p2["w"][0]], [1.0, 2.0])
  assert curves.init_free_points(a, b, 1, "fresh", [{"w": jnp.ones(3)}])[0]["w"][0] == 1.0
  with pytest.raises(ValueError, match="needs 1 fresh"):
    curves.init_free_points(a, b, 1, "fresh")
  with pytest.raises(ValueError, match="valid: \\['fresh', 'linear'\\]"):
    curves.init_free_points(a, b, 1, "random")
  with pytest.raises(ValueError, match="shape"):
    curves.init_free_points(a, b, 1, "fresh", [{"w": jnp.ones(4)}])


def test_a_diverging_curve_fit_stops_and_saves_nothing_non_finite(setup, tmp_path):
  model, batch, _, _, _, loss_fn = setup
  tx = optax.sgd(1e8)
  free = (model.init(jax.random.key(9), batch["image"])["params"],)  # the loop donates it

  def init():
    return step_lib.fresh_state(free, tx)

  step = functools.partial(step_lib.train_step, root_key=jax.random.key(0), loss_fn=loss_fn,
                           tx=tx)
  with pytest.raises(finite.NonFiniteError, match=r"diverged at step \d+"):
    loop.train_loop(init, step, lambda s: batch, str(tmp_path),
                    loop.LoopOptions(num_steps=40, log_every=1, checkpoint_every=1,
                                     progress=False),
                    mesh=mesh_lib.data_mesh(jax.devices()[:1]))
  with checkpoint.Checkpointer(str(tmp_path / loop.CHECKPOINT_DIR)) as ckpt:
    assert all(bool(finite.all_finite_jit(ckpt.read(s))) for s in ckpt.all_steps())
