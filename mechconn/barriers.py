"""Evaluate a network along a path at many t in one compiled program; barriers.

The core, `path_metrics`, is a pure function: for each t of a grid it forms
the parameters on the path, recomputes BatchNorm (or REPAIR) statistics from
data, and scans each eval set for the exact weighted means of an objective's
metrics (`mechconn.objectives`: cross-entropy and accuracy by default;
regression, next-token language modelling, or a user's own). Call it inside
`jax.jit`, differentiate it with `jax.grad` with respect to the path's points,
map it with `jax.vmap` over stacked end points.

`evaluate_path` (one eval set -> a `PathEval`) and `evaluate_path_on_sets`
({name: set}, e.g. the four counterfactual views, sharing each t's
statistics -> {name: PathEval}) are the checked, eager conveniences on top of
it: they validate the inputs, refuse non-finite numbers, and place the work on
a device mesh. A new grid of the same length, or new endpoints of the same
shapes, reuse the compiled program. `PathEval.summary()` gives the barriers
and where they sit.

The loop over t is a `strategy` ('map', 'chunked', 'vmap'; see
`mechconn.path_core`), the default per backend the fastest in
benchmarks/path_eval.py.

With a `mesh` (a 1-D device mesh, `mechconn.mesh.data_mesh()`), the work is
spread over its devices:
  - over t, when there are at least as many t as devices: each device runs the
    strategy over its own slice of the grid on the whole eval set (a
    `shard_map`; the grid is padded with copies of its last t to a multiple of
    the device count and the padding dropped);
  - otherwise over the eval data: every batch is split over the devices along
    its batch axis and XLA sums the per-device losses and BatchNorm moments.
The choice is recorded in each result (`PathEval.sharded_over`). Eval and
BatchNorm batches may be numpy arrays (placed here) or global `jax.Array`s
(`mesh.shard_batch(..., batch_axis=1)`, each host holding only its rows); in
the 't' layout XLA gathers them onto every device.
"""

from collections.abc import Mapping, Sequence
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np

from mechconn import finite
from mechconn import input_checks
from mechconn import mesh as mesh_lib
from mechconn import objectives as objectives_lib
from mechconn import path_core
from mechconn import paths
from mechconn import timing
# The pure core and the barriers, re-exported: `barriers` is where users find them.
from mechconn.path_core import (  # pylint: disable=unused-import
    BATCHNORM, CLASSIFICATION, DEFAULT_CHUNK_SIZE, DEFAULT_STRATEGY, RENORMALIZE, STRATEGIES,
    PathEval, barrier_height, barrier_location, check_grid, path_metrics)
from mechconn.objectives import Objective
from mechconn.types import ApplyFn, Params, PathFn, StackedBatches

SHARDED_OVER = ("none", "t", "data")


def _place(tree, sharding):
  """Leaves put on the devices with `sharding` (None: numpy leaves on the default device)."""
  if sharding is None:
    return jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jax.device_put(x), tree)
  return mesh_lib.put(tree, sharding)


def sharding_plan(num_t: int, mesh: jax.sharding.Mesh | None) -> str:
  """'none' (one device), 't' (at least as many t as devices) or 'data'."""
  if mesh is None or mesh.size == 1:
    return "none"
  return "t" if num_t >= mesh.size else "data"


