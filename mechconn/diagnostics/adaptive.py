"""The maximum of a barrier curve to a stated tolerance, with few evaluations.

A barrier is the maximum over t in [0, 1] of the barrier curve

  v(t) = m(t) - ((1 - t) m(0) + t m(1)),

a metric m (loss, or error = 1 - accuracy) above its chord. A fixed grid of
101 t spends most of its evaluations where v is far below its maximum.
`certified_maximum` evaluates m in rounds, each at the few t that could still
hide a higher value, and stops when no interval can.

What is assumed: |v''| <= M on [0, 1] (v is twice differentiable: true of the
loss of a smooth network along a smooth path; the error of a finite eval set is
a step function, smooth only at the scale of its steps, 1 / number of
examples). M is estimated each round as `safety` x the largest absolute second
divided difference ever seen between neighbouring evaluated points (never
below `min_curvature`). Each such divided difference equals v''(xi) at some xi
(mean value theorem), so it is a lower bound of sup |v''|: the estimate is an
extrapolation, not a proof. `safety` is the margin it allows; a curve with a
narrow spike between evaluated points (curvature the divided differences never
see) can be missed, with `certified` True.

What is guaranteed: if |v''| <= M (the `curvature_bound` returned), then
between neighbouring evaluated points t_i < t_j

  v(t) <= v_i + (v_j - v_i) (t - t_i) / (t_j - t_i) + M (t - t_i)(t_j - t) / 2,

so the sup of v over [0, 1] is at most `upper_bound`, the largest of these
bounds' maxima; with `certified` True, `upper_bound` <= `value` + tol, hence

  value <= sup_[0, 1] v <= value + tol

(`value` is the largest evaluated v: a value v takes, exact up to the metric's
own rounding). Without the assumption only value <= sup v holds.

Each round splits the `per_round` intervals of highest upper bound (among
those above best + tol) at the t where their bound peaks, clamped to the
interval's middle half: no two points come arbitrarily close, where float
rounding in m would dominate the divided differences (and M).

`adaptive_barrier` runs it on a path: each round one compiled program of the
path core (`path_core.evaluate_path_jit`) with BatchNorm (or REPAIR)
statistics recomputed at every t; rounds are padded to `per_round` t, so the
program compiles once for the initial grid and once for every round.
"""

from collections.abc import Callable, Sequence
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mechconn import finite
from mechconn import input_checks
from mechconn import path_core
from mechconn import paths
from mechconn.objectives import Objective
from mechconn.types import ApplyFn, Params, PathFn, StackedBatches

CLASSIFICATION = path_core.CLASSIFICATION
# Intervals narrower than this are never split (their points would be closer than float32 t).
MIN_WIDTH = 1e-6


@dataclasses.dataclass(frozen=True)
class Maximum:
  """The maximum of a barrier curve, and how far it is certified.

  Attributes:
    t: where the best evaluated barrier value sits.
    value: the best evaluated barrier value, max_i v(t_i) (>= 0: v(0) = v(1) = 0).
    upper_bound: the largest upper bound of v over the intervals between
      evaluated points, under |v''| <= curvature_bound (>= value).
    curvature_bound: M, the bound on |v''| the upper bound assumes.
    certified: upper_bound <= value + tol (False: max_evaluations ran out).
    tol: the tolerance asked for.
    ts: [N] every t evaluated, sorted (0 first, 1 last).
    values: [N] the barrier curve v at `ts`.
    metric_values: [N] the metric m at `ts` (v = m - chord).
    num_evaluations: N, the number of t evaluated (forward passes over the eval set).
    num_rounds: calls of `evaluate` (the initial grid is round 1).
  """

  t: float
  value: float
  upper_bound: float
  curvature_bound: float
  certified: bool
  tol: float
  ts: np.ndarray
  values: np.ndarray
  metric_values: np.ndarray
  num_evaluations: int
  num_rounds: int

  def summary(self) -> dict:
    """A JSON-able dict of every field (arrays as lists of floats)."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    for name in ("ts", "values", "metric_values"):
      out[name] = [float(x) for x in out[name]]
    for name in ("t", "value", "upper_bound", "curvature_bound", "tol"):
      out[name] = float(out[name])
    out["certified"] = bool(out["certified"])
    return out


def second_divided_differences(ts: np.ndarray, values: np.ndarray) -> np.ndarray:
  """[N - 2] v[t_i, t_(i+1), t_(i+2)] x 2: each equals v''(xi) at some xi in the triple's span."""
  slopes = np.diff(values) / np.diff(ts)
  return 2.0 * np.diff(slopes) / (ts[2:] - ts[:-2])


