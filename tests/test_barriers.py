"""evaluate_path against a plain loop; barrier_height against closed forms."""

import chex
import jax
import numpy as np
import optax
import pytest

from mechconn import barriers, batchnorm, finite, input_checks, paths
from mechconn.data.batching import stack_batches
from mechconn.models import get_model

# ---------------------------------------------------------------- barrier_height


def test_barrier_of_a_bump_is_its_height():
  ts = np.linspace(0, 1, 11)
  height = 0.7
  values = 2.0 + 3.0 * ts + 4 * height * ts * (1 - ts)  # chord 2 + 3t, bump peaks at 0.5
  assert float(barriers.barrier_height(ts, values)) == pytest.approx(height, rel=1e-6)
  assert barriers.barrier_location(ts, values) == pytest.approx(0.5)


def test_convex_curve_has_zero_barrier():
  ts = np.linspace(0, 1, 9)
  assert float(barriers.barrier_height(ts, ts**2)) == 0.0


def test_asymmetric_closed_form():
  # v(t) = sin(pi t) + t on a fine grid: max of sin(pi t) is 1 at t = 0.5.
  ts = np.linspace(0, 1, 101)
  assert float(barriers.barrier_height(ts, np.sin(np.pi * ts) + ts)) == pytest.approx(1.0)


@pytest.mark.parametrize("ts", [np.linspace(0.1, 1, 5), np.linspace(0, 0.9, 5),
                                np.arange(0, 1 + 1 / 6, 1 / 6), [0.0, 0.5, 0.4, 1.0],
                                [0.0, np.nan, 1.0]])
def test_bad_grids_raise(ts):
  with pytest.raises(ValueError, match="grid"):
    barriers.barrier_height(ts, np.zeros(len(ts)))


# ---------------------------------------------------------------- evaluate_path

NUM_T = 5


@pytest.fixture(scope="module")
def cnn_setup():
  rng = np.random.default_rng(0)
  model = get_model("small_cnn", 4, width=4)
  x = rng.normal(size=(70, 8, 8, 3)).astype(np.float32)
  y = rng.integers(0, 4, size=70).astype(np.int32)
  va = model.init(jax.random.key(0), x[:2])
  vb = model.init(jax.random.key(1), x[:2])
  eval_batches = stack_batches(x, y, 16)  # 5 batches, the last has 6 real examples
  bn_batches = stack_batches(x[:48], y[:48], 16, drop_remainder=True)
  return model, va["params"], vb["params"], x, y, eval_batches, bn_batches


def loop_reference(model, points, path_kind, ts, x, y, bn_images, unbiased=False):
  """Per t: params by tree maths, stats by recompute, loss over all examples unbatched."""
  @jax.jit  # one compiled point (eager op-by-op dispatch is slow); the loop over t stays here
  def logits_at(t):
    params = paths.path_fn(path_kind)(points, t)
    stats = batchnorm.recompute_batch_stats(model.apply, {"params": params},
                                            {"image": bn_images}, unbiased=unbiased)
    return model.apply({"params": params, "batch_stats": stats}, x, train=False)

  losses, accs = [], []
  for t in ts:
    logits = logits_at(float(t))
    losses.append(float(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()))
    accs.append(float(np.mean(np.argmax(logits, -1) == y)))
  return np.array(losses), np.array(accs)


@pytest.mark.parametrize("strategy", barriers.STRATEGIES)
def test_matches_plain_loop(cnn_setup, strategy):
  model, pa, pb, x, y, eval_batches, bn_batches = cnn_setup
  ts = np.linspace(0, 1, NUM_T)
  result = barriers.evaluate_path(model.apply, (pa, pb), ts, eval_batches,
                                  bn_batches=bn_batches, strategy=strategy, chunk_size=2)
  loss, acc = loop_reference(model, (pa, pb), "linear", ts, x, y, bn_batches["image"])
  np.testing.assert_allclose(result.loss, loss, rtol=1e-4)
  np.testing.assert_allclose(result.accuracy, acc, atol=1e-6)
  np.testing.assert_array_equal(result.ts, ts.astype(np.float32))


def test_unbiased_batchnorm_statistics_along_the_path(cnn_setup):
  """renormalize='batchnorm_unbiased' (PyTorch's update_bn) at every t; it differs from the
  default biased statistics, though slightly."""
  model, pa, pb, x, y, eval_batches, bn_batches = cnn_setup
  ts = np.linspace(0, 1, NUM_T)
  result = barriers.evaluate_path(model.apply, (pa, pb), ts, eval_batches,
                                  bn_batches=bn_batches, renormalize="batchnorm_unbiased")
  loss, _ = loop_reference(model, (pa, pb), "linear", ts, x, y, bn_batches["image"],
                           unbiased=True)
  np.testing.assert_allclose(result.loss, loss, rtol=1e-4)
  biased = barriers.evaluate_path(model.apply, (pa, pb), ts, eval_batches,
                                  bn_batches=bn_batches)
  assert not np.allclose(result.loss, biased.loss, rtol=1e-6, atol=0)


