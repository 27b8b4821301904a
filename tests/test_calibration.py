"""Calibrated barriers against brute force: T(t) from a dense grid of temperatures, the
calibrated metrics from an independent evaluation of logits / T(t), scale equivariance."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mechconn import adapters, batchnorm, finite, objectives, path_core, paths
from mechconn.data.batching import stack_batches
from mechconn.diagnostics import calibration

TS = np.linspace(0, 1, 6)
GRID_SIZE = 10_001  # temperatures of the brute-force search, log-spaced over the range
FLOAT32_RESOLUTION = 1e-6  # losses within this relative distance are equal to a float32 search


class TinyBN(nn.Module):
  """Dense -> BatchNorm -> ReLU -> Dense, logits multiplied by `scale`."""

  scale: float = 1.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x)))
    return self.scale * nn.Dense(3)(x)


class Bigram(nn.Module):
  """Next-token logits = table[previous token]."""

  vocab: int

  @nn.compact
  def __call__(self, tokens):
    return self.param("table", nn.initializers.zeros, (self.vocab, self.vocab))[tokens]


def _permuted(params, perm):
  """The same function with hidden units reordered (a second end point with a barrier)."""
  return {"Dense_0": {"kernel": params["Dense_0"]["kernel"][:, perm],
                      "bias": params["Dense_0"]["bias"][perm]},
          "BatchNorm_0": {k: v[perm] for k, v in params["BatchNorm_0"].items()},
          "Dense_1": {"kernel": params["Dense_1"]["kernel"][perm],
                      "bias": params["Dense_1"]["bias"]}}


@pytest.fixture(scope="module")
def setup():
  """Two end points of one function up to a permutation and noise; labels from the first end
  point, 30% resampled; held-out calibration, eval and BatchNorm data (padded last batches)."""
  rng = np.random.default_rng(0)
  model = TinyBN()
  x = rng.normal(size=(190, 4)).astype(np.float32)
  pa = model.init(jax.random.key(0), x[:2])["params"]
  pb = jax.tree.map(lambda v: v + 0.1 * rng.normal(size=v.shape).astype(np.float32),
                    _permuted(pa, rng.permutation(8)))
  stats = batchnorm.recompute_batch_stats(model.apply, {"params": pa}, {"image": x[None]})
  y = np.asarray(jnp.argmax(model.apply({"params": pa, "batch_stats": stats}, x), -1))
  resample = rng.random(len(y)) < 0.3
  y = np.where(resample, rng.integers(0, 3, len(y)), y).astype(np.int32)
  data = {"x_cal": x[:58], "y_cal": y[:58], "x_eval": x[60:118], "y_eval": y[60:118],
          "cal": stack_batches(x[:58], y[:58], 16), "eval": stack_batches(x[60:118], y[60:118], 16),
          "bn": stack_batches(x[126:190], y[126:190], 16, drop_remainder=True)}
  result = calibration.calibrated_path(model.apply, (pa, pb), TS, {"eval": data["eval"]},
                                       data["cal"], data["bn"])
  return model, (pa, pb), data, result


def logits_at(model, points, bn_images):
  """A jitted t -> logits function of every example: params by tree maths, stats recomputed."""
  @jax.jit
  def logits(t, x):
    params = paths.path_fn("linear")(points, t)
    stats = batchnorm.recompute_batch_stats(model.apply, {"params": params},
                                            {"image": bn_images})
    return model.apply({"params": params, "batch_stats": stats}, x, train=False)
  return logits


def cross_entropy(logits, labels, temperatures):
  """[len(temperatures)] mean cross-entropy of logits / T, float64 (the definition)."""
  z = np.asarray(logits, np.float64)[None] / np.asarray(temperatures, np.float64)[:, None, None]
  top = z.max(-1, keepdims=True)
  logsumexp = np.log(np.exp(z - top).sum(-1)) + top[..., 0]
  return (logsumexp - np.take_along_axis(z, labels[None, :, None], -1)[..., 0]).mean(-1)


def brute_force(logits, labels, temperature_range):
  """(T, loss): the minimum of the loss over GRID_SIZE log-spaced temperatures."""
  grid = np.geomspace(*temperature_range, GRID_SIZE)
  losses = np.concatenate([cross_entropy(logits, labels, chunk)
                           for chunk in np.array_split(grid, 10)])
  return grid, losses


def assert_minimises(temperature, loss, logits, labels, temperature_range):
  """`temperature` lies, to within one grid step, among the grid's temperatures whose loss is
  the grid's minimum to float32's resolution (the search compares float32 losses, so it cannot
  tell them apart), and `loss` is that minimum."""
  grid, losses = brute_force(logits, labels, temperature_range)
  best = losses.min()
  flat = grid[losses <= best * (1 + FLOAT32_RESOLUTION)]
  step = np.log(grid[1] / grid[0])
  assert np.log(flat[0]) - step <= np.log(temperature) <= np.log(flat[-1]) + step, (
      temperature, flat[0], flat[-1])
  assert np.log(flat[-1] / flat[0]) < 30 * step  # a narrow band (0.3% of the grid): teeth
  assert loss == pytest.approx(best, rel=FLOAT32_RESOLUTION)


def test_temperature_and_loss_equal_a_brute_force_search(setup):
  model, points, data, result = setup
  logits = logits_at(model, points, data["bn"]["image"])
  for k, t in enumerate(TS):  # a plain loop over t
    z = logits(t, data["x_cal"])
    assert_minimises(float(result.temperature[k]), float(result.calibration_loss[k]), z,
                     data["y_cal"], calibration.DEFAULT_TEMPERATURE_RANGE)
    assert float(result.calibration_loss_raw[k]) == pytest.approx(
        cross_entropy(z, data["y_cal"], [1.0])[0], rel=1e-5)
  assert np.all(result.calibration_loss <= result.calibration_loss_raw)
  assert np.all(np.asarray(result.temperature) != 1.0)  # a fitted temperature, not T = 1
  assert not np.any(result.at_bound)


def test_eval_metrics_raw_and_at_the_fitted_temperature(setup):
  model, points, data, result = setup
  logits = logits_at(model, points, data["bn"]["image"])
  raw, calibrated = result.raw["eval"], result.calibrated["eval"]
  for k, t in enumerate(TS):
    z = np.asarray(logits(t, data["x_eval"]), np.float64)
    temperature = float(result.temperature[k])
    assert float(raw.loss[k]) == pytest.approx(
        cross_entropy(z, data["y_eval"], [1.0])[0], rel=1e-5)
    assert float(calibrated.loss[k]) == pytest.approx(
        cross_entropy(z, data["y_eval"], [temperature])[0], rel=1e-5)
    assert float(raw.accuracy[k]) == pytest.approx(np.mean(z.argmax(-1) == data["y_eval"]))
  np.testing.assert_array_equal(calibrated.accuracy, raw.accuracy)  # argmax of z / T, T > 0
  assert not np.allclose(calibrated.loss, raw.loss, rtol=1e-3)
  reference = path_core.path_metrics(model.apply, points, TS, {"eval": data["eval"]},
                                     data["bn"])["eval"]
  np.testing.assert_allclose(raw.loss, reference.loss, rtol=1e-5)


def test_scaled_logits_scale_the_temperature(setup):
  """Logits c z: T_c = c T, to the search's float32 resolution (the flat band of the loss)."""
  model, points, data, result = setup
  c, wide = 3.0, (1e-3, 1e3)
  scaled = calibration.calibrated_path(TinyBN(scale=c).apply, points, TS,
                                       {"eval": data["eval"]}, data["cal"], data["bn"],
                                       temperature_range=wide)
  logits = logits_at(model, points, data["bn"]["image"])
  for k, t in enumerate(TS):
    assert_minimises(float(scaled.temperature[k]) / c, float(scaled.calibration_loss[k]),
                     logits(t, data["x_cal"]), data["y_cal"], wide)
  np.testing.assert_allclose(np.asarray(scaled.temperature) / c, result.temperature, rtol=3e-3)
  # The eval loss is not at its own minimum: it moves with T to first order.
  np.testing.assert_allclose(scaled.calibrated["eval"].loss, result.calibrated["eval"].loss,
                             rtol=1e-3)