def interval_bounds(ts: np.ndarray, values: np.ndarray, curvature: float
                    ) -> tuple[np.ndarray, np.ndarray]:
  """([N - 1] upper bound of v on each interval, [N - 1] the t where it is reached).

  On [a, b] (h = b - a, d = v(b) - v(a)) the bound v(a) + d (t - a) / h +
  M (t - a)(b - t) / 2 peaks at t = (a + b) / 2 + d / (M h) with value
  (v(a) + v(b)) / 2 + M h^2 / 8 + d^2 / (2 M h^2) when |d| < M h^2 / 2, and at
  the higher end point otherwise.
  """
  h = np.diff(ts)
  left, right = values[:-1], values[1:]
  d = right - left
  interior = curvature * h**2 / 2 > np.abs(d)
  m = np.where(interior, curvature, 1.0)  # no division by zero where the end point wins
  peak_value = (left + right) / 2 + m * h**2 / 8 + d**2 / (2 * m * h**2)
  bounds = np.where(interior, peak_value, np.maximum(left, right))
  ends = np.where(d >= 0, ts[1:], ts[:-1])
  peaks = np.where(interior, (ts[:-1] + ts[1:]) / 2 + d / (m * h), ends)
  return bounds, peaks


def _check_arguments(tol, initial, per_round, safety, min_curvature, max_evaluations) -> None:
  """ValueError naming the first argument out of its range."""
  checks = [("tol", tol, tol > 0, "> 0"), ("initial", initial, initial >= 3, ">= 3"),
            ("per_round", per_round, per_round >= 1, ">= 1"),
            ("safety", safety, safety >= 1, ">= 1 (below 1, M is under a known lower bound "
             "of sup |v''|)"),
            ("min_curvature", min_curvature, min_curvature >= 0, ">= 0"),
            ("max_evaluations", max_evaluations, max_evaluations >= initial,
             f">= initial ({initial})")]
  for name, value, ok, expected in checks:
    is_int = name in ("initial", "per_round", "max_evaluations")
    if is_int and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
      raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r}).")
    if not is_int and (not np.isscalar(value) or not np.isfinite(value)):
      raise ValueError(f"{name} must be a finite number, got {value!r}.")
    if not ok:
      raise ValueError(f"{name} must be {expected}, got {value!r}.")


def _evaluated(evaluate: Callable, ts: np.ndarray) -> np.ndarray:
  """m at `ts` from the caller's `evaluate`, checked: one finite value per t."""
  out = np.asarray(evaluate(ts.copy()), np.float64)
  if out.shape != ts.shape:
    raise ValueError(f"evaluate returned shape {out.shape} for {len(ts)} t; expected "
                     f"{ts.shape} (one metric value per t).")
  if not np.all(np.isfinite(out)):
    raise finite.NonFiniteError(
        "certified_maximum: evaluate returned NaN or infinity at t = "
        + ", ".join(f"{t:.4g}" for t in ts[~np.isfinite(out)]) + "; no maximum is reported "
        "from non-finite numbers.")
  return out


def _next_points(ts, bounds, peaks, threshold, count) -> np.ndarray:
  """The peaks of the `count` highest bounds above `threshold`, clamped to the middle half."""
  h = np.diff(ts)
  open_ = np.flatnonzero((bounds > threshold) & (h > MIN_WIDTH))
  chosen = open_[np.argsort(-bounds[open_], kind="stable")[:count]]
  quarter = h[chosen] / 4
  return np.sort(np.clip(peaks[chosen], ts[chosen] + quarter, ts[chosen + 1] - quarter))


