"""path_curvature against dense Hessians computed in a plain loop over t."""

import functools

import flax.linen as nn
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mechconn import finite
from mechconn.data.batching import stack_batches
from mechconn.diagnostics import curvature

TS = np.linspace(0, 1, 3)
NUM_PROBES = 16


class TinyMLP(nn.Module):
  """4 -> 5 (tanh) -> 3: 43 parameters."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(3, name="out")(jnp.tanh(nn.Dense(5, name="hidden")(x)))


class TinyConvBN(nn.Module):
  """3x3 conv (2 channels, no bias) -> BatchNorm -> tanh -> mean -> dense: 31 parameters."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Conv(2, (3, 3), padding="VALID", use_bias=False, name="conv")(x)
    h = nn.BatchNorm(use_running_average=not train, name="bn")(h)
    return nn.Dense(3, name="head")(jnp.tanh(h).mean(axis=(1, 2)))


def _data(shape, n, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, *shape)).astype(np.float32)
  return x, rng.integers(0, 3, size=n).astype(np.int32)


@pytest.fixture(scope="module")
def mlp():
  model = TinyMLP()
  x, y = _data((4,), 20, 0)
  points = tuple(model.init(jax.random.key(i), x[:1])["params"] for i in (0, 1))
  return model, points, x, y, stack_batches(x, y, 8)  # 3 batches, the last 4 real examples


@pytest.fixture(scope="module")
def conv():
  model = TinyConvBN()
  x, y = _data((4, 4, 2), 20, 1)
  x = 3.0 * x + 2.0  # far from the stored (initial) statistics: mean 0, variance 1
  points = tuple(model.init(jax.random.key(i), x[:1])["params"] for i in (2, 3))
  bn_x, bn_y = _data((4, 4, 2), 24, 2)
  bn_x = 3.0 * bn_x + 2.0
  return (model, points, x, y, stack_batches(x, y, 8),
          stack_batches(bn_x, bn_y, 8, drop_remainder=True))


# --- The reference: dense Hessians, one t at a time. ---------------------------------


def _at(points, t):
  return jax.tree.map(lambda a, b: (1 - t) * a + t * b, *points)


def _conv_stats(params, bn_images):
  """BatchNorm's statistics by hand: per-batch mean and biased variance, averaged."""
  conv = nn.Conv(2, (3, 3), padding="VALID", use_bias=False)
  h = [conv.apply({"params": params["conv"]}, x) for x in bn_images]
  return {"bn": {"mean": np.mean([v.mean(axis=(0, 1, 2)) for v in h], axis=0),
                 "var": np.mean([v.var(axis=(0, 1, 2)) for v in h], axis=0)}}


