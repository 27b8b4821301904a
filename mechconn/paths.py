"""Paths between parameter pytrees: linear, Bezier (any degree), polygonal chain.

Every path is tree maths over matching pytrees, never per-layer code, and is
usable under `jit`, `vmap` (over t) and `grad` (with respect to the points).
t = 0 returns the first point and t = 1 the last, exactly.

Leaf rule: floating-point leaves are interpolated. Integer and boolean leaves
(step counters, masks) cannot be interpolated; they are passed through only
when they are equal in every point (checked when the values are concrete),
and the value of the first point is returned. Anything else raises.

Example:
  >>> theta_t = linear(params_a, params_b, 0.25)       # 0.75 a + 0.25 b
  >>> theta_t = bezier((params_a, params_mid, params_b), 0.5)
  >>> fn = path_fn("bezier"); theta_t = fn((params_a, params_mid, params_b), t)
"""

from collections.abc import Callable, Sequence
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from mechconn.types import Params, PathFn


def _describe(leaf: Any) -> str:
  shape = getattr(leaf, "shape", ())
  dtype = getattr(leaf, "dtype", type(leaf).__name__)
  return f"shape={tuple(shape)} dtype={dtype}"


def check_matching(points: Sequence[Params]) -> None:
  """Raises ValueError naming the first leaf where the pytrees disagree.

  Args:
    points: pytrees that must share structure, leaf shapes and leaf dtypes.
  """
  if len(points) < 2:
    raise ValueError(f"A path needs at least 2 points, got {len(points)}.")
  ref_leaves, ref_def = jax.tree_util.tree_flatten_with_path(points[0])
  for i, tree in enumerate(points[1:], start=1):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    if treedef != ref_def:
      ref_paths = [jax.tree_util.keystr(p) for p, _ in ref_leaves]
      paths = [jax.tree_util.keystr(p) for p, _ in leaves]
      only_ref = sorted(set(ref_paths) - set(paths))
      only_new = sorted(set(paths) - set(ref_paths))
      raise ValueError(
          f"Point {i} has a different tree structure from point 0: leaves "
          f"only in point 0: {only_ref[:5]}; only in point {i}: {only_new[:5]}"
          + ("" if only_ref or only_new else f"; structures {ref_def} vs {treedef}"))
    for (path, a), (_, b) in zip(ref_leaves, leaves):
      if jnp.shape(a) != jnp.shape(b) or jnp.result_type(a) != jnp.result_type(b):
        raise ValueError(
            f"Leaf {jax.tree_util.keystr(path)} differs between point 0 "
            f"({_describe(a)}) and point {i} ({_describe(b)}).")


