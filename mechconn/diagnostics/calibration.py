"""Calibrated barriers: how much of a loss barrier one softmax temperature per t removes.

A network in the middle of a path is often just miscalibrated: its argmax
(accuracy) is fine but its logits are too large or too small, and the
cross-entropy counts that. `calibrated_path` fits, at every t, one
temperature T(t) > 0 on held-out `calibration_batches` and reports each eval
set's metrics both raw and at outputs / T(t), so the loss barrier splits into
the part a temperature removes (`calibration_share`) and the part it cannot.

  T(t) = argmin_{T in temperature_range} L_cal(outputs(t) / T),

L_cal the objective's 'loss' as its exact weighted mean over the calibration
set (sum of w * loss / sum of w, the mask's weights, as every evaluation).

Design decisions:
  - Held-out data. T is fitted on `calibration_batches`, never on an eval set:
    a temperature fitted on the data it is scored on lowers that score by
    construction. Passing an eval set (the same object, or arrays equal to one)
    raises ValueError. Use a split of the training or validation data that the
    eval sets do not contain; the check cannot see partial overlap.
  - Logits only. It applies to objectives whose outputs are logits scored by a
    'loss' (classification, `objectives.next_token()`); the scaled metrics are
    the objective's own `metrics(outputs / T, batch)`. An objective without
    'loss' (regression) raises. Accuracy (the argmax) is unchanged by a
    positive T.
  - One search per t, exact to float32. The cross-entropy of z / T is
    -z_y / T + logsumexp(z / T), convex in beta = 1 / T (a logsumexp of
    functions linear in beta, minus a linear one), and a weighted sum of
    convex functions is convex; log T = -log beta is monotone, so L_cal is
    unimodal in log T and golden-section search over log T within
    `temperature_range` finds its minimum. `iterations` golden-section steps
    (one loss evaluation each; 60 shrink the bracket by 0.618^60 ~ 3e-13,
    below float32's resolution) then the best of the last two points, both
    bounds and T = 1 (clipped into the range): so T(t) at a bound is exact, and
    the calibrated loss on the calibration set is never above the raw one when
    1 lies in the range. The search compares float32 losses, so T(t) is fixed up
    to the band of temperatures whose loss equals the minimum to float32's
    resolution (about 0.1% of T on small sets: the loss is flat at its
    minimum); the calibrated loss itself is the minimum to float32.
  - Cheap per step. The network is formed once per t (`path_core.network_at`,
    statistics recomputed) and run once over the calibration set; its outputs
    are kept (memory: the calibration set's outputs, per t evaluated at once)
    and every step of the search re-scores them, without the network. Each
    eval batch is run once and scored raw and at 1 / T(t).
  - Bounds are reported, not hidden: `at_bound` [K] is True where T(t) lies
    within AT_BOUND_LOG_TOL (in log T, i.e. 0.1%) of a bound of the range, and
    `summary()` lists those t. The minimum may then lie outside the range.
  - The calibrated barrier can exceed the raw one (the end points gain from a
    temperature too, so the chord drops): `calibration_share` is then negative.
"""

from collections.abc import Mapping, Sequence
import functools

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np

from mechconn import finite
from mechconn import input_checks
from mechconn import objectives as objectives_lib
from mechconn import path_core
from mechconn import paths
from mechconn.objectives import Objective
from mechconn.path_core import PathEval
from mechconn.types import ApplyFn, Params, PathFn, StackedBatches

DEFAULT_TEMPERATURE_RANGE = (0.05, 20.0)
DEFAULT_ITERATIONS = 60
AT_BOUND_LOG_TOL = 1e-3  # |log T(t) - log bound| at most this: T(t) is at the bound
_INV_PHI = (np.sqrt(5.0) - 1.0) / 2.0  # 0.618..., the golden section's shrink factor


