"""The pure path core: an objective's metrics at every t of a path, in one compiled program.

`path_metrics` forms, for each t of a grid, the parameters on the path,
recomputes BatchNorm (or REPAIR) statistics from data, and scans each eval set
for the exact weighted means of an objective's metrics. It is a pure function
of arrays (jit, grad, vmap); `barriers.evaluate_path` is the checked, eager
entry point on top of it. `PathEval` holds the curves and their barriers
(`barrier_height`, `barrier_location`).

The loop over t is a `strategy`:
  - 'map': sequential `lax.map` (one parameter copy live at a time);
  - 'chunked': `lax.map(..., batch_size=chunk_size)`, vmap inside chunks;
  - 'vmap': all t at once (memory grows with the number of t; on CPU, vmap of a
    conv net over t becomes grouped convolutions and is several times slower).
The default per backend is the fastest in benchmarks/path_eval.py. Every
strategy but 'vmap' keeps `chunk_size` (or one) parameter copies live, so peak
memory does not grow with the number of t (benchmarks/path_scaling.py).
"""

from collections.abc import Mapping, Sequence
import functools

import chex
import flax
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from mechconn import batchnorm
from mechconn import evaluation
from mechconn import finite
from mechconn import input_checks
from mechconn import mesh as mesh_lib
from mechconn import objectives as objectives_lib
from mechconn import paths
from mechconn import repair
from mechconn.objectives import Objective
from mechconn.types import ApplyFn, Params, PathFn, StackedBatches

STRATEGIES = ("map", "chunked", "vmap")
# Per backend, chosen by benchmarks/path_eval.py (its numbers: docs/performance.md and
# docs/accelerators.md): 'map' is one program whose memory stays flat in the number of t; on
# XLA:CPU it beats 'vmap' several-fold. TPU is unmeasured.
DEFAULT_STRATEGY = {"cpu": "map", "gpu": "map", "tpu": "map"}
DEFAULT_CHUNK_SIZE = 4
BATCHNORM = ("batchnorm", "batchnorm_unbiased")  # recomputed statistics (batchnorm module)
RENORMALIZE = ("auto", *BATCHNORM, "repair", None)
CLASSIFICATION = objectives_lib.CLASSIFICATION


@flax.struct.dataclass
class PathEval:
  """An objective's metrics at every t of a grid (arrays over the t axis).

  Attributes:
    ts: [K] the grid.
    metrics: {metric: [K]} exact means over the eval set at each t (for
      classification 'loss' and 'accuracy').
    statistics_finite: [K] bool, whether the recomputed BatchNorm / REPAIR
      statistics at each t were finite (all True without renormalisation).
      `evaluate_path` raises where one is False; under your own `jax.jit`,
      check it yourself.
    statistics_vary: {layer: [K] bool}, for each BatchNorm layer (or REPAIR
      site) whether some unit of the statistics it is normalised to at t
      varies (`input_checks.statistics_vary`); {} without renormalisation.
      False at t = 0 or 1 means the statistics data were constant there (e.g.
      all-zero images) and the layer outputs a constant at every t;
      `evaluate_path` raises then (inside the path a layer may collapse).
    higher_is_better, complements: the objective's (see `objectives.Objective`).
    sharded_over, num_devices: how `evaluate_path` spread the work.

  `loss`, `accuracy` and `error` read the metrics of those names
  (`error` = 1 - accuracy).
  """

  ts: jax.Array
  metrics: dict[str, jax.Array]
  statistics_finite: jax.Array | None = None
  statistics_vary: dict[str, jax.Array] | None = None
  higher_is_better: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())
  complements: tuple[tuple[str, str], ...] = flax.struct.field(pytree_node=False, default=())
  sharded_over: str = flax.struct.field(pytree_node=False, default="none")  # SHARDED_OVER
  num_devices: int = flax.struct.field(pytree_node=False, default=1)

  @classmethod
  def classification(cls, ts, loss, accuracy, **kwargs) -> "PathEval":
    """A PathEval of classification's 'loss' and 'accuracy' (e.g. from a record)."""
    return cls(ts=ts, metrics={"loss": loss, "accuracy": accuracy},
               higher_is_better=CLASSIFICATION.higher_is_better,
               complements=CLASSIFICATION.complements, **kwargs)

  def _metric(self, name: str) -> jax.Array:
    if name not in self.metrics:
      raise AttributeError(f"This path was evaluated with metrics {sorted(self.metrics)}; it "
                           f"has no {name!r}.")
    return self.metrics[name]

  @property
  def loss(self) -> jax.Array:
    return self._metric("loss")

  @property
  def accuracy(self) -> jax.Array:
    return self._metric("accuracy")

  @property
  def error(self) -> jax.Array:
    return 1.0 - self._metric("accuracy")

  def barrier_curves(self) -> dict[str, jax.Array]:
    """{barrier name: [K] curve whose rise above its chord is the barrier}.

    Lower-is-better metrics as they are; a higher-is-better metric with a
    complement as 1 - metric under the complement's name ('error'); one
    without, negated (its barrier is its drop below the chord).
    """
    return barrier_curves(self.metrics, self.higher_is_better, self.complements)

  def summary(self) -> dict[str, float]:
    """The barriers and where they sit: {name: height, name + '_t': t of the maximum}.

    For classification {'loss', 'loss_t', 'error', 'error_t'}: 'loss' is the
    loss barrier and 'error' the error (accuracy) barrier (`barrier_height`),
    '*_t' the t of each maximum (`barrier_location`); every metric of other
    objectives likewise (see `barrier_curves`). The one summary of a path:
    tasks record it and the Definition 5 verdict (`counterfactual.path_verdict`)
    judges it.
    """
    ts = np.asarray(jax.device_get(self.ts))
    out = {}
    for name, curve in self.barrier_curves().items():
      values = np.asarray(jax.device_get(curve))
      out[name] = float(barrier_height(ts, values))
      out[f"{name}_t"] = barrier_location(ts, values)
    return out