def test_a_temperature_at_a_bound_is_flagged_and_exact(setup):
  model, points, data, result = setup
  fitted = np.asarray(result.temperature)
  for bounds, expected in [((0.1 * fitted.min(), 0.5 * fitted.min()), 0.5 * fitted.min()),
                           ((2 * fitted.max(), 10 * fitted.max()), 2 * fitted.max())]:
    capped = calibration.calibrated_path(model.apply, points, TS, {"eval": data["eval"]},
                                         data["cal"], data["bn"], temperature_range=bounds)
    np.testing.assert_allclose(capped.temperature, expected, rtol=1e-5)
    assert np.all(capped.at_bound)
    assert capped.summary()["eval"]["temperature_at_bound_t"] == pytest.approx(list(TS))
  assert result.summary()["eval"]["temperature_at_bound_t"] == []


def test_next_token_temperature_equals_brute_force():
  """A bigram language model (logits = table[previous token]) on a linear path of tables; the
  search vmapped over chunks of t ('chunked': 6 t in chunks of 4)."""
  rng = np.random.default_rng(1)
  vocab, length = 5, 7
  table_a = (4 * rng.normal(size=(vocab, vocab))).astype(np.float32)
  table_b = table_a[rng.permutation(vocab)] + rng.normal(size=(vocab, vocab)).astype(np.float32)
  apply_fn = adapters.without_train(Bigram(vocab).apply)

  def sequences(num):
    tokens = rng.integers(0, vocab, size=(num, length))
    for i in range(1, length):  # follow table_a's argmax 60% of the time
      follow = rng.random(num) < 0.6
      tokens[:, i] = np.where(follow, table_a[tokens[:, i - 1]].argmax(-1), tokens[:, i])
    return tokens.astype(np.int32), (rng.random((num, length)) < 0.8).astype(np.float32)

  cal_tokens, cal_mask = sequences(24)
  eval_tokens, eval_mask = sequences(16)
  stacked = lambda a: a.reshape(-1, 8, *a.shape[1:])
  result = calibration.calibrated_path(
      apply_fn, ({"table": table_a}, {"table": table_b}), TS,
      {"eval": {"tokens": stacked(eval_tokens), "mask": stacked(eval_mask)}},
      {"tokens": stacked(cal_tokens), "mask": stacked(cal_mask)}, objective=objectives.next_token(),
      strategy="chunked", chunk_size=4)
  real = cal_mask[:, 1:] > 0
  labels = cal_tokens[:, 1:][real]
  for k, t in enumerate(TS):
    z = ((1 - t) * table_a + t * table_b)[cal_tokens[:, :-1]][real]
    assert_minimises(float(result.temperature[k]), float(result.calibration_loss[k]), z,
                     labels, calibration.DEFAULT_TEMPERATURE_RANGE)
  np.testing.assert_array_equal(result.calibrated["eval"].accuracy, result.raw["eval"].accuracy)