@flax.struct.dataclass
class CalibratedPath:
  """Raw and temperature-calibrated metrics along a path (arrays over the t axis).

  Attributes:
    ts: [K] the grid.
    temperature: [K] T(t), fitted on the calibration set.
    at_bound: [K] bool, T(t) within AT_BOUND_LOG_TOL (log T) of a bound of
      `temperature_range` (the unconstrained minimum may lie beyond it).
    calibration_loss: [K] the calibration set's loss at outputs / T(t).
    calibration_loss_raw: [K] the calibration set's loss at T = 1.
    raw: {eval set: PathEval} of the objective's metrics (as `path_metrics`).
    calibrated: {eval set: PathEval} of the metrics of outputs / T(t).
    temperature_range: the (low, high) searched.
  """

  ts: jax.Array
  temperature: jax.Array
  at_bound: jax.Array
  calibration_loss: jax.Array
  calibration_loss_raw: jax.Array
  raw: dict[str, PathEval]
  calibrated: dict[str, PathEval]
  temperature_range: tuple[float, float] = flax.struct.field(
      pytree_node=False, default=DEFAULT_TEMPERATURE_RANGE)

  def summary(self) -> dict[str, dict]:
    """{eval set: barriers raw and calibrated, and the temperatures}, JSON-able.

    Per set: 'loss' (the raw loss barrier) and 'loss_t', 'calibrated_loss'
    and 'calibrated_loss_t' (the barrier of the calibrated loss curve),
    'calibration_share' = (raw - calibrated) / raw (None when the raw barrier
    is 0), the raw summary's other barriers ('error', 'error_t'; a temperature
    leaves them unchanged), 'temperature_max', 'temperature_min',
    'temperature_at_barrier' (T at the raw loss barrier's t) and
    'temperature_at_bound_t' (the t where T(t) hit a bound of the range).
    """
    ts = np.asarray(jax.device_get(self.ts))
    temperature = np.asarray(jax.device_get(self.temperature), np.float64)
    at_bound = np.asarray(jax.device_get(self.at_bound))
    out = {}
    for name, raw in self.raw.items():
      raw_summary, calibrated_summary = raw.summary(), self.calibrated[name].summary()
      raw_barrier, calibrated_barrier = raw_summary["loss"], calibrated_summary["loss"]
      out[name] = {
          **raw_summary, "calibrated_loss": calibrated_barrier,
          "calibrated_loss_t": calibrated_summary["loss_t"],
          "calibration_share": (None if raw_barrier == 0
                                else (raw_barrier - calibrated_barrier) / raw_barrier),
          "temperature_max": float(temperature.max()),
          "temperature_min": float(temperature.min()),
          "temperature_at_barrier": float(temperature[_barrier_index(ts, raw.loss)]),
          "temperature_at_bound_t": [float(t) for t in ts[at_bound]]}
    return out


def _barrier_index(ts: np.ndarray, values) -> int:
  """The index of the t at which `path_core.barrier_height` is reached."""
  values = np.asarray(jax.device_get(values), np.float64)
  return int(np.argmax(values - ((1 - ts) * values[0] + ts * values[-1])))


def golden_section_min(f, low: jax.Array, high: jax.Array, iterations: int,
                       candidates: Sequence[jax.Array] = ()) -> tuple[jax.Array, jax.Array]:
  """(x, f(x)): the minimum of a unimodal `f` on [low, high] by golden-section search.

  `iterations` steps of one evaluation each, then the best of both bounds, the
  `candidates` and the last two interior points (first on ties, so a minimum at
  a bound is returned exactly). Jittable and vmappable (no data-dependent
  control flow).
  """
  def step(_, state):
    a, b, c, d, fc, fd = state
    left = fc <= fd  # the minimum lies in [a, d]: d becomes the right end, c the new d
    a, b = jnp.where(left, a, c), jnp.where(left, d, b)
    x = jnp.where(left, b - _INV_PHI * (b - a), a + _INV_PHI * (b - a))
    fx = f(x)
    return (a, b, jnp.where(left, x, d), jnp.where(left, c, x),
            jnp.where(left, fx, fd), jnp.where(left, fc, fx))

  c, d = high - _INV_PHI * (high - low), low + _INV_PHI * (high - low)
  _, _, c, d, fc, fd = jax.lax.fori_loop(0, iterations, step, (low, high, c, d, f(c), f(d)))
  ends = [low, high, *candidates]
  xs = jnp.stack([*ends, c, d])
  values = jnp.stack([*(f(x) for x in ends), fc, fd])
  best = jnp.argmin(values)
  return xs[best], values[best]