def barrier_curves(metrics: dict, higher_is_better: Sequence[str],
                   complements: Sequence[tuple[str, str]]) -> dict:
  """{barrier name: curve} of metrics (`PathEval.barrier_curves`; any leading axes)."""
  complement = dict(complements)
  curves = {}
  for name, values in metrics.items():
    if name not in higher_is_better:
      curves[name] = values
    elif name in complement:
      curves[complement[name]] = 1.0 - values
    else:
      curves[name] = -values
  return curves


def check_grid(ts) -> np.ndarray:
  """Validates a t grid: 1-D, increasing, first 0 and last 1 exactly."""
  ts = np.asarray(ts)
  if ts.ndim != 1 or ts.size < 2:
    raise ValueError(f"A t grid must be 1-D with at least 2 values, got shape {ts.shape}.")
  if not np.issubdtype(ts.dtype, np.number) or not np.all(np.isfinite(ts)):
    raise ValueError(f"A t grid must hold finite numbers, got {ts.tolist()}.")
  if ts[0] != 0 or ts[-1] != 1:
    raise ValueError(
        f"A t grid must start at 0 and end at 1 (use np.linspace(0, 1, n)); "
        f"got first={ts[0]}, last={ts[-1]}.")
  if np.any(np.diff(ts) <= 0):
    raise ValueError("A t grid must be strictly increasing.")
  return ts


def barrier_height(ts: chex.Array, values: chex.Array) -> jax.Array:
  """B = max_t [v(t) - ((1 - t) v(0) + t v(1))] over a grid from 0 to 1.

  Apply to loss for the loss barrier and to error = 1 - accuracy for the
  accuracy barrier. 0 when the curve never rises above the chord (the grid's
  ends always give 0, so B >= 0). Jittable and differentiable (the grid is
  checked only when it is concrete).

  Args:
    ts: [K] grid with ts[0] = 0 and ts[-1] = 1.
    values: [K] v(t) at the grid.

  Example:
    >>> barrier_height(np.linspace(0, 1, 3), np.array([1.0, 2.0, 1.0]))   # 1.0
  """
  ts = jnp.asarray(check_grid(ts) if not isinstance(ts, jax.core.Tracer) else ts)
  values = jnp.asarray(values)
  if values.shape != ts.shape:
    raise ValueError(f"values shape {values.shape} does not match ts shape {ts.shape}.")
  chord = (1 - ts) * values[0] + ts * values[-1]
  return jnp.max(values - chord)