def test_bezier_path_matches_loop(cnn_setup):
  model, pa, pb, x, y, eval_batches, bn_batches = cnn_setup
  mid = jax.tree.map(lambda a, b: 0.5 * (a + b) + 0.1, pa, pb)
  ts = np.linspace(0, 1, NUM_T)
  result = barriers.evaluate_path(model.apply, (pa, mid, pb), ts, eval_batches,
                                  path="bezier", bn_batches=bn_batches)
  loss, acc = loop_reference(model, (pa, mid, pb), "bezier", ts, x, y, bn_batches["image"])
  np.testing.assert_allclose(result.loss, loss, rtol=1e-4)
  np.testing.assert_allclose(result.accuracy, acc, atol=1e-6)


def test_same_model_at_both_ends_has_zero_barrier(cnn_setup):
  """A flat control: correct, and flagged (identical end points are no evidence of anything)."""
  model, pa, _, _, _, eval_batches, bn_batches = cnn_setup
  with pytest.warns(input_checks.IdenticalEndpointsWarning, match="identical weights"):
    result = barriers.evaluate_path(model.apply, (pa, pa), np.linspace(0, 1, NUM_T),
                                    eval_batches, bn_batches=bn_batches)
  np.testing.assert_allclose(result.loss, result.loss[0], rtol=1e-5)
  b = result.summary()
  assert set(b) == {"loss", "loss_t", "error", "error_t"}
  assert abs(b["loss"]) < 1e-5 and abs(b["error"]) < 1e-6


def test_no_recompilation_for_new_grid_or_new_endpoints(cnn_setup):
  model, pa, pb, _, _, eval_batches, bn_batches = cnn_setup
  # A fresh path function object gets its own cache entry; it may trace once.
  traced_linear = chex.assert_max_traces(lambda points, t: paths.linear(*points, t), n=1)
  first = barriers.evaluate_path(model.apply, (pa, pb), np.linspace(0, 1, NUM_T), eval_batches,
                                 bn_batches=bn_batches, path=traced_linear)
  other_grid = np.array([0.0, 0.1, 0.2, 0.9, 1.0])
  shifted = jax.tree.map(lambda a: a * 1.01, pb)
  second = barriers.evaluate_path(model.apply, (pa, shifted), other_grid, eval_batches,
                                  bn_batches=bn_batches, path=traced_linear)
  assert first.loss.shape == second.loss.shape == (NUM_T,)
  assert not np.allclose(first.loss, second.loss)


def test_model_without_batchnorm_needs_no_bn_batches():
  rng = np.random.default_rng(1)
  model = get_model("mlp", 3, hidden=(8,))
  x = rng.normal(size=(20, 4, 4, 1)).astype(np.float32)
  y = rng.integers(0, 3, 20).astype(np.int32)
  pa = model.init(jax.random.key(0), x[:1])["params"]
  pb = model.init(jax.random.key(1), x[:1])["params"]
  result = barriers.evaluate_path(model.apply, (pa, pb), np.linspace(0, 1, 3),
                                  stack_batches(x, y, 8))
  for i, t in enumerate((0.0, 0.5, 1.0)):
    logits = model.apply({"params": paths.linear(pa, pb, t)}, x)
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    assert float(result.loss[i]) == pytest.approx(float(expected), rel=1e-5)


def test_batchnorm_model_without_bn_batches_raises(cnn_setup):
  model, pa, pb, _, _, eval_batches, _ = cnn_setup
  with pytest.raises(ValueError, match="bn_batches"):
    barriers.evaluate_path(model.apply, (pa, pb), np.linspace(0, 1, 3), eval_batches)


def test_bad_strategy_and_grid_raise(cnn_setup):
  model, pa, pb, _, _, eval_batches, bn_batches = cnn_setup
  with pytest.raises(ValueError, match="valid strategies"):
    barriers.evaluate_path(model.apply, (pa, pb), np.linspace(0, 1, 3), eval_batches,
                           bn_batches=bn_batches, strategy="pmap")
  with pytest.raises(ValueError, match="start at 0 and end at 1"):
    barriers.evaluate_path(model.apply, (pa, pb), np.linspace(0, 0.5, 3), eval_batches,
                           bn_batches=bn_batches)


# ---------------------------------------------------------------- memory


@pytest.mark.slow  # compiles the evaluation at two grid lengths per strategy
@pytest.mark.parametrize("strategy", ["map", "chunked"])
def test_working_memory_does_not_grow_with_the_number_of_t(cnn_setup, strategy):
  model, pa, pb, x, y, eval_batches, bn_batches = cnn_setup
  sizes = {k: barriers.compiled_memory(model.apply, (pa, pb), np.linspace(0, 1, k),
                                       {"eval": eval_batches}, bn_batches=bn_batches,
                                       strategy=strategy)
           for k in (16, 256)}
  assert sizes[256]["temp"] <= 1.5 * sizes[16]["temp"], sizes
  assert sizes[256]["total"] <= 1.5 * sizes[16]["total"], sizes