def _outputs(apply_fn, variables, batches, objective):
  """The model's outputs on every batch, stacked [N, ...] (inference mode)."""
  return jax.lax.map(lambda batch: apply_fn(variables, objective.inputs_of(batch), train=False),
                     batches)


def _mean_loss(objective, outputs_N, batches, temperature):
  """The objective's exact weighted mean 'loss' of outputs / temperature over stacked batches."""
  sums = jax.vmap(lambda out, batch: objectives_lib.weighted_sums(
      objective, out / temperature, batch))(outputs_N, batches)
  return jnp.sum(sums["loss"]) / jnp.sum(sums[objectives_lib.WEIGHT])


def _fit_temperature(objective, outputs_N, batches, log_range, iterations):
  """{'temperature', 'at_bound', 'calibration_loss', 'calibration_loss_raw'} at one t."""
  def loss_at(log_t):
    return _mean_loss(objective, outputs_N, batches, jnp.exp(log_t))

  low, high = log_range[0], log_range[1]
  log_t, loss = golden_section_min(loss_at, low, high, iterations,
                                   candidates=(jnp.clip(0.0, low, high),))  # T = 1
  return {"temperature": jnp.exp(log_t),
          "at_bound": jnp.minimum(log_t - low, high - log_t) <= AT_BOUND_LOG_TOL,
          "calibration_loss": loss, "calibration_loss_raw": loss_at(jnp.zeros(()))}


def _means(totals):
  count = totals[objectives_lib.WEIGHT]
  return {name: total / count for name, total in totals.items()
          if name != objectives_lib.WEIGHT}


def _raw_and_calibrated_means(apply_fn, variables, batches, objective, temperature):
  """({metric: mean}, {metric: mean at outputs / temperature}): one network pass per batch."""
  def sums(batch):
    outputs = apply_fn(variables, objective.inputs_of(batch), train=False)
    return (objectives_lib.weighted_sums(objective, outputs, batch),
            objectives_lib.weighted_sums(objective, outputs / temperature, batch))

  first = jax.tree.map(lambda x: x[0], batches)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(sums, first))
  totals, _ = jax.lax.scan(lambda acc, batch: (jax.tree.map(jnp.add, acc, sums(batch)), None),
                           zeros, batches)
  return _means(totals[0]), _means(totals[1])


_STATIC = ("apply_fn", "path_fn", "strategy", "chunk_size", "renormalize", "objective",
           "iterations")


@functools.partial(jax.jit, static_argnames=_STATIC)
def calibrated_path_jit(points, ts, eval_sets, calibration_batches, bn_batches, log_range, *,
                        apply_fn, path_fn, strategy, chunk_size, renormalize, objective,
                        iterations):
  """Per t: (fit, {set: raw means}, {set: calibrated means}, stats finite, stats vary).

  The pure core of `calibrated_path`, one compiled program over t; `log_range`
  is [log low, log high] of the temperature range.
  """
  targets = path_core.repair_targets(apply_fn, points, bn_batches, renormalize, objective.inputs)

  def at(t):  # the network once per t, shared by the calibration set and every eval set
    variables, stats = path_core.network_at(apply_fn, path_fn(points, t), t, bn_batches,
                                            renormalize=renormalize, inputs=objective.inputs,
                                            targets=targets)
    outputs = _outputs(apply_fn, variables, calibration_batches, objective)
    fit = _fit_temperature(objective, outputs, calibration_batches, log_range, iterations)
    evals = {name: _raw_and_calibrated_means(apply_fn, variables, batches, objective,
                                             fit["temperature"])
             for name, batches in eval_sets.items()}
    return (fit, {name: e[0] for name, e in evals.items()},
            {name: e[1] for name, e in evals.items()},
            finite.all_finite(stats), input_checks.statistics_vary(stats))

  return path_core.map_over(at, ts, strategy, chunk_size)