def barrier_location(ts: chex.Array, values: chex.Array) -> float:
  """The t at which the barrier of `barrier_height` is reached."""
  ts, values = np.asarray(ts), np.asarray(values)
  return float(ts[np.argmax(values - ((1 - ts) * values[0] + ts * values[-1]))])


def repair_targets(apply_fn, points, bn_batches, renormalize, inputs):
  """REPAIR's end-point statistics (computed once per path), or None without REPAIR."""
  if renormalize != "repair":
    return None
  return [repair.endpoint_stats(apply_fn, points[i], bn_batches, inputs) for i in (0, -1)]


def network_at(apply_fn, params, t, bn_batches, *, renormalize, inputs, targets=None):
  """(variables, statistics) of the network with `params` at path position t.

  The statistics are what the variables are normalised to: BatchNorm's
  recomputed from `bn_batches` (`renormalize` in BATCHNORM), REPAIR's (the
  end points' `targets` interpolated at t), or {} (None). The one place the
  path core and the diagnostics (`mechconn.diagnostics`) form a network on a path.
  """
  variables = {"params": params}
  stats = {}
  if renormalize == "repair":
    variables = repair.repaired_variables(apply_fn, params, *targets, t, bn_batches, inputs)
    stats = variables[repair.COLLECTION]
  elif renormalize in BATCHNORM:
    variables["batch_stats"] = stats = batchnorm.recompute_batch_stats(
        apply_fn, variables, bn_batches, unbiased=renormalize == "batchnorm_unbiased",
        inputs=inputs)
  return variables, stats


def map_over(fn, xs, strategy: str, chunk_size: int):
  """fn over the leading axis of `xs` by `strategy` ('map', 'chunked' or 'vmap')."""
  if strategy == "vmap":
    return jax.vmap(fn)(xs)
  return jax.lax.map(fn, xs, batch_size=chunk_size if strategy == "chunked" else None)


def path_loop(points, ts, eval_sets, bn_batches, *, apply_fn, path_fn, strategy, chunk_size,
              renormalize, objective):
  """({set: {metric: [K]}}, statistics finite [K], {layer: statistics vary [K]}) over `ts`."""
  inputs = objective.inputs
  targets = repair_targets(apply_fn, points, bn_batches, renormalize, inputs)

  def at(t):  # the parameters and their statistics once per t, shared by every eval set
    variables, stats = network_at(apply_fn, path_fn(points, t), t, bn_batches,
                                  renormalize=renormalize, inputs=inputs, targets=targets)
    return ({name: evaluation.mean_metrics(apply_fn, variables, batches, objective)
             for name, batches in eval_sets.items()},
            finite.all_finite(stats), input_checks.statistics_vary(stats))

  return map_over(at, ts, strategy, chunk_size)


_STATIC = ("apply_fn", "path_fn", "strategy", "chunk_size", "renormalize", "objective")


@functools.partial(jax.jit, static_argnames=_STATIC)
def evaluate_path_jit(points, ts, eval_sets, bn_batches, *, apply_fn, path_fn,
                      strategy, chunk_size, renormalize, objective):
  """`path_loop` as one compiled program (the statics select and shape it)."""
  return path_loop(points, ts, eval_sets, bn_batches, apply_fn=apply_fn, path_fn=path_fn,
                   strategy=strategy, chunk_size=chunk_size, renormalize=renormalize,
                   objective=objective)


@functools.partial(jax.jit, static_argnames=_STATIC + ("mesh",))
def evaluate_path_over_t(points, ts, eval_sets, bn_batches, *, apply_fn, path_fn,
                         strategy, chunk_size, renormalize, objective, mesh):
  """Each device evaluates its slice of `ts` (len(ts) divisible by the mesh size)."""
  loop = functools.partial(path_loop, apply_fn=apply_fn, path_fn=path_fn,
                           strategy=strategy, chunk_size=chunk_size, renormalize=renormalize,
                           objective=objective)
  # The body is local to each device (no collectives), so the varying-axis
  # check is off: the scans' zero-initialised carries need no pcast.
  sharded = jax.shard_map(loop, mesh=mesh, in_specs=(P(), P(mesh_lib.DATA_AXIS), P(), P()),
                          out_specs=P(mesh_lib.DATA_AXIS), check_vma=False)
  out = sharded(points, ts, eval_sets, bn_batches)
  # Gather the per-t results onto every device: readable from every host.
  return jax.lax.with_sharding_constraint(out, mesh_lib.replicated(mesh))