def _is_float(leaf: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def _combine(points: Sequence[Params], weights: Callable[[Any], Sequence[Any]]) -> Params:
  """sum_i w_i * point_i leafwise; non-float leaves pass through by the rule above."""
  check_matching(points)

  def combine_leaf(path, *values):
    if not _is_float(values[0]):
      _check_passthrough(path, values)
      return values[0]
    w = weights(jnp.result_type(values[0]))
    acc = w[0] * values[0]
    for w_i, v in zip(w[1:], values[1:]):
      acc = acc + w_i * v
    return acc.astype(jnp.result_type(values[0]))

  return jax.tree_util.tree_map_with_path(combine_leaf, *points)


def _check_passthrough(path, values) -> None:
  concrete = [v for v in values if not isinstance(v, jax.core.Tracer)]
  if len(concrete) == len(values):
    first = np.asarray(values[0])
    for i, v in enumerate(values[1:], start=1):
      if not np.array_equal(first, np.asarray(v)):
        raise ValueError(
            f"Leaf {jax.tree_util.keystr(path)} has non-float dtype "
            f"{jnp.result_type(values[0])} and differs between point 0 and "
            f"point {i}; integer leaves cannot be interpolated. Drop it from the "
            "tree or make it equal in every point.")


def combination(points: Sequence[Params], weights: chex.Array) -> Params:
  """sum_i weights[i] * points[i], leafwise: a point of the simplex of `points`.

  Args:
    points: N matching pytrees (checked).
    weights: [N] (may be traced); on the simplex (non-negative, summing to 1)
      for a point between the models, e.g. the merged model's 1 / N each.
  """
  n = len(points)
  return _combine(tuple(points), lambda dt: [jnp.asarray(weights, dt)[i] for i in range(n)])


def linear(theta_a: Params, theta_b: Params, t: chex.Numeric) -> Params:
  """The linear path (1 - t) * theta_a + t * theta_b.

  Args:
    theta_a: the model at t = 0.
    theta_b: the model at t = 1; same structure, shapes and dtypes.
    t: a scalar in [0, 1] (may be traced).

  Returns:
    A pytree like theta_a; exactly theta_a at t = 0 and theta_b at t = 1.
  """
  return _combine((theta_a, theta_b), lambda dt: (1 - jnp.asarray(t, dt), jnp.asarray(t, dt)))


def bernstein_weights(degree: int, t: chex.Numeric, dtype=jnp.float32) -> list[jax.Array]:
  """b_{i,n}(t) = C(n, i) t^i (1 - t)^(n - i) for i = 0..n."""
  t = jnp.asarray(t, dtype)
  return [math.comb(degree, i) * t**i * (1 - t) ** (degree - i) for i in range(degree + 1)]


def bezier(control_points: Sequence[Params], t: chex.Numeric) -> Params:
  """The Bezier curve sum_i C(n, i) t^i (1 - t)^(n - i) theta_i of degree n.

  Args:
    control_points: (theta_0, ..., theta_n), n >= 1; theta_0 is the model at
      t = 0 and theta_n at t = 1. A quadratic curve is (theta_a, theta_mid,
      theta_b); degree 1 is the linear path.
    t: a scalar in [0, 1].

  Returns:
    The point of the curve at t; exactly theta_0 at t = 0, theta_n at t = 1
    (the powers 0**0 = 1 and 0**k = 0 are exact in floating point).
  """
  degree = len(control_points) - 1
  return _combine(tuple(control_points), lambda dt: bernstein_weights(degree, t, dt))


def polychain_weights(num_points: int, t: chex.Numeric, dtype=jnp.float32) -> list[jax.Array]:
  """Hat-function weights of a polygonal chain with segments of equal t length."""
  t = jnp.asarray(t, dtype)
  num_segments = num_points - 1
  s = t * num_segments  # position along the chain in segment units, in [0, n]
  return [jnp.maximum(0, 1 - jnp.abs(s - i)) for i in range(num_points)]


def polychain(points: Sequence[Params], t: chex.Numeric) -> Params:
  """Piecewise-linear path through points, t spread evenly over the segments.

  With n + 1 points, segment i covers t in [i / n, (i + 1) / n] and is the
  linear path between points i and i + 1. Written with hat-function weights
  (w_i(t) = max(0, 1 - |n t - i|)) so it is one formula under vmap.

  Args:
    points: (theta_0, ..., theta_n), n >= 1; theta_0 at t = 0, theta_n at t = 1.
    t: a scalar in [0, 1].
  """
  n = len(points)
  return _combine(tuple(points), lambda dt: polychain_weights(n, t, dt))


_PATHS: dict[str, PathFn] = {
    "linear": lambda points, t: linear(*_exactly(points, 2, "linear"), t),
    "bezier": bezier,
    "polychain": polychain,
}


def _exactly(points, n, kind):
  if len(points) != n:
    raise ValueError(f"A {kind} path takes exactly {n} points, got {len(points)}.")
  return points


def path_fn(kind: str) -> PathFn:
  """The path function `fn(points, t)` of a kind: 'linear', 'bezier' or 'polychain'."""
  if kind not in _PATHS:
    raise ValueError(f"Unknown path kind {kind!r}; valid kinds: {sorted(_PATHS)}.")
  return _PATHS[kind]
