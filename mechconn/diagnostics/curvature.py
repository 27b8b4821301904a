"""Curvature along a path: top Hessian eigenvalues (Lanczos) and trace (Hutchinson) at every t.

At each t of a grid, the loss whose curvature is measured is

  L_t(theta) = the objective's `metric` (default 'loss') as its exact weighted
               mean over `batches`, of the network with parameters theta and
               the statistics s(t) of the network on the path at t,

where s(t) are BatchNorm's statistics recomputed at theta(t) from
`bn_batches` (`path_core.network_at`), REPAIR's, or none, and are held fixed
(`stop_gradient`): the Hessian H(t) = d^2 L_t / d theta^2 at theta(t) is the
Hessian of the evaluation loss of the network on the path with respect to its
parameters (its float leaves, ravelled with `jax.flatten_util.ravel_pytree`),
not of the loss through the recomputation of its statistics.

Hessian-vector products are forward-over-reverse (`jax.jvp` of `jax.grad`,
about 2-3 gradients each). From them, by the maintained library matfree:
  - the top eigenvalues by Lanczos with full reorthogonalisation
    (`matfree.decomp.tridiag_sym`, `matfree.eig.eigh_partial`), `num_matvecs`
    products each, started from one fixed Gaussian vector;
  - the trace by Hutchinson's estimator: the mean of v^T H v (matfree's
    `stochtrace.monte_carlo_trace`) over `num_probes` Rademacher vectors v
    (`stochtrace.sampler_signs`), one product after another, with its
    standard error.
The start vector and the probes come from `seed` alone (`start_vector`,
`probe_vectors`): every t sees the same ones, so curves over t are comparable.
With `groups`, the same for each group's diagonal block of H (its leaves' rows
and columns; start vector and probes restricted to them). All t run in one
compiled program.
"""

from collections.abc import Callable
import functools

import chex
import flax
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
from matfree import decomp, eig, stochtrace
import numpy as np

from mechconn import evaluation
from mechconn import finite
from mechconn import input_checks
from mechconn import objectives as objectives_lib
from mechconn import path_core
from mechconn import paths
from mechconn.diagnostics import groups as groups_lib
from mechconn.objectives import Objective
from mechconn.types import ApplyFn, Params, PathFn, StackedBatches

CLASSIFICATION = objectives_lib.CLASSIFICATION
_START_TAG, _PROBE_TAG = 0, 1  # fold_in tags of the Lanczos start vector and the probes


@flax.struct.dataclass
class Curvature:
  """The Hessian's top eigenvalues and trace at every t of a grid (arrays over t).

  Attributes:
    ts: [K] the grid.
    top_eigenvalues: [K, num_eigenvalues] the largest eigenvalues at each t,
      in descending order (Lanczos' Ritz values: lower bounds that tighten
      with num_matvecs, exact when it equals the number of parameters).
    trace: [K] Hutchinson's estimate of the trace (None with num_probes=0).
    trace_sem: [K] its standard error, the sample standard deviation (ddof=1)
      of v^T H v over the probes / sqrt(num_probes).
    per_group: {group: {'top_eigenvalues': [K, n], 'trace': [K], 'trace_sem':
      [K]}} of each group's diagonal block of the Hessian ({} without groups).
    num_parameters: the Hessian's size (float parameters).
    group_sizes: ((group, number of its float parameters), ...).
  """

  ts: jax.Array
  top_eigenvalues: jax.Array
  trace: jax.Array | None
  trace_sem: jax.Array | None
  per_group: dict[str, dict[str, jax.Array]]
  num_parameters: int = flax.struct.field(pytree_node=False, default=0)
  group_sizes: tuple[tuple[str, int], ...] = flax.struct.field(pytree_node=False, default=())

  def summary(self) -> dict:
    """JSON-able floats: where the top eigenvalue peaks, the trace at the ends and its peak.

    {'top_eigenvalue_max', 'top_eigenvalue_max_t', 'top_eigenvalue_start',
    'top_eigenvalue_end'} and, with probes, {'trace_max', 'trace_max_t',
    'trace_start', 'trace_end'}; 'groups': the same for each group.
    """
    ts = np.asarray(jax.device_get(self.ts))
    out = _curve_summary(ts, self.top_eigenvalues, self.trace)
    if self.per_group:
      out["groups"] = {name: _curve_summary(ts, block["top_eigenvalues"], block.get("trace"))
                       for name, block in self.per_group.items()}
    return out