def path_evals(ts, out, stats_finite, stats_vary, objective, **kwargs) -> dict[str, "PathEval"]:
  """{set: PathEval} of `path_loop`'s output, with the objective's directions."""
  return {name: PathEval(ts=ts, metrics=metrics, statistics_finite=stats_finite,
                         statistics_vary=stats_vary,
                         higher_is_better=objective.higher_is_better,
                         complements=objective.complements, **kwargs)
          for name, metrics in out.items()}


def check_points(points, where: str) -> tuple:
  """The path's points as a tuple; a named error for full variables, a lone tree or mixed dtypes."""
  if isinstance(points, Mapping) or not isinstance(points, Sequence) or not points:
    raise TypeError(f"{where}: points must be a sequence of parameter trees, e.g. "
                    f"(params_a, params_b) for a linear path; got {type(points).__name__}.")
  for i, point in enumerate(points):
    if isinstance(point, Mapping) and "params" in point:
      raise ValueError(
          f"{where}: path point {i} holds the full variables (collections "
          f"{sorted(point)}); pass its parameters, variables['params']: the path "
          "interpolates parameters and recomputes BatchNorm statistics at every t.")
  input_checks.check_point_dtypes(points, where)
  return tuple(points)


def resolve(apply_fn, points, eval_sets, bn_batches, *, objective, path, renormalize,
            strategy, where):
  """Checks what can be checked without data; (apply_fn, path_fn, strategy, renormalize)."""
  objectives_lib.check_objective(objective)
  path_function = paths.path_fn(path) if isinstance(path, str) else path
  strategy = strategy or DEFAULT_STRATEGY.get(jax.default_backend(), "map")
  if strategy not in STRATEGIES:
    raise ValueError(f"Unknown strategy {strategy!r}; valid strategies: {STRATEGIES}.")
  if renormalize not in RENORMALIZE:
    raise ValueError(f"Unknown renormalize {renormalize!r}; valid: {RENORMALIZE}.")
  if not isinstance(eval_sets, Mapping) or not eval_sets:
    raise ValueError(f"{where}: eval_sets must be a non-empty {{name: stacked batches}}.")
  # Abstract: a model that cannot be called as mechconn calls models, or whose outputs the
  # objective cannot read, fails here, named.
  input_checks.check_outputs(apply_fn, points[0], next(iter(eval_sets.values())), objective,
                             where)
  example = jax.eval_shape(lambda b: objective.inputs_of(jax.tree.map(lambda x: x[0], b)),
                           next(iter(eval_sets.values())))
  if renormalize == "auto" and bn_batches is not None:
    renormalize = "batchnorm"  # nothing to check (a model without BatchNorm gets {} statistics)
  else:  # an explicit choice or no statistics batches: check it against the model
    has_bn = batchnorm.has_batchnorm(apply_fn, {"params": points[0]}, example)
    if renormalize == "auto":
      renormalize = "batchnorm" if has_bn else None
    check_renormalize(renormalize, has_bn, bn_batches)
  if renormalize == "repair":
    apply_fn = repair.Repaired(apply_fn, repair.sites_of(apply_fn, {"params": points[0]},
                                                         example))
  return apply_fn, path_function, strategy, renormalize