def test_golden_section_finds_an_interior_minimum_and_an_exact_bound():
  search = jax.jit(lambda f_shift: calibration.golden_section_min(
      lambda x: jnp.square(x - f_shift), jnp.float32(-1.0), jnp.float32(2.0), 40))
  assert float(search(0.3)[0]) == pytest.approx(0.3, abs=1e-3)
  assert float(search(5.0)[0]) == 2.0  # the minimum lies beyond the range: the bound itself
  assert float(search(-3.0)[0]) == -1.0


def test_summary_barriers_share_and_temperatures():
  ts = np.linspace(0, 1, 5)
  raw = path_core.PathEval.classification(ts, np.array([1.0, 1.5, 2.0, 1.2, 1.0]), np.ones(5))
  calibrated = path_core.PathEval.classification(ts, np.array([0.9, 1.0, 1.3, 1.0, 0.9]),
                                                 np.ones(5))
  record = calibration.CalibratedPath(
      ts=ts, temperature=np.array([1.0, 1.2, 2.0, 1.1, 1.0]), at_bound=np.zeros(5, bool),
      calibration_loss=np.zeros(5), calibration_loss_raw=np.zeros(5),
      raw={"eval": raw, "flat": calibrated.replace(metrics={"loss": np.ones(5),
                                                            "accuracy": np.ones(5)})},
      calibrated={"eval": calibrated, "flat": calibrated})
  summary = record.summary()
  assert summary["eval"]["loss"] == pytest.approx(1.0)  # 2.0 - chord 1.0 at t = 0.5
  assert summary["eval"]["calibrated_loss"] == pytest.approx(0.4)
  assert summary["eval"]["calibration_share"] == pytest.approx(0.6)
  assert summary["eval"]["temperature_at_barrier"] == pytest.approx(2.0)
  assert summary["eval"]["temperature_max"] == pytest.approx(2.0)
  assert summary["flat"]["calibration_share"] is None  # no raw barrier to share


# ---------------------------------------------------------------- bad input


def test_the_calibration_set_must_not_be_an_eval_set(setup):
  model, points, data, _ = setup
  for same in (data["eval"], jax.tree.map(np.copy, data["eval"])):
    with pytest.raises(ValueError, match="calibration_batches is the eval set 'eval'"):
      calibration.calibrated_path(model.apply, points, TS, {"eval": data["eval"]}, same,
                                  data["bn"])


@pytest.mark.parametrize("bounds", [(0.0, 1.0), (2.0, 1.0), (1.0, np.inf), (1.0,), "ab", None])
def test_bad_temperature_ranges_raise(setup, bounds):
  model, points, data, _ = setup
  with pytest.raises(ValueError, match="temperature_range"):
    calibration.calibrated_path(model.apply, points, TS, {"eval": data["eval"]}, data["cal"],
                                data["bn"], temperature_range=bounds)


@pytest.mark.parametrize("iterations", [0, -3, 2.5, True])
def test_bad_iterations_raise(setup, iterations):
  model, points, data, _ = setup
  with pytest.raises(ValueError, match="iterations"):
    calibration.calibrated_path(model.apply, points, TS, {"eval": data["eval"]}, data["cal"],
                                data["bn"], iterations=iterations)


def test_an_objective_without_a_loss_raises(setup):
  model, points, data, _ = setup
  renamed = objectives.Objective(
      name="cross_entropy_only", target_keys=("label",),
      metrics=lambda out, batch: {"xent": objectives.classification_metrics(
          out, batch["label"])["loss"]})
  with pytest.raises(ValueError, match="no 'loss'"):
    calibration.calibrated_path(model.apply, points, TS, {"eval": data["eval"]}, data["cal"],
                                data["bn"], objective=renamed)


def test_overflowing_statistics_are_refused(setup):
  model, points, data, _ = setup
  huge = [jax.tree.map(lambda v: v * 1e20, p) for p in points]
  with pytest.raises(finite.NonFiniteError, match="statistics at t = "):
    calibration.calibrated_path(model.apply, huge, TS, {"eval": data["eval"]}, data["cal"],
                                data["bn"])