@timing.timed(timing.PATH_EVALUATION)
def evaluate_path(apply_fn: ApplyFn, points: Sequence[Params], ts: chex.Array,
                  eval_batches: StackedBatches, *, path: str | PathFn = "linear",
                  bn_batches: StackedBatches | None = None,
                  objective: Objective = CLASSIFICATION, strategy: str | None = None,
                  chunk_size: int = DEFAULT_CHUNK_SIZE, mesh: jax.sharding.Mesh | None = None,
                  renormalize: str | None = "auto") -> PathEval:
  """The objective's metrics (loss and accuracy) at every t of a path, on one eval set; checked.

  Eager: it checks its inputs, places the work on a device mesh, runs the pure
  core `path_metrics` (jittable, differentiable, vmappable: use it inside your
  own jitted code) in one XLA program for all t, and refuses non-finite
  results. Several sets sharing each t's statistics: `evaluate_path_on_sets`.

  Args:
    apply_fn: the model's apply (Flax Linen `model.apply` taking `train=`;
      `mechconn.adapters` for models without `train` and NNX modules).
    points: the path's parameter trees (params, not the full variables), e.g.
      (params_a, params_b) for 'linear', (a, mid, b) for a quadratic 'bezier'.
    ts: [K] grid, np.linspace(0, 1, K).
    eval_batches: one eval set, arrays stacked [num_batches, batch_size, ...]
      in the objective's format (classification: {'image', 'label', 'mask'},
      `mechconn.data.batching.stack_batches`); means weighted by the mask.
    path: 'linear', 'bezier', 'polychain', or a `path_fn(points, t)`.
    bn_batches: stacked full batches from which BatchNorm (or REPAIR)
      statistics are recomputed at every t; required when the model has
      BatchNorm, or with renormalize='repair'.
    objective: what is measured (`mechconn.objectives`; default classification).
    strategy: 'map', 'chunked' or 'vmap' (None: the backend's `DEFAULT_STRATEGY`).
    chunk_size: t values per chunk for 'chunked'.
    mesh: a 1-D device mesh to spread the work over (over t when K >= its
      size, else over the eval data); None: the default device.
    renormalize: as `path_metrics` ('auto', 'batchnorm', 'batchnorm_unbiased',
      'repair', None).

  Returns:
    PathEval: the metrics, each [K] (`.loss`, `.accuracy`, `.summary()`), with
    `sharded_over` and `num_devices` saying how the work was spread.

  Raises:
    ValueError: inputs that would give a wrong number (the checks are listed
      in `mechconn.input_checks`: malformed or uint8-scale batches, labels
      outside the model's classes, statistics data constant at a BatchNorm
      layer or REPAIR site of an end point, ...).
    finite.NonFiniteError: NaN or infinity in a point's parameters, the inputs,
      the recomputed statistics or the loss at some t (XLA can otherwise turn
      NaN activations into finite logits, and a barrier of 0).

  Example:
    >>> ts = np.linspace(0, 1, 11)
    >>> result = evaluate_path(model.apply, (params_a, params_b), ts, eval_batches,
    ...                        bn_batches=bn_batches)
    >>> result.summary()   # {'loss': ..., 'loss_t': ..., 'error': ..., 'error_t': ...}
  """
  several = _is_set_of_sets(eval_batches, objective, warn=True)
  evals = evaluate_path_on_sets(
      apply_fn, points, ts, eval_batches if several else {"eval": eval_batches}, path=path,
      bn_batches=bn_batches, objective=objective, strategy=strategy, chunk_size=chunk_size,
      mesh=mesh, renormalize=renormalize)
  return evals if several else evals["eval"]


def evaluate_path_on_sets(apply_fn: ApplyFn, points: Sequence[Params], ts: chex.Array,
                          eval_sets: Mapping[str, StackedBatches], *,
                          path: str | PathFn = "linear",
                          bn_batches: StackedBatches | None = None,
                          objective: Objective = CLASSIFICATION, strategy: str | None = None,
                          chunk_size: int = DEFAULT_CHUNK_SIZE,
                          mesh: jax.sharding.Mesh | None = None,
                          renormalize: str | None = "auto") -> dict[str, PathEval]:
  """`evaluate_path` on several eval sets at once: {name: PathEval}; checked, eager.

  At each t the path's parameters and statistics are formed once and every
  set is evaluated with them (e.g. the four counterfactual views), in one
  compiled program. Arguments as `evaluate_path`, with `eval_sets` =
  {name: stacked batches}.

  Example:
    >>> views = evaluate_path_on_sets(model.apply, (params_a, params_b), ts, view_batches,
    ...                               bn_batches=bn_batches)   # {'clean': PathEval, ...}
    >>> counterfactual.path_verdict(views)
  """
  call, plan, ts_arr, num_t, objective = _prepare(
      apply_fn, points, ts, eval_sets, path=path, bn_batches=bn_batches, objective=objective,
      strategy=strategy, chunk_size=chunk_size, mesh=mesh, renormalize=renormalize)
  placed_points, _, placed_sets, placed_bn = call.args
  n = len(placed_points)
  named_points = {f"the parameters of path point {i} of {n} (point 0 is t = 0)": p
                  for i, p in enumerate(placed_points)}
  input_checks.check_inputs(apply_fn, named_points, placed_sets, placed_bn, objective)
  input_checks.warn_if_identical_ends(placed_points, "evaluate_path")
  out, stats_finite, stats_vary = call()
  if plan == "t":  # drop the padding of the grid
    out, stats_finite, stats_vary = jax.tree.map(lambda x: x[:num_t],
                                                 (out, stats_finite, stats_vary))
  _check_results(np.asarray(ts_arr), out, stats_finite, call.kwargs["renormalize"])
  _check_statistics_vary(stats_vary, n, call.kwargs["renormalize"])
  num_devices = 1 if mesh is None else int(mesh.size)
  return path_core.path_evals(ts_arr, out, stats_finite, stats_vary, objective,
                              sharded_over=plan, num_devices=num_devices)