def _curve_summary(ts: np.ndarray, top_eigenvalues, trace) -> dict[str, float]:
  curves = {"top_eigenvalue": np.asarray(jax.device_get(top_eigenvalues))[:, 0]}
  if trace is not None:
    curves["trace"] = np.asarray(jax.device_get(trace))
  out = {}
  for name, values in curves.items():
    peak = int(np.argmax(values))
    out |= {f"{name}_max": float(values[peak]), f"{name}_max_t": float(ts[peak]),
            f"{name}_start": float(values[0]), f"{name}_end": float(values[-1])}
  return out


# --- The parameters as one vector. --------------------------------------------------


def _is_float(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def flatten_floats(params: Params) -> tuple[jax.Array, Callable[[Params, jax.Array], Params]]:
  """(float32 vector of the float leaves, in the tree's order; rebuild(params, vector)).

  `rebuild` puts the vector back into the float leaves (in their dtypes) and
  keeps every other leaf of `params`; it holds only shapes and dtypes.
  """
  leaves = jax.tree.leaves(params)
  vector, unravel = ravel_pytree([jnp.asarray(x, jnp.float32) for x in leaves if _is_float(x)])
  return vector, functools.partial(_rebuild, unravel)


def _rebuild(unravel, params: Params, vector: jax.Array) -> Params:
  leaves, treedef = jax.tree.flatten(params)
  floats = iter(unravel(vector))
  return treedef.unflatten([next(floats).astype(jnp.result_type(x)) if _is_float(x) else x
                            for x in leaves])


def num_float_parameters(params: Params) -> int:
  """The number of entries of the float leaves: the Hessian's size."""
  return sum(int(np.size(x)) for x in jax.tree.leaves(params) if _is_float(x))


def group_indices(params: Params, leaves) -> np.ndarray:
  """Positions in `flatten_floats`' vector of the float entries of the group's leaves."""
  mask = jax.tree.leaves(groups_lib.group_mask(params, leaves))
  chosen = [np.full(int(np.size(x)), bool(m)) for x, m in zip(jax.tree.leaves(params), mask)
            if _is_float(x)]
  return np.flatnonzero(np.concatenate(chosen))


# --- Fixed random vectors. ----------------------------------------------------------


def _start(key: jax.Array, size: int) -> jax.Array:
  return jax.random.normal(jax.random.fold_in(key, _START_TAG), (size,), jnp.float32)


def _probes(key: jax.Array, size: int, num_probes: int) -> jax.Array:
  sampler = stochtrace.sampler_signs(jnp.zeros((size,), jnp.float32), num=num_probes)
  return sampler(jax.random.fold_in(key, _PROBE_TAG))


def start_vector(num_parameters: int, seed: int = 0) -> jax.Array:
  """[num_parameters] the Gaussian vector Lanczos starts from (restricted for a group)."""
  return _start(jax.random.key(seed), num_parameters)


def probe_vectors(num_parameters: int, num_probes: int, seed: int = 0) -> jax.Array:
  """[num_probes, num_parameters] the Rademacher (+-1) probes (a group uses their columns)."""
  return _probes(jax.random.key(seed), num_parameters, num_probes)


# --- The program. -------------------------------------------------------------------


def _spectrum(matvec, start, probes, num_eigenvalues: int, num_matvecs: int) -> dict:
  """{'top_eigenvalues' (descending), 'trace', 'trace_sem'?} of a symmetric matvec."""
  eigh = eig.eigh_partial(decomp.tridiag_sym(num_matvecs, reortho="full"))
  ritz_values, _ = eigh(matvec, start)
  out = {"top_eigenvalues": ritz_values[::-1][:num_eigenvalues]}
  if probes is not None:
    out["trace"], out["trace_sem"] = _hutchinson(matvec, probes)
  return out


def _hutchinson(matvec, probes) -> tuple[jax.Array, jax.Array]:
  """(mean of v^T A v over the probes v, its standard error); one matvec per probe.

  matfree's integrand, probe by probe (`lax.map`): its `estimator_monte_carlo`
  vmaps the matvec over the probes, which holds every probe's tangents at once
  and on XLA:CPU made each Hessian-vector product of a conv net several times
  slower (vmapped parameter tangents become grouped convolutions).
  """
  forms = jax.lax.map(lambda v: stochtrace.monte_carlo_trace()(matvec, v), probes)
  return jnp.mean(forms), jnp.std(forms, ddof=1) / np.sqrt(probes.shape[0])


def _block(hvp, indices: np.ndarray, size: int):
  """The matvec of the diagonal block of `hvp` on `indices` (input and output masked)."""
  def matvec(v):
    return hvp(jnp.zeros((size,), v.dtype).at[indices].set(v))[indices]
  return matvec


_STATIC = ("apply_fn", "path_fn", "strategy", "chunk_size", "renormalize", "objective",
           "metric", "num_eigenvalues", "num_matvecs", "num_probes", "groups")


@functools.partial(jax.jit, static_argnames=_STATIC)
def curvature_jit(points, ts, batches, bn_batches, key, *, apply_fn, path_fn, strategy,
                  chunk_size, renormalize, objective, metric, num_eigenvalues, num_matvecs,
                  num_probes, groups):
  """((spectrum, {group: spectrum}), statistics finite) per t, in one compiled program.

  `groups` is ((name, leaf paths), ...); the rest as `path_curvature`.
  """
  inputs = objective.inputs
  targets = path_core.repair_targets(apply_fn, points, bn_batches, renormalize, inputs)
  size = num_float_parameters(points[0])
  start = _start(key, size)
  probes = _probes(key, size, num_probes) if num_probes else None

  def at(t):
    variables, stats = path_core.network_at(apply_fn, path_fn(points, t), t, bn_batches,
                                            renormalize=renormalize, inputs=inputs,
                                            targets=targets)
    params = variables["params"]
    fixed = jax.lax.stop_gradient({k: v for k, v in variables.items() if k != "params"})
    theta, rebuild = flatten_floats(params)

    def loss(vector):
      network = {**fixed, "params": rebuild(params, vector)}
      return evaluation.mean_metrics(apply_fn, network, batches, objective)[metric]

    def hvp(v):  # forward-over-reverse
      return jax.jvp(jax.grad(loss), (theta,), (v,))[1]

    whole = _spectrum(hvp, start, probes, num_eigenvalues, num_matvecs)
    per_group = {}
    for name, leaves in groups:
      idx = group_indices(points[0], leaves)
      per_group[name] = _spectrum(_block(hvp, idx, size), start[idx],
                                  None if probes is None else probes[:, idx],
                                  num_eigenvalues, min(num_matvecs, idx.size))
    return (whole, per_group), finite.all_finite(stats)

  return path_core.map_over(at, ts, strategy, chunk_size)


# --- The checked entry point. -------------------------------------------------------


def path_curvature(apply_fn: ApplyFn, points, ts: chex.Array, batches: StackedBatches,
                   bn_batches: StackedBatches | None = None, *,
                   objective: Objective = CLASSIFICATION, path: str | PathFn = "linear",
                   renormalize: str | None = "auto", strategy: str | None = None,
                   chunk_size: int = path_core.DEFAULT_CHUNK_SIZE, metric: str = "loss",
                   num_eigenvalues: int = 1, num_matvecs: int = 20, num_probes: int = 16,
                   groups: groups_lib.Groups = None, seed: int = 0) -> Curvature:
  """The Hessian's top eigenvalues and trace at every t of a path; checked, eager.

  H(t) is the Hessian, in the (float) parameters, of the objective's `metric`
  as its exact weighted mean over `batches`, of the network on the path at t
  with its statistics (BatchNorm's recomputed at theta(t), or REPAIR's) held
  fixed: the curvature of the evaluation loss of the network on the path (see
  the module docstring). Per t it costs num_matvecs + num_probes
  Hessian-vector products (each about 2-3 gradients over `batches`), and as
  many again per group.

  The arguments it shares with `path_core.path_metrics` mean what they mean there.

  Args:
    batches: stacked batches [N, B, ...] (the objective's format), the loss' data.
    metric: which of the objective's metrics is differentiated ('loss').
    num_eigenvalues: how many of the largest eigenvalues (<= num_matvecs).
    num_matvecs: Lanczos steps (Hessian-vector products), <= the number of
      parameters; with all of them the eigenvalues are exact.
    num_probes: Rademacher probes of the trace estimate; 0: no trace; else >= 2.
    groups: None, or groups of parameters (`diagnostics.groups`: a list of
      prefixes, {name: prefixes}, a PermutationSpec; for the model's top-level
      submodules pass `groups.parameter_groups(params)`): each group's diagonal
      block of H too, with min(num_matvecs, its size) Lanczos steps.
    seed: fixes the start vector and the probes (`start_vector`, `probe_vectors`).

  Returns:
    Curvature: `top_eigenvalues` [K, num_eigenvalues] (descending), `trace` and
    `trace_sem` [K], `per_group`, `summary()`.

  Raises:
    ValueError: counts out of range, a metric the objective lacks, a group
      smaller than num_eigenvalues, inputs `input_checks.check_inputs` refuses.
    finite.NonFiniteError: NaN or infinity in the inputs, the recomputed
      statistics or a result at some t.

  Example:
    >>> curv = path_curvature(model.apply, (params_a, params_b), np.linspace(0, 1, 11),
    ...                       eval_batches, bn_batches, num_matvecs=10)
    >>> curv.top_eigenvalues[:, 0], curv.summary()["top_eigenvalue_max_t"]
  """
  static, named_groups, (size, group_sizes) = _prepare(
      apply_fn, points, ts, batches, bn_batches, objective=objective, path=path,
      renormalize=renormalize, strategy=strategy, metric=metric,
      counts=(num_eigenvalues, num_matvecs, num_probes), groups=groups)
  ts = jnp.asarray(path_core.check_grid(ts), jnp.float32)
  (whole, per_group), stats_finite = curvature_jit(
      tuple(points), ts, batches, bn_batches if static["renormalize"] else None,
      jax.random.key(seed), chunk_size=int(chunk_size), groups=named_groups, **static)
  _check_results(np.asarray(ts), whole, per_group, stats_finite, static["renormalize"])
  return Curvature(ts=ts, top_eigenvalues=whole["top_eigenvalues"], trace=whole.get("trace"),
                   trace_sem=whole.get("trace_sem"), per_group=per_group,
                   num_parameters=size, group_sizes=group_sizes)


def _prepare(apply_fn, points, ts, batches, bn_batches, *, objective, path, renormalize,
             strategy, metric, counts, groups) -> tuple[dict, tuple, tuple]:
  """Checks the arguments; (static arguments of `curvature_jit`, named groups, sizes).

  sizes: (the number of float parameters, ((group, its number), ...)).
  """
  where = "path_curvature"
  points = path_core.check_points(points, where)
  paths.check_matching(points)
  path_core.check_grid(ts)
  input_checks.check_batches(batches, "batches", objective)
  if bn_batches is not None:
    input_checks.check_batches(bn_batches, "bn_batches", objective, weighted=False)
  resolved_apply, path_fn, strategy, renormalize = path_core.resolve(
      apply_fn, points, {"batches": batches}, bn_batches, objective=objective, path=path,
      renormalize=renormalize, strategy=strategy, where=where)
  _check_metric(apply_fn, points[0], batches, objective, metric)
  size = num_float_parameters(points[0])
  check_counts(size, *counts)
  named_groups = _named_groups(points[0], groups, counts[0])
  input_checks.check_inputs(
      apply_fn, {f"the parameters of path point {i}": p for i, p in enumerate(points)},
      {"batches": batches}, bn_batches, objective, where=where)
  static = dict(apply_fn=resolved_apply, path_fn=path_fn, strategy=strategy,
                renormalize=renormalize, objective=objective, metric=metric,
                num_eigenvalues=int(counts[0]), num_matvecs=int(counts[1]),
                num_probes=int(counts[2]))
  group_sizes = tuple((name, int(group_indices(points[0], leaves).size))
                      for name, leaves in named_groups)
  return static, named_groups, (size, group_sizes)


def _check_metric(apply_fn, params, batches, objective: Objective, metric: str) -> None:
  """Raises ValueError unless the objective measures `metric` (abstract: no compute)."""
  batch = jax.eval_shape(lambda b: jax.tree.map(lambda x: x[0], b), batches)

  def metrics(p, b):
    out = apply_fn({"params": p}, objective.inputs_of(b), train=True, mutable=["batch_stats"])
    return objective.metrics(out[0], b)

  names = sorted(jax.eval_shape(metrics, params, batch))
  if metric not in names:
    raise ValueError(f"path_curvature: objective {objective.name!r} has no metric {metric!r}; "
                     f"its metrics are {names}.")


def _is_count(n) -> bool:
  return isinstance(n, int | np.integer) and not isinstance(n, bool)


def check_counts(num_parameters: int, num_eigenvalues, num_matvecs, num_probes) -> None:
  """Raises ValueError (TypeError for non-integers) for counts Lanczos or Hutchinson cannot use."""
  counts = {"num_eigenvalues": num_eigenvalues, "num_matvecs": num_matvecs,
            "num_probes": num_probes}
  for name, n in counts.items():
    if not _is_count(n):
      raise TypeError(f"{name} must be an integer, got {n!r}.")
  for name in ("num_eigenvalues", "num_matvecs"):
    if counts[name] < 1:
      raise ValueError(f"{name} must be positive, got {counts[name]}.")
  if num_probes < 0 or num_probes == 1:
    raise ValueError(f"num_probes must be 0 (no trace) or at least 2 (a standard error needs "
                     f"two), got {num_probes}.")
  if num_matvecs > num_parameters:
    raise ValueError(f"num_matvecs={num_matvecs} exceeds the number of parameters "
                     f"({num_parameters}): a Krylov space has at most that many dimensions.")
  if num_eigenvalues > num_matvecs:
    raise ValueError(f"num_eigenvalues={num_eigenvalues} exceeds num_matvecs={num_matvecs}: "
                     "Lanczos finds at most one eigenvalue per matvec.")


def _named_groups(params: Params, groups, num_eigenvalues: int) -> tuple:
  """((name, leaf paths), ...) of the groups (hashable), each with enough float entries."""
  if groups is None:
    return ()
  named = groups_lib.parameter_groups(params, groups)
  for name, leaves in named.items():
    size = group_indices(params, leaves).size
    if size < num_eigenvalues:
      raise ValueError(f"Group {name!r} ({list(leaves)}) holds {size} float parameters, fewer "
                       f"than num_eigenvalues={num_eigenvalues}.")
  return tuple((name, tuple(leaves)) for name, leaves in named.items())


def _check_results(ts: np.ndarray, whole: dict, per_group: dict, stats_finite,
                   renormalize) -> None:
  """Raises NonFiniteError naming the t at which the statistics or a result are not finite."""
  stats_finite = np.asarray(jax.device_get(stats_finite))
  flags = {}
  if not stats_finite.all():
    kind = "REPAIR" if renormalize == "repair" else "BatchNorm"
    flags[f"the recomputed {kind} statistics at t = "
          + ", ".join(f"{t:.3g}" for t in ts[~stats_finite])] = False
  blocks = {"the Hessian": whole, **{f"group {g!r}'s block": v for g, v in per_group.items()}}
  for what, values in jax.device_get(blocks).items():
    for name, value in values.items():
      bad = ~np.isfinite(np.asarray(value).reshape(len(ts), -1)).all(axis=1)
      if bad.any():
        flags[f"the {name} of {what} at t = " + ", ".join(f"{t:.3g}" for t in ts[bad])] = False
  finite.raise_if_any(flags, "Path curvature")