def certified_maximum(evaluate: Callable[[np.ndarray], np.ndarray], *, tol: float = 0.01,
                      initial: int = 5, per_round: int = 4, safety: float = 2.0,
                      min_curvature: float = 0.0, max_evaluations: int = 101) -> Maximum:
  """The maximum of the barrier curve of a metric, to within `tol` (module docstring: what holds).

  The curve is v(t) = m(t) - ((1 - t) m(0) + t m(1)); the first round
  evaluates m on np.linspace(0, 1, initial), every later round at most
  `per_round` new t. Stops when the highest upper bound is <= the best value
  + tol (certified, checked after every round), or uncertified when
  `max_evaluations` t have been evaluated (the last round shortened to fit)
  or every open interval is narrower than MIN_WIDTH.

  Args:
    evaluate: ts [n] (new points in [0, 1], float64) -> m at ts [n]. One call
      is one round.
    tol: the certificate's tolerance, > 0, in the metric's units.
    initial: points of the first grid (0 and 1 among them), >= 3.
    per_round: intervals split per round (t per later call), >= 1.
    safety: M = safety x the largest |second divided difference| seen, >= 1.
    min_curvature: a floor for M (set it to a known bound on |v''|).
    max_evaluations: most t evaluated in all, >= initial.

  Returns:
    Maximum: the best evaluated value, where, its certified upper bound, the
    points evaluated and the counts.

  Example:
    >>> result = certified_maximum(lambda ts: np.sin(np.pi * ts), tol=1e-3)
    >>> result.value, result.certified         # (~1.0, True)
  """
  _check_arguments(tol, initial, per_round, safety, min_curvature, max_evaluations)
  ts = np.linspace(0.0, 1.0, initial)
  metric = _evaluated(evaluate, ts)
  num_rounds, seen_curvature = 1, 0.0
  while True:
    chord = (1 - ts) * metric[0] + ts * metric[-1]
    values = metric - chord
    seen_curvature = max(seen_curvature,
                         float(np.max(np.abs(second_divided_differences(ts, values)))))
    curvature = max(float(min_curvature), safety * seen_curvature)
    bounds, peaks = interval_bounds(ts, values, curvature)
    best = int(np.argmax(values))
    certified = bool(bounds.max() <= values[best] + tol)
    budget = min(per_round, max_evaluations - len(ts))
    new = (np.empty(0) if certified or budget <= 0
           else _next_points(ts, bounds, peaks, values[best] + tol, budget))
    if new.size == 0:
      return Maximum(t=float(ts[best]), value=float(values[best]),
                     upper_bound=float(bounds.max()), curvature_bound=curvature,
                     certified=certified, tol=float(tol), ts=ts, values=values,
                     metric_values=metric, num_evaluations=len(ts), num_rounds=num_rounds)
    new_metric = _evaluated(evaluate, new)
    num_rounds += 1
    order = np.argsort(np.concatenate([ts, new]), kind="stable")
    ts, metric = np.concatenate([ts, new])[order], np.concatenate([metric, new_metric])[order]


# --- On a path. -----------------------------------------------------------------------


def _check_round(ts, metrics, stats_finite, stats_vary, renormalize, first: bool) -> None:
  """Raises where statistics or a metric are not finite, or an end point's layer is constant."""
  kind = "REPAIR" if renormalize == "repair" else "BatchNorm"
  stats_finite = np.asarray(stats_finite)
  flags = {f"the recomputed {kind} statistics at t = {t:.4g}": False
           for t in ts[~stats_finite]}
  for name, values in metrics.items():  # every metric: a NaN loss voids the accuracy beside it
    flags.update({f"the {name} at t = {t:.4g}": False
                  for t in ts[~np.isfinite(np.asarray(values))]})
  finite.raise_if_any(flags, "adaptive_barrier")
  if first:  # the end points are in the first round only
    constant = [layer for layer, vary in stats_vary.items()
                if not (np.asarray(vary)[0] and np.asarray(vary)[-1])]
    if constant:
      raise ValueError(f"adaptive_barrier refused: the statistics data (bn_batches) give zero "
                       f"variance at {kind} layer(s) {constant} of an end point: every unit "
                       "is constant over those inputs; pass real training inputs as bn_batches.")


def _barrier_names(statics, objective, args) -> list[str]:
  """The names `PathEval.barrier_curves` gives the objective's metrics (traced, not run)."""
  def curves(*a):
    out, stats_finite, stats_vary = path_core.evaluate_path_jit(*a, **statics)
    evals = path_core.path_evals(a[1], out, stats_finite, stats_vary, objective)
    return evals["eval"].barrier_curves()
  return sorted(jax.eval_shape(curves, *args))


def _checked_inputs(apply_fn, points, eval_batches, bn_batches, objective) -> None:
  """The checks `barriers.evaluate_path` makes before evaluating (data read once)."""
  input_checks.check_batches(eval_batches, "eval_batches", objective)
  if bn_batches is not None:
    input_checks.check_batches(bn_batches, "bn_batches", objective, weighted=False)
  named = {f"the parameters of path point {i} of {len(points)} (point 0 is t = 0)": p
           for i, p in enumerate(points)}
  input_checks.check_inputs(apply_fn, named, {"eval": eval_batches}, bn_batches, objective,
                            where="adaptive_barrier")
  input_checks.warn_if_identical_ends(points, "adaptive_barrier")


