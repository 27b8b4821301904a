"""certified_maximum against dense evaluation of analytic curves; adaptive_barrier against
path_metrics on a dense grid and at its own t."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from mechconn import finite, path_core
from mechconn.data.batching import stack_batches
from mechconn.diagnostics import adaptive

TOL = 0.01
DENSE = np.linspace(0, 1, 100_001)


def bump(t, centre, width):
  return np.exp(-(t - centre)**2 / (2 * width**2))


CURVES = {  # metric m(t); its barrier curve is m minus the chord
    "single peak": lambda t: 2.0 * bump(t, 0.45, 0.12) + 0.3 * t,
    "two peaks": lambda t: 0.6 * bump(t, 0.25, 0.1) + 1.0 * bump(t, 0.7, 0.1),
    "two nearly equal peaks": lambda t: 1.0 * bump(t, 0.25, 0.1) + 0.98 * bump(t, 0.7, 0.1),
    "flat": lambda t: 0 * t + 1.5,
    "monotone": lambda t: t**3 + 2 * t,
    "maximum at an end": lambda t: 0.5 * t - np.sin(np.pi * t),
    "peak near an end": lambda t: 0.5 * bump(t, 0.1, 0.12) - t,
}


def barrier_curve(m, t):
  return m(t) - ((1 - t) * m(0.0) + t * m(1.0))


def dense_truth(m):
  """(max of v on 10^5 + 1 points, max |v''| by second differences on them)."""
  v = barrier_curve(m, DENSE)
  return v.max(), np.abs(np.diff(v, 2)).max() / DENSE[1]**2


@pytest.mark.parametrize("name", CURVES)
def test_maximum_is_within_tol_of_the_dense_maximum(name):
  truth, _ = dense_truth(CURVES[name])
  result = adaptive.certified_maximum(CURVES[name], tol=TOL)
  assert result.certified
  assert result.value <= truth + 1e-12                # a value the curve takes
  assert truth <= result.value + TOL                  # the certificate
  assert result.value <= result.upper_bound
  assert result.num_evaluations < 101 / 4


@pytest.mark.parametrize("name", CURVES)
def test_upper_bound_holds_when_the_curvature_bound_does(name):
  truth, curvature = dense_truth(CURVES[name])
  result = adaptive.certified_maximum(CURVES[name], tol=TOL, safety=1.0,
                                      min_curvature=1.01 * curvature)
  assert result.curvature_bound >= curvature
  assert result.upper_bound >= truth - 1e-12
  assert result.certified and truth <= result.value + TOL


def test_a_narrow_spike_is_missed_by_the_estimate_and_found_with_its_true_bound():
  """The documented assumption: divided differences never see a spike between points."""
  spiked = lambda t: 0.3 * np.sin(np.pi * t) + 0.5 * bump(t, 0.62, 0.02)
  truth, curvature = dense_truth(spiked)
  estimated = adaptive.certified_maximum(spiked, tol=TOL)
  assert estimated.certified and estimated.value < truth - 0.4   # certified, and wrong
  bounded = adaptive.certified_maximum(spiked, tol=TOL, safety=1.0,
                                       min_curvature=1.01 * curvature, max_evaluations=400)
  assert bounded.certified and truth <= bounded.value + TOL <= truth + TOL


def test_evaluations_are_counted_and_new():
  calls = []

  def evaluate(ts):
    calls.append(ts.copy())
    return CURVES["two peaks"](ts)

  result = adaptive.certified_maximum(evaluate, tol=1e-3, initial=5, per_round=3)
  np.testing.assert_array_equal(calls[0], np.linspace(0, 1, 5))
  assert all(1 <= len(c) <= 3 for c in calls[1:])
  everything = np.concatenate(calls)
  assert len(np.unique(everything)) == len(everything)           # never a t twice
  assert np.all((everything >= 0) & (everything <= 1))
  assert result.num_rounds == len(calls)
  assert result.num_evaluations == len(everything) == len(result.ts)
  np.testing.assert_array_equal(result.ts, np.sort(everything))
  np.testing.assert_allclose(result.values, barrier_curve(CURVES["two peaks"], result.ts),
                             atol=1e-12)
  assert result.value == result.values.max()
  assert result.t == result.ts[np.argmax(result.values)]


def test_stops_uncertified_at_max_evaluations():
  narrow = lambda t: bump(t, 0.5, 0.03)
  result = adaptive.certified_maximum(narrow, tol=1e-4, safety=10.0, max_evaluations=9)
  assert not result.certified
  assert result.num_evaluations == 9 and result.num_rounds == 2
  assert result.upper_bound > result.value + 1e-4
  summary = result.summary()
  assert summary["certified"] is False and len(summary["ts"]) == 9


def test_interval_bounds_are_the_maximum_of_the_bounding_parabola():
  rng = np.random.default_rng(0)
  ts = np.sort(np.concatenate([[0.0, 1.0], rng.uniform(size=8)]))
  values = rng.normal(size=10)
  for curvature in (0.0, 3.0, 300.0):
    bounds, peaks = adaptive.interval_bounds(ts, values, curvature)
    for i in range(len(ts) - 1):  # brute force over the interval
      t = np.linspace(ts[i], ts[i + 1], 20_001)
      line = values[i] + (values[i + 1] - values[i]) * (t - ts[i]) / (ts[i + 1] - ts[i])
      parabola = line + curvature * (t - ts[i]) * (ts[i + 1] - t) / 2
      assert parabola.max() <= bounds[i] <= parabola.max() + 1e-8  # the grid's max is below
      assert peaks[i] == pytest.approx(t[np.argmax(parabola)], abs=1e-4)


def test_second_divided_differences_of_a_parabola():
  ts = np.array([0.0, 0.1, 0.35, 0.4, 1.0])
  np.testing.assert_allclose(adaptive.second_divided_differences(ts, 3 * ts**2 - ts), 6.0)


@pytest.mark.parametrize("kwargs, match", [
    ({"tol": 0.0}, "tol"), ({"initial": 2}, "initial"), ({"per_round": 0}, "per_round"),
    ({"safety": 0.5}, "safety"), ({"min_curvature": -1.0}, "min_curvature"),
    ({"max_evaluations": 4}, "max_evaluations"), ({"tol": np.nan}, "tol")])
def test_bad_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    adaptive.certified_maximum(np.sin, **kwargs)


def test_bad_evaluations_raise():
  with pytest.raises(TypeError, match="initial"):
    adaptive.certified_maximum(np.sin, initial=5.0)
  with pytest.raises(ValueError, match="shape"):
    adaptive.certified_maximum(lambda ts: np.zeros(2))
  with pytest.raises(finite.NonFiniteError, match="t = 0.5"):
    adaptive.certified_maximum(lambda ts: np.where(ts == 0.5, np.nan, ts))


# ---------------------------------------------------------------- on a path


class TinyBN(nn.Module):
  """Dense -> BatchNorm -> ReLU -> Dense: 67 parameters."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x)))
    return nn.Dense(3)(x)