def path_metrics(apply_fn: ApplyFn, points: Sequence[Params], ts: chex.Array,
                 eval_sets: Mapping[str, StackedBatches],
                 bn_batches: StackedBatches | None = None, *,
                 objective: Objective = CLASSIFICATION, path: str | PathFn = "linear",
                 renormalize: str | None = "auto", strategy: str | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict[str, PathEval]:
  """The objective's metrics at every t of a path, on each eval set: the pure core.

  A pure function of arrays: `jax.jit` it, `jax.grad` it with respect to the
  points (through the path, the recomputed statistics and the metrics), or
  `jax.vmap` it over stacked end points or grids. At each t the parameters and
  their BatchNorm (or REPAIR) statistics are formed once for every eval set.
  It checks only what needs no data; the checked, eager entry points are
  `evaluate_path` (one set) and `evaluate_path_on_sets`.

  Args:
    apply_fn: the model's apply, as Flax Linen's `model.apply` taking `train=`
      (other models through `mechconn.adapters`).
    points: the path's parameter trees (params, not the full variables), e.g.
      (params_a, params_b) for 'linear', (a, mid, b) for a quadratic 'bezier'.
    ts: [K] grid from 0 to 1, np.linspace(0, 1, K) (checked when concrete).
    eval_sets: {name: batches}, each a dict of arrays stacked
      [num_batches, batch_size, ...] in the objective's format (classification:
      {'image', 'label', 'mask'}, see `mechconn.data.batching.stack_batches`).
    bn_batches: stacked full batches (same format; the objective's inputs are
      read) from which BatchNorm or REPAIR statistics are recomputed at every
      t; required when the model has BatchNorm or with renormalize='repair'.
    objective: what is measured (`mechconn.objectives`; default classification).
    path: 'linear', 'bezier', 'polychain', or a `path_fn(points, t)`.
    renormalize: 'batchnorm' (BatchNorm statistics recomputed exactly at
      every t; 'batchnorm_unbiased': with the unbiased variance, as PyTorch's
      `update_bn`), 'repair' (`mechconn.repair`, for networks without
      BatchNorm), None, or 'auto' ('batchnorm' when the model has BatchNorm).
    strategy: 'map', 'chunked' or 'vmap' over t; None: `DEFAULT_STRATEGY`.
    chunk_size: t values per chunk for 'chunked'.

  Returns:
    {name: PathEval} with each metric [K], `statistics_finite` [K] and
    `statistics_vary` {layer: [K]} (check them yourself under `jax.jit`).

  Example:
    >>> core = jax.jit(lambda a, b: barriers.path_metrics(
    ...     model.apply, (a, b), ts, {"eval": batches}, bn_batches)["eval"].loss)
    >>> losses = core(params_a, params_b)                         # [K]
    >>> grad_a = jax.grad(lambda a: core(a, params_b).mean())(params_a)
    >>> per_pair = jax.vmap(core)(stacked_a, stacked_b)            # [pairs, K]
  """
  points = check_points(points, "path_metrics")
  paths.check_matching(points)
  if not isinstance(ts, jax.core.Tracer):
    ts = check_grid(ts)
  apply_fn, path_function, strategy, renormalize = resolve(
      apply_fn, points, eval_sets, bn_batches, objective=objective, path=path,
      renormalize=renormalize, strategy=strategy, where="path_metrics")
  ts = jnp.asarray(ts, jnp.float32)
  out, stats_finite, stats_vary = evaluate_path_jit(
      points, ts, dict(eval_sets), bn_batches if renormalize else None, apply_fn=apply_fn,
      path_fn=path_function, strategy=strategy, chunk_size=int(chunk_size),
      renormalize=renormalize, objective=objective)
  return path_evals(ts, out, stats_finite, stats_vary, objective)


def check_renormalize(renormalize, has_bn: bool, bn_batches) -> None:
  """Raises ValueError for a renormalisation the model or the data cannot have."""
  if has_bn and renormalize not in BATCHNORM:
    raise ValueError(f"The model has BatchNorm layers: renormalize={renormalize!r} would "
                     "evaluate it with statistics from no data; use 'batchnorm' (or 'auto').")
  if (has_bn or renormalize == "repair") and bn_batches is None:
    raise ValueError(f"renormalize={renormalize!r} needs bn_batches (stacked full batches of "
                     "training inputs) so that statistics are recomputed at every t.")
  if renormalize in BATCHNORM and not has_bn:
    raise ValueError(f"renormalize={renormalize!r} but the model has no BatchNorm layer; use "
                     "'repair' or None.")
