"""mechconn.paths against the definitions (Bernstein form, segment interpolation)."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mechconn import paths


def random_tree(seed):
  rng = np.random.default_rng(seed)
  return {"dense": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
          "scale": jnp.asarray(rng.normal(size=()), jnp.float32)}


def np_leaf(tree):
  return np.asarray(tree["dense"]["kernel"], np.float64)


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_linear_is_convex_combination(t):
  a, b = random_tree(0), random_tree(1)
  out = paths.linear(a, b, t)
  expected = jax.tree.map(lambda x, y: (1 - t) * x + t * y, a, b)
  chex.assert_trees_all_close(out, expected, rtol=1e-6)


@pytest.mark.parametrize("kind,n", [("linear", 2), ("bezier", 2), ("bezier", 3),
                                    ("bezier", 4), ("polychain", 2), ("polychain", 4)])
def test_endpoints_are_exact(kind, n):
  points = [random_tree(i) for i in range(n)]
  fn = paths.path_fn(kind)
  chex.assert_trees_all_equal(fn(points, 0.0), points[0])
  chex.assert_trees_all_equal(fn(points, 1.0), points[-1])
  jitted = jax.jit(fn)
  chex.assert_trees_all_equal(jitted(points, jnp.float32(0.0)), points[0])
  chex.assert_trees_all_equal(jitted(points, jnp.float32(1.0)), points[-1])


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_bezier_matches_bernstein_formula(degree):
  points = [random_tree(i) for i in range(degree + 1)]
  for t in np.linspace(0, 1, 7):
    expected = sum(math.comb(degree, i) * t**i * (1 - t)**(degree - i) * np_leaf(p)
                   for i, p in enumerate(points))
    np.testing.assert_allclose(np_leaf(paths.bezier(points, t)), expected, rtol=1e-5,
                               atol=1e-6)


def test_quadratic_bezier_by_hand():
  a, m, b = ({"w": jnp.float32(v)} for v in (0.0, 4.0, 2.0))
  # (1-t)^2 0 + 2 t (1-t) 4 + t^2 2 at t = 0.5: 0 + 2 + 0.5.
  assert float(paths.bezier((a, m, b), 0.5)["w"]) == pytest.approx(2.5)


def test_polychain_is_piecewise_linear():
  points = [random_tree(i) for i in range(4)]  # three segments
  for t in np.linspace(0, 1, 13):
    seg = min(int(t * 3), 2)
    local = t * 3 - seg
    expected = (1 - local) * np_leaf(points[seg]) + local * np_leaf(points[seg + 1])
    np.testing.assert_allclose(np_leaf(paths.polychain(points, t)), expected, rtol=1e-5,
                               atol=1e-6)
  # At the joints the chain passes through the inner points.
  np.testing.assert_allclose(np_leaf(paths.polychain(points, 1 / 3)), np_leaf(points[1]),
                             rtol=1e-6)


def test_vmap_over_t_and_grad_through_control_point():
  a, m, b = random_tree(0), random_tree(1), random_tree(2)
  ts = jnp.linspace(0, 1, 5)
  stacked = jax.vmap(lambda t: paths.bezier((a, m, b), t))(ts)
  for i, t in enumerate(np.asarray(ts)):
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[i], stacked),
                                paths.bezier((a, m, b), t), rtol=1e-6)
  # d/d mid of sum(bezier(t)) = 2 t (1 - t) for every element.
  grad = jax.grad(lambda mid: jnp.sum(paths.bezier((a, mid, b), 0.3)["dense"]["kernel"]))(m)
  np.testing.assert_allclose(grad["dense"]["kernel"], 2 * 0.3 * 0.7 * np.ones((3, 4)),
                             rtol=1e-6)


def test_mismatched_shape_names_leaf():
  a = random_tree(0)
  b = random_tree(1)
  b["dense"]["kernel"] = jnp.zeros((3, 5))
  with pytest.raises(ValueError, match=r"\['dense'\]\['kernel'\].*\(3, 4\).*\(3, 5\)"):
    paths.linear(a, b, 0.5)


def test_mismatched_dtype_names_leaf():
  a = random_tree(0)
  b = random_tree(1)
  b["scale"] = b["scale"].astype(jnp.bfloat16)
  with pytest.raises(ValueError, match=r"\['scale'\].*float32.*bfloat16"):
    paths.linear(a, b, 0.5)


def test_mismatched_structure_names_missing_leaf():
  a = random_tree(0)
  b = random_tree(1)
  del b["dense"]["bias"]
  with pytest.raises(ValueError, match=r"only in point 0: \[\"\['dense'\]\['bias'\]\"\]"):
    paths.bezier((a, random_tree(2), b), 0.5)


def test_integer_leaves_pass_through_when_equal_and_raise_otherwise():
  a, b = random_tree(0), random_tree(1)
  a["step"] = jnp.int32(7)
  b["step"] = jnp.int32(7)
  out = paths.linear(a, b, 0.5)
  assert out["step"].dtype == jnp.int32 and int(out["step"]) == 7
  b["step"] = jnp.int32(8)
  with pytest.raises(ValueError, match=r"\['step'\].*int32.*cannot be interpolated"):
    paths.linear(a, b, 0.5)


def test_unknown_kind_and_wrong_point_count():
  with pytest.raises(ValueError, match="valid kinds"):
    paths.path_fn("spline")
  with pytest.raises(ValueError, match="exactly 2 points"):
    paths.path_fn("linear")([random_tree(i) for i in range(3)], 0.5)