def calibrated_path(apply_fn: ApplyFn, points: Sequence[Params], ts: chex.Array,
                    eval_sets: Mapping[str, StackedBatches],
                    calibration_batches: StackedBatches,
                    bn_batches: StackedBatches | None = None, *,
                    objective: Objective = path_core.CLASSIFICATION,
                    path: str | PathFn = "linear", renormalize: str | None = "auto",
                    strategy: str | None = None, chunk_size: int = path_core.DEFAULT_CHUNK_SIZE,
                    temperature_range: tuple[float, float] = DEFAULT_TEMPERATURE_RANGE,
                    iterations: int = DEFAULT_ITERATIONS) -> CalibratedPath:
  """Each eval set's metrics along a path, raw and after one fitted temperature per t; checked.

  At every t: T(t) = argmin over `temperature_range` of the calibration set's
  loss of outputs / T (golden-section search over log T, exact for this convex
  problem: see the module docstring), then every eval set's metrics raw and at
  outputs / T(t). All t in one compiled program (`calibrated_path_jit`).

  The arguments it shares with `path_core.path_metrics` mean what they mean there.

  Args:
    calibration_batches: held-out stacked batches in the objective's format on
      which T(t) is fitted; never an eval set (raises ValueError).
    temperature_range: (low, high), 0 < low < high: the temperatures searched.
    iterations: golden-section steps (>= 1), one calibration loss each.

  Returns:
    CalibratedPath (`.summary()`: the barriers raw and calibrated, the temperatures).

  Raises:
    ValueError: calibration_batches equal to an eval set, a bad range or
      iteration count, an objective without 'loss', and the input checks of
      `barriers.evaluate_path`.
    finite.NonFiniteError: non-finite statistics, temperatures or metrics.

  Example:
    >>> result = calibrated_path(model.apply, (params_a, params_b), np.linspace(0, 1, 11),
    ...                          {"test": test_batches}, val_batches, bn_batches)
    >>> test = result.summary()["test"]; test["calibration_share"]
  """
  points = path_core.check_points(points, where := "calibrated_path")
  paths.check_matching(points)
  ts = path_core.check_grid(ts)
  low, high = check_temperature_range(temperature_range)
  iterations = check_iterations(iterations)
  resolved, path_fn, strategy, renormalize = path_core.resolve(
      apply_fn, points, eval_sets, bn_batches, objective=objective, path=path,
      renormalize=renormalize, strategy=strategy, where=where)
  _check_data(apply_fn, points, eval_sets, calibration_batches,
              bn_batches if renormalize else None, objective)
  ts_arr = jnp.asarray(ts, jnp.float32)
  fit, raw, calibrated, stats_finite, stats_vary = calibrated_path_jit(
      points, ts_arr, dict(eval_sets), calibration_batches, bn_batches if renormalize else None,
      jnp.log(jnp.asarray([low, high], jnp.float32)), apply_fn=resolved, path_fn=path_fn,
      strategy=strategy, chunk_size=int(chunk_size), renormalize=renormalize,
      objective=objective, iterations=iterations)
  _check_results(ts, fit, {"raw": raw, "calibrated": calibrated}, stats_finite)
  return CalibratedPath(
      ts=ts_arr, **fit, temperature_range=(low, high),
      raw=path_core.path_evals(ts_arr, raw, stats_finite, stats_vary, objective),
      calibrated=path_core.path_evals(ts_arr, calibrated, stats_finite, stats_vary, objective))