@pytest.fixture(scope="module")
def tiny_path():
  """Two end points computing nearly one function with permuted hidden units: a barrier."""
  model = TinyBN()
  x = np.random.default_rng(0).normal(size=(256, 4)).astype(np.float32)
  pa = model.init(jax.random.key(0), x[:2])["params"]
  pa["Dense_1"] = {**pa["Dense_1"], "kernel": 4 * pa["Dense_1"]["kernel"]}
  perm = np.roll(np.arange(8), 3)
  pb = {"Dense_0": {"kernel": 1.3 * pa["Dense_0"]["kernel"][:, perm],
                    "bias": pa["Dense_0"]["bias"][perm]},
        "BatchNorm_0": jax.tree.map(lambda p: p[perm], pa["BatchNorm_0"]),
        "Dense_1": {"kernel": pa["Dense_1"]["kernel"][perm], "bias": pa["Dense_1"]["bias"]}}
  logits, _ = model.apply({"params": pa}, x, train=True, mutable=["batch_stats"])
  y = np.argmax(np.asarray(logits), -1).astype(np.int32)
  eval_batches = stack_batches(x, y, 64)
  bn_batches = {"image": stack_batches(x, y, 64, drop_remainder=True)["image"]}
  dense = path_core.path_metrics(model.apply, (pa, pb), np.linspace(0, 1, 1001),
                                 {"eval": eval_batches}, bn_batches)["eval"]
  return model, (pa, pb), eval_batches, bn_batches, dense


def test_adaptive_barrier_agrees_with_a_dense_grid(tiny_path):
  model, points, eval_batches, bn_batches, dense = tiny_path
  compiled_before = path_core.evaluate_path_jit._cache_size()
  result = adaptive.adaptive_barrier(model.apply, points, eval_batches, bn_batches, tol=TOL)
  assert path_core.evaluate_path_jit._cache_size() - compiled_before <= 2  # grid and rounds
  dense_barrier = float(path_core.barrier_height(dense.ts, dense.loss))
  assert dense_barrier > 0.2                                   # a real barrier
  assert result.certified
  assert abs(result.value - dense_barrier) <= TOL
  assert result.upper_bound >= dense_barrier
  assert result.num_evaluations < 101 / 4


@pytest.mark.parametrize("metric", ["loss", "error"])
def test_adaptive_values_are_path_metrics_at_its_t(tiny_path, metric):
  model, points, eval_batches, bn_batches, _ = tiny_path
  result = adaptive.adaptive_barrier(model.apply, points, eval_batches, bn_batches,
                                     metric=metric, tol=TOL)
  at_its_t = path_core.path_metrics(model.apply, points, result.ts, {"eval": eval_batches},
                                    bn_batches)["eval"]
  m = np.asarray(at_its_t.loss if metric == "loss" else 1.0 - at_its_t.accuracy, np.float64)
  np.testing.assert_allclose(result.metric_values, m, rtol=1e-5, atol=1e-6)
  chord = (1 - result.ts) * m[0] + result.ts * m[-1]
  np.testing.assert_allclose(result.values, m - chord, rtol=1e-5, atol=1e-6)


def test_adaptive_barrier_refuses_unknown_metric_and_bad_points(tiny_path):
  model, points, eval_batches, bn_batches, _ = tiny_path
  with pytest.raises(ValueError, match="'accuracy'.*'error', 'loss'"):
    adaptive.adaptive_barrier(model.apply, points, eval_batches, bn_batches,
                              metric="accuracy")
  with pytest.raises(TypeError, match="sequence of parameter trees"):
    adaptive.adaptive_barrier(model.apply, points[0], eval_batches, bn_batches)
  with pytest.raises(ValueError, match="bn_batches"):
    adaptive.adaptive_barrier(model.apply, points, eval_batches, None)


def test_adaptive_barrier_refuses_non_finite_statistics(tiny_path):
  """Weights near float32's largest overflow the activations at t = 1: no result."""
  model, (pa, pb), eval_batches, bn_batches, _ = tiny_path
  huge = {**pb, "Dense_0": {**pb["Dense_0"], "kernel": 1e37 * pb["Dense_0"]["kernel"]}}
  with pytest.raises(finite.NonFiniteError, match="statistics at t = 1"):
    adaptive.adaptive_barrier(model.apply, (pa, huge), eval_batches, bn_batches)