def _is_set_of_sets(eval_data, objective: Objective, warn: bool = False) -> bool:
  """True for {name: set} passed where one set goes (the deprecated form of evaluate_path).

  With `warn`, that form warns (DeprecationWarning, attributed to evaluate_path's caller).
  """
  several = (isinstance(eval_data, Mapping) and bool(eval_data)
             and all(isinstance(v, Mapping) for v in eval_data.values())
             and not any(k in eval_data for k in objective.required_keys()))
  if several and warn:
    warnings.warn("evaluate_path with {name: set} is deprecated and will be removed in the "
                  "next release: use evaluate_path_on_sets(...) for several sets (it always "
                  "returns {name: PathEval}); evaluate_path always returns one PathEval.",
                  DeprecationWarning, stacklevel=3)
  return several


def _check_results(ts: np.ndarray, out: dict, stats_finite: jax.Array,
                   renormalize: str | None = "batchnorm") -> None:
  """Raises NonFiniteError naming the t at which statistics or metrics are not finite."""
  stats_finite = np.asarray(jax.device_get(stats_finite))
  flags = {}
  if not stats_finite.all():
    kind = "REPAIR" if renormalize == "repair" else "BatchNorm"
    flags[f"the recomputed {kind} statistics at t = " + ", ".join(
        f"{t:.3g}" for t in ts[~stats_finite]) + " (the inputs are finite: the activations "
        "overflow)"] = False
  for name, metrics in jax.device_get(out).items():
    for metric, values in metrics.items():
      bad = ~np.isfinite(np.asarray(values))
      if bad.any():
        flags[f"the {metric} on {name!r} at t = " + ", ".join(f"{t:.3g}" for t in ts[bad])] = False
  finite.raise_if_any(flags, "Path evaluation")


def _check_statistics_vary(stats_vary: dict, num_points: int, renormalize: str | None) -> None:
  """Raises ValueError naming each layer whose statistics are constant at an end point."""
  ends = {0: "path point 0 (t = 0)", -1: f"path point {num_points - 1} (t = 1)"}
  constant = {layer: [ends[i] for i in ends if not flags[i]]
              for layer, flags in jax.device_get(stats_vary).items()}
  constant = {layer: at for layer, at in constant.items() if at}
  if constant:
    kind = "REPAIR site" if renormalize == "repair" else "BatchNorm layer"
    raise ValueError(
        "Path evaluation refused: the statistics data (bn_batches) give zero variance at "
        + "; ".join(f"{kind} {layer!r} of {' and '.join(at)}" for layer, at in constant.items())
        + ": every unit of the layer is constant over those inputs (e.g. all-zero or constant "
        "images), so it would output a constant at every t (one prediction for every input, a "
        "meaningless curve). Pass real training inputs as bn_batches.")