@functools.partial(jax.jit, static_argnums=0)
def dense_hessian(apply_fn, params, x, y, batch_stats=None):
  """H of the mean cross-entropy over all examples in the ravelled parameters (float64 copy
  on the host), with the given BatchNorm statistics."""
  flat, unravel = ravel_pytree(params)
  extra = {} if batch_stats is None else {"batch_stats": batch_stats}

  def loss(vector):
    logits = apply_fn({"params": unravel(vector), **extra}, x, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return jax.hessian(loss)(flat)


def dense(apply_fn, params, x, y, batch_stats=None):
  return np.asarray(dense_hessian(apply_fn, params, x, y, batch_stats), np.float64)


def dense_along_path(model, points, x, y, bn_images=None):
  """[K, n, n] dense Hessians at TS, each with its own recomputed statistics."""
  hessians = []
  for t in TS:
    params = _at(points, float(t))
    stats = None if bn_images is None else _conv_stats(params, bn_images)
    hessians.append(dense(model.apply, params, x, y, stats))
  return np.stack(hessians)


def leaf_block(params, prefix):
  """Positions in the ravelled vector of the leaves under `prefix` (by hand)."""
  offset, chosen = 0, []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if jax.tree_util.keystr(path, simple=True, separator="/").startswith(prefix + "/"):
      chosen.extend(range(offset, offset + leaf.size))
    offset += leaf.size
  return np.array(chosen)


def quadratic_forms(hessian, probes):
  probes = np.asarray(probes, np.float64)
  return np.einsum("pi,ij,pj->p", probes, hessian, probes)


# --- Against the dense Hessian. ------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_full(mlp):
  model, points, x, y, batches = mlp
  n = curvature.num_float_parameters(points[0])
  result = curvature.path_curvature(model.apply, points, TS, batches, num_eigenvalues=3,
                                    num_matvecs=n, num_probes=NUM_PROBES, groups=["out"])
  return result, dense_along_path(model, points, x, y)


def test_all_matvecs_give_the_exact_top_eigenvalues(mlp_full):
  result, hessians = mlp_full
  assert result.num_parameters == hessians.shape[-1] == 43
  exact = np.stack([np.linalg.eigvalsh(h)[::-1][:3] for h in hessians])
  np.testing.assert_allclose(result.top_eigenvalues, exact, rtol=1e-4, atol=1e-5)
  assert np.all(np.diff(np.asarray(result.top_eigenvalues), axis=1) <= 0)  # descending


def test_trace_is_the_mean_quadratic_form_of_the_same_probes_at_every_t(mlp_full):
  result, hessians = mlp_full
  probes = curvature.probe_vectors(result.num_parameters, NUM_PROBES, seed=0)
  assert probes.shape == (NUM_PROBES, 43)
  assert set(np.unique(np.asarray(probes)).tolist()) == {-1.0, 1.0}
  forms = np.stack([quadratic_forms(h, probes) for h in hessians])  # [K, probes]
  np.testing.assert_allclose(result.trace, forms.mean(axis=1), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(result.trace_sem, forms.std(axis=1, ddof=1) / np.sqrt(NUM_PROBES),
                             rtol=1e-3, atol=1e-5)
  exact = np.trace(hessians, axis1=1, axis2=2)
  assert np.all(np.abs(np.asarray(result.trace) - exact) < 4 * np.asarray(result.trace_sem))


def test_group_block_eigenvalues_and_trace_are_the_dense_blocks(mlp, mlp_full):
  result, hessians = mlp_full
  idx = leaf_block(mlp[1][0], "out")  # kernel [5, 3] and bias [3]: 18 entries
  assert idx.size == 18 and dict(result.group_sizes) == {"out": 18}
  blocks = hessians[:, idx][:, :, idx]
  group = result.per_group["out"]
  exact = np.stack([np.linalg.eigvalsh(b)[::-1][:3] for b in blocks])
  np.testing.assert_allclose(group["top_eigenvalues"], exact, rtol=1e-4, atol=1e-5)
  probes = np.asarray(curvature.probe_vectors(result.num_parameters, NUM_PROBES))[:, idx]
  forms = np.stack([quadratic_forms(b, probes) for b in blocks])
  np.testing.assert_allclose(group["trace"], forms.mean(axis=1), rtol=1e-4, atol=1e-5)
  # The block is not the whole Hessian: its top eigenvalue is smaller at some t.
  assert np.any(exact[:, 0] < np.asarray(result.top_eigenvalues)[:, 0] - 1e-3)


def test_t0_is_the_curvature_of_the_first_model_alone(mlp, mlp_full):
  model, points, x, y, _ = mlp
  result, _ = mlp_full
  alone = dense(model.apply, points[0], x, y)
  np.testing.assert_allclose(result.top_eigenvalues[0], np.linalg.eigvalsh(alone)[::-1][:3],
                             rtol=1e-4, atol=1e-5)
  probes = curvature.probe_vectors(result.num_parameters, NUM_PROBES)
  np.testing.assert_allclose(result.trace[0], quadratic_forms(alone, probes).mean(), rtol=1e-4)


def test_few_matvecs_give_close_lower_bounds(mlp, mlp_full):
  model, points, _, _, batches = mlp
  _, hessians = mlp_full
  result = curvature.path_curvature(model.apply, points, TS, batches, num_matvecs=12,
                                    num_probes=0, strategy="chunked", chunk_size=2)
  assert result.trace is None and "trace_max" not in result.summary()
  top = np.stack([np.linalg.eigvalsh(h)[-1] for h in hessians])
  ritz = np.asarray(result.top_eigenvalues)[:, 0]
  assert np.all(ritz <= top * (1 + 1e-4))  # Ritz values never exceed the eigenvalue
  np.testing.assert_allclose(ritz, top, rtol=2e-2)


def test_recomputed_statistics_not_the_stored_ones(conv):
  model, points, x, y, batches, bn_batches = conv
  n = curvature.num_float_parameters(points[0])
  result = curvature.path_curvature(model.apply, points, TS, batches, bn_batches,
                                    num_eigenvalues=2, num_matvecs=n, num_probes=NUM_PROBES,
                                    groups={"head": ["head"]})
  hessians = dense_along_path(model, points, x, y, bn_batches["image"])
  exact = np.stack([np.linalg.eigvalsh(h)[::-1][:2] for h in hessians])
  np.testing.assert_allclose(result.top_eigenvalues, exact, rtol=1e-4, atol=1e-5)
  probes = curvature.probe_vectors(n, NUM_PROBES)
  forms = np.stack([quadratic_forms(h, probes) for h in hessians])
  np.testing.assert_allclose(result.trace, forms.mean(axis=1), rtol=1e-4, atol=1e-5)
  idx = leaf_block(points[0], "head")
  block = np.stack([np.linalg.eigvalsh(h[idx][:, idx])[::-1][:2] for h in hessians])
  np.testing.assert_allclose(result.per_group["head"]["top_eigenvalues"], block, rtol=1e-4,
                             atol=1e-5)
  # The stored statistics (mean 0, variance 1 from init) give another Hessian.
  stored = model.init(jax.random.key(2), x[:1])["batch_stats"]
  wrong = np.linalg.eigvalsh(dense(model.apply, points[0], x, y, stored))[::-1][:2]
  assert np.max(np.abs(wrong - exact[0])) > 0.2 * abs(exact[0, 0])


def test_summary_reads_the_curves(mlp_full):
  result, _ = mlp_full
  summary = result.summary()
  top = np.asarray(result.top_eigenvalues)[:, 0]
  assert summary["top_eigenvalue_max"] == pytest.approx(float(top.max()))
  assert summary["top_eigenvalue_max_t"] == pytest.approx(float(TS[np.argmax(top)]))
  assert summary["trace_start"] == pytest.approx(float(result.trace[0]))
  assert summary["trace_end"] == pytest.approx(float(result.trace[-1]))
  assert set(summary["groups"]) == {"out"}


# --- Bad input. -----------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_matvecs=44), ValueError, "exceeds the number of parameters"),
    (dict(num_matvecs=4, num_eigenvalues=5), ValueError, "exceeds num_matvecs"),
    (dict(num_eigenvalues=0), ValueError, "num_eigenvalues must be positive"),
    (dict(num_matvecs=-1), ValueError, "num_matvecs must be positive"),
    (dict(num_probes=1), ValueError, "num_probes must be 0"),
    (dict(num_matvecs=2.0), TypeError, "num_matvecs must be an integer"),
    (dict(metric="accuracyy"), ValueError, r"no metric 'accuracyy'.*'accuracy', 'loss'"),
    (dict(groups=["out/bias"], num_eigenvalues=4, num_matvecs=5), ValueError,
     "holds 3 float parameters"),
    (dict(groups=["Dense_0"]), ValueError, "matches no parameter"),
])
def test_bad_options_raise(mlp, kwargs, error, match):
  model, points, _, _, batches = mlp
  with pytest.raises(error, match=match):
    curvature.path_curvature(model.apply, points, TS, batches, **kwargs)


def test_bad_data_raise(mlp, conv):
  model, points, x, y, batches = mlp
  with pytest.raises(ValueError, match="full variables"):
    curvature.path_curvature(model.apply, [{"params": p} for p in points], TS, batches)
  with pytest.raises(ValueError, match="grid"):
    curvature.path_curvature(model.apply, points, [0.0, 0.5], batches)
  nan_batches = stack_batches(np.where(np.arange(20)[:, None] == 3, np.nan, x), y, 8)
  with pytest.raises(finite.NonFiniteError, match="NaN"):
    curvature.path_curvature(model.apply, points, TS, nan_batches, num_matvecs=2)
  conv_model, conv_points, _, _, conv_batches, _ = conv
  with pytest.raises(ValueError, match="bn_batches"):
    curvature.path_curvature(conv_model.apply, conv_points, TS, conv_batches)