def _path_evaluator(points, eval_batches, bn_batches, statics, objective, metric, per_round):
  """evaluate(ts) for `certified_maximum`: one compiled path-core program per round."""
  sets, first = {"eval": eval_batches}, [True]

  def evaluate(ts: np.ndarray) -> np.ndarray:
    # Pad short rounds to `per_round` t (repeats of the last t, dropped after): the rounds
    # then share one compiled program (the initial grid has its own).
    size = len(ts) if first[0] else per_round
    padded = np.concatenate([ts, np.full(size - len(ts), ts[-1])])
    ts_arr = jnp.asarray(padded, jnp.float32)
    out, stats_finite, stats_vary = path_core.evaluate_path_jit(
        points, ts_arr, sets, bn_batches, **statics)
    evals = path_core.path_evals(ts_arr, out, stats_finite, stats_vary, objective)
    metrics, curves, stats_finite, stats_vary = jax.device_get(
        (evals["eval"].metrics, evals["eval"].barrier_curves(), stats_finite, stats_vary))
    _check_round(padded, metrics, stats_finite, stats_vary, statics["renormalize"], first[0])
    curve = np.asarray(curves[metric], np.float64)
    first[0] = False
    return curve[:len(ts)]

  return evaluate


def adaptive_barrier(apply_fn: ApplyFn, points: Sequence[Params], eval_batches: StackedBatches,
                     bn_batches: StackedBatches | None = None, *, metric: str = "loss",
                     objective: Objective = CLASSIFICATION, path: str | PathFn = "linear",
                     renormalize: str | None = "auto", strategy: str | None = None,
                     chunk_size: int = path_core.DEFAULT_CHUNK_SIZE, tol: float = 0.01,
                     initial: int = 5, per_round: int = 4, safety: float = 2.0,
                     min_curvature: float = 0.0, max_evaluations: int = 101) -> Maximum:
  """The barrier of `metric` along a path, to within `tol`, by `certified_maximum`.

  Each round evaluates the metric at that round's t (every t of it in one
  compiled program of the path core, statistics recomputed at each t, as
  `barriers.evaluate_path`); the barrier curve is the metric's rise above its
  chord, `PathEval.barrier_curves` naming: for classification 'loss', or
  'error' (1 - accuracy). What the result guarantees and assumes: the module
  docstring.

  The arguments it shares with `path_core.path_metrics` mean what they mean there.

  Args:
    eval_batches: one eval set, stacked [num_batches, batch_size, ...].
    metric: a barrier curve's name ('loss' or 'error' for classification).
    tol, initial, per_round, safety, min_curvature, max_evaluations: as
      `certified_maximum`.

  Returns:
    Maximum: the barrier (`value`), where (`t`), `upper_bound`, `certified`,
    the t evaluated and the metric there (`metric_values`).

  Raises:
    ValueError: bad arguments or data (as `barriers.evaluate_path`), an
      unknown metric (the valid names listed).
    finite.NonFiniteError: NaN or infinity in the inputs, the statistics or
      the metric at some t.

  Example:
    >>> result = adaptive_barrier(model.apply, (params_a, params_b), eval_batches, bn_batches)
    >>> result.value, result.certified, result.num_evaluations
  """
  _check_arguments(tol, initial, per_round, safety, min_curvature, max_evaluations)
  points = path_core.check_points(points, "adaptive_barrier")
  paths.check_matching(points)
  fn, path_fn, strategy, renormalize = path_core.resolve(
      apply_fn, points, {"eval": eval_batches}, bn_batches, objective=objective, path=path,
      renormalize=renormalize, strategy=strategy, where="adaptive_barrier")
  _checked_inputs(apply_fn, points, eval_batches, bn_batches, objective)
  statics = dict(apply_fn=fn, path_fn=path_fn, strategy=strategy, chunk_size=int(chunk_size),
                 renormalize=renormalize, objective=objective)
  placed = jax.device_put((points, eval_batches, bn_batches if renormalize else None))
  names = _barrier_names(statics, objective, (placed[0], jnp.zeros(initial, jnp.float32),
                                              {"eval": placed[1]}, placed[2]))
  if metric not in names:
    raise ValueError(f"Unknown metric {metric!r} for objective {objective.name!r}; its "
                     f"barrier curves are {names}.")
  evaluate = _path_evaluator(*placed, statics, objective, metric, per_round)
  return certified_maximum(evaluate, tol=tol, initial=initial, per_round=per_round,
                           safety=safety, min_curvature=min_curvature,
                           max_evaluations=max_evaluations)