def compiled_memory(apply_fn: ApplyFn, points: Sequence[Params], ts: chex.Array,
                    eval_sets: Mapping[str, StackedBatches], **kwargs) -> dict[str, int]:
  """XLA's memory analysis of the compiled path evaluation, in bytes per device.

  {'argument', 'output', 'temp', 'total'}: `temp` is the working memory of the
  program (parameter copies at t, activations, BatchNorm moments); it is what
  grows with the number of t for 'vmap' and stays flat for 'map' and
  'chunked'. Arguments as `evaluate_path_on_sets` (the same names); compiles,
  does not run.

  Example:
    >>> compiled_memory(model.apply, (a, b), ts, {"eval": batches}, bn_batches=bn)["temp"]
  """
  if not _is_set_of_sets(eval_sets, kwargs.get("objective", CLASSIFICATION)):
    raise ValueError("compiled_memory takes eval_sets = {name: stacked batches} (as "
                     "evaluate_path_on_sets); wrap one set as {'eval': batches}.")
  call, *_ = _prepare(apply_fn, points, ts, eval_sets, **kwargs)
  analysis = call.lower().compile().memory_analysis()
  sizes = {"argument": int(analysis.argument_size_in_bytes),
           "output": int(analysis.output_size_in_bytes),
           "temp": int(analysis.temp_size_in_bytes)}
  return {**sizes, "total": sum(sizes.values())}


class _Call:
  """A jitted function bound to its arguments: call() runs it, lower() lowers it."""

  def __init__(self, fn, *args, **kwargs):
    self.fn, self.args, self.kwargs = fn, args, kwargs

  def __call__(self):
    return self.fn(*self.args, **self.kwargs)

  def lower(self):
    return self.fn.lower(*self.args, **self.kwargs)


def _prepare(apply_fn, points, ts, eval_sets, *, path="linear", bn_batches=None,
             objective=CLASSIFICATION, strategy=None, chunk_size=DEFAULT_CHUNK_SIZE, mesh=None,
             renormalize="auto"):
  """Validates the arguments; (call, sharding plan, ts on the device, number of t, objective)."""
  objectives_lib.check_objective(objective)
  ts_np = check_grid(ts)
  points = path_core.check_points(points, "evaluate_path")
  paths.check_matching(points)
  if not isinstance(eval_sets, Mapping) or not eval_sets:
    raise ValueError("eval_sets must be a non-empty {name: stacked batches}; got "
                     f"{type(eval_sets).__name__}"
                     f"{' (empty)' if isinstance(eval_sets, Mapping) else ''}.")
  for name, batches in eval_sets.items():
    input_checks.check_batches(batches, f"eval set {name!r}", objective)
  if bn_batches is not None:
    input_checks.check_batches(bn_batches, "bn_batches", objective, weighted=False)
  apply_fn, path_function, strategy, renormalize = path_core.resolve(
      apply_fn, points, eval_sets, bn_batches, objective=objective, path=path,
      renormalize=renormalize, strategy=strategy, where="evaluate_path")
  if renormalize is None:
    bn_batches = None
  plan = sharding_plan(len(ts_np), mesh)
  static = dict(apply_fn=apply_fn, path_fn=path_function, strategy=strategy,
                chunk_size=int(chunk_size), renormalize=renormalize, objective=objective)
  eval_sets = dict(eval_sets)
  ts_arr = jnp.asarray(ts_np, jnp.float32)
  if plan == "none":
    call = _Call(path_core.evaluate_path_jit, _place(points, None), ts_arr,
                 _place(eval_sets, None), _place(bn_batches, None), **static)
  elif plan == "t":
    padded = np.concatenate([ts_np, np.full(-len(ts_np) % mesh.size, ts_np[-1])])
    replicated = mesh_lib.replicated(mesh)
    call = _Call(path_core.evaluate_path_over_t,
                 _place(points, replicated), mesh_lib.put(padded.astype(np.float32), replicated),
                 _place(eval_sets, replicated), _place(bn_batches, replicated), mesh=mesh,
                 **static)
  else:
    for name, batches in {**eval_sets, "bn_batches": bn_batches or {}}.items():
      if batches:
        mesh_lib.check_batch_size(jax.tree.leaves(batches)[0].shape[1], mesh.size,
                                  f"the batch size of {name!r}")
    by_example = mesh_lib.batch_sharding(mesh, batch_axis=1)
    call = _Call(path_core.evaluate_path_jit, _place(points, mesh_lib.replicated(mesh)), ts_arr,
                 _place(eval_sets, by_example), _place(bn_batches, by_example), **static)
  return call, plan, ts_arr, len(ts_np), objective