def check_temperature_range(temperature_range) -> tuple[float, float]:
  """(low, high) as floats; ValueError unless 0 < low < high, both finite."""
  try:
    low, high = (float(x) for x in temperature_range)
  except (TypeError, ValueError) as e:
    raise ValueError("temperature_range must be (low, high), two positive numbers; got "
                     f"{temperature_range!r}.") from e
  if not (np.isfinite(low) and np.isfinite(high) and 0 < low < high):
    raise ValueError("temperature_range must be (low, high) with 0 < low < high, both finite; "
                     f"got {temperature_range!r}.")
  return low, high


def check_iterations(iterations) -> int:
  """`iterations` as an int; ValueError unless it is an integer >= 1."""
  if isinstance(iterations, bool) or not isinstance(iterations, int | np.integer) or (
      iterations < 1):
    raise ValueError(f"iterations must be an integer >= 1 (golden-section steps); got "
                     f"{iterations!r}.")
  return int(iterations)


def _same_data(a, b) -> bool:
  """Whether two batch trees hold equal concrete arrays (False if any is a tracer)."""
  if a is b:
    return True
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  if jax.tree.structure(a) != jax.tree.structure(b) or any(
      isinstance(x, jax.core.Tracer) for x in leaves_a + leaves_b):
    return False
  return all(np.shape(x) == np.shape(y) and np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(leaves_a, leaves_b))


def _check_data(apply_fn, points, eval_sets, calibration_batches, bn_batches, objective):
  """The batches' formats, the calibration set held out and scored by a 'loss', the inputs."""
  for name, batches in eval_sets.items():
    input_checks.check_batches(batches, f"eval set {name!r}", objective)
  input_checks.check_batches(calibration_batches, "calibration_batches", objective)
  if bn_batches is not None:
    input_checks.check_batches(bn_batches, "bn_batches", objective, weighted=False)
  for name, batches in eval_sets.items():
    if _same_data(batches, calibration_batches):
      raise ValueError(
          f"calibrated_path: calibration_batches is the eval set {name!r}; fit the "
          "temperature on held-out data that no eval set contains (a validation split): a "
          "temperature fitted on the set it is scored on lowers that score by construction.")
  metrics = jax.eval_shape(
      lambda p, b: objective.metrics(apply_fn({"params": p}, objective.inputs_of(b), train=True,
                                              mutable=["batch_stats"])[0], b),
      points[0], jax.tree.map(lambda x: x[0], calibration_batches))
  if "loss" not in metrics:
    raise ValueError(f"calibrated_path: objective {objective.name!r} has metrics "
                     f"{sorted(metrics)} but no 'loss'; a temperature is fitted to the 'loss' of "
                     "logits (classification, objectives.next_token()).")
  named_points = {f"the parameters of path point {i} of {len(points)} (point 0 is t = 0)": p
                  for i, p in enumerate(points)}
  input_checks.check_inputs(apply_fn, named_points,
                            {**eval_sets, "calibration_batches": calibration_batches},
                            bn_batches, objective, where="calibrated_path")
  input_checks.warn_if_identical_ends(points, "calibrated_path")


def _check_results(ts: np.ndarray, fit: dict, metrics: dict, stats_finite) -> None:
  """Raises NonFiniteError naming the t where statistics, temperatures or metrics are not finite."""
  def at(bad):
    return " at t = " + ", ".join(f"{t:.3g}" for t in ts[bad])

  stats_finite = np.asarray(jax.device_get(stats_finite))
  flags = {}
  if not stats_finite.all():
    flags["the recomputed statistics" + at(~stats_finite) + " (the activations overflow)"] = False
  for name, values in jax.device_get(fit).items():
    bad = ~np.isfinite(np.asarray(values, np.float64))
    if bad.any():
      flags[f"the {name}" + at(bad)] = False
  for kind, sets in jax.device_get(metrics).items():
    for name, means in sets.items():
      for metric, values in means.items():
        bad = ~np.isfinite(np.asarray(values))
        if bad.any():
          flags[f"the {kind} {metric} on {name!r}" + at(bad)] = False
  finite.raise_if_any(flags, "Calibrated path evaluation")