@pytest.mark.slow  # compiles the evaluation at two grid lengths
def test_vmap_working_memory_grows_with_the_number_of_t(cnn_setup):
  """The measure can fail: all t at once hold K parameter copies and activations."""
  model, pa, pb, x, y, eval_batches, bn_batches = cnn_setup
  temp = {k: barriers.compiled_memory(model.apply, (pa, pb), np.linspace(0, 1, k),
                                      {"eval": eval_batches}, bn_batches=bn_batches,
                                      strategy="vmap")["temp"]
          for k in (16, 256)}
  assert temp[256] > 8 * temp[16], temp


# ---------------------------------------------------------------- bad input is a named error

TS = np.linspace(0, 1, 3)


def _with(batches, key, index, value):
  out = {k: np.array(v) for k, v in batches.items()}
  out[key][index] = value
  return out


def test_a_nan_eval_image_is_an_error_not_a_correct_prediction(cnn_setup):
  model, pa, pb, _, _, eval_batches, bn_batches = cnn_setup
  bad = _with(eval_batches, "image", (1, 3, 2, 2, 0), np.nan)
  with pytest.raises(finite.NonFiniteError, match=r"images of eval set 'eval'"):
    barriers.evaluate_path(model.apply, (pa, pb), TS, bad, bn_batches=bn_batches)
  # Padding rows (mask 0) too: a NaN there would turn the masked sum into NaN.
  padded = _with(eval_batches, "image", (4, 15, 0, 0, 0), np.nan)
  with pytest.raises(finite.NonFiniteError, match=r"images of eval set 'eval'"):
    barriers.evaluate_path(model.apply, (pa, pb), TS, padded, bn_batches=bn_batches)


def test_one_nan_batchnorm_pixel_is_an_error_not_a_zero_barrier(cnn_setup):
  model, pa, pb, _, _, eval_batches, bn_batches = cnn_setup
  bad = _with(bn_batches, "image", (2, 0, 1, 1, 2), np.nan)
  with pytest.raises(finite.NonFiniteError, match=r"the BatchNorm images"):
    barriers.evaluate_path(model.apply, (pa, pb), TS, eval_batches, bn_batches=bad)
  with pytest.raises(finite.NonFiniteError, match=r"recompute_batch_stats.*the BatchNorm images"):
    batchnorm.recompute_batch_stats(model.apply, {"params": pa}, bad)


def test_non_finite_end_point_or_statistics_are_named(cnn_setup):
  model, pa, pb, _, _, eval_batches, bn_batches = cnn_setup
  nan_b = jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(np.nan), pb)
  with pytest.raises(finite.NonFiniteError, match=r"parameters of path point 1 of 2"):
    barriers.evaluate_path(model.apply, (pa, nan_b), TS, eval_batches, bn_batches=bn_batches)
  # Finite but huge weights: the activations' squares overflow float32 in the statistics.
  huge = jax.tree.map(lambda p: p * 1e15, pb)
  with pytest.raises(finite.NonFiniteError,
                     match=r"recomputed BatchNorm statistics at t = 0\.5, 1 \(the inputs are "
                           r"finite"):
    barriers.evaluate_path(model.apply, (pa, huge), TS, eval_batches, bn_batches=bn_batches)


@pytest.mark.parametrize("key, value, message", [
    ("label", lambda b: b["label"].astype(np.float32), r"\['label'\] has dtype float32; expected "
                                                       r"integer class indices"),
    ("label", lambda b: b["label"][:, :-1], r"\['label'\] has shape \(5, 15\); expected \(5, 16\)"),
    ("label", lambda b: np.where(b["mask"] > 0, 7, 0).astype(np.int32),
     r"labels outside \[0, 4\) \(the model's number of classes\)"),
    ("label", lambda b: b["label"] - 1, r"labels outside \[0, 4\)"),
    ("mask", lambda b: np.zeros_like(b["mask"]), r"no real example \(its mask is all zero\)"),
    ("image", lambda b: b["image"][:0], r"is empty: its images have shape \(0, 16, 8, 8, 3\)"),
])
def test_bad_eval_sets_are_named_errors(cnn_setup, key, value, message):
  model, pa, pb, _, _, eval_batches, bn_batches = cnn_setup
  bad = {**eval_batches, key: value(eval_batches)}
  if key == "image":
    bad = {k: v[:0] for k, v in eval_batches.items()}
  with pytest.raises(ValueError, match=message):
    barriers.evaluate_path(model.apply, (pa, pb), TS, bad, bn_batches=bn_batches)
