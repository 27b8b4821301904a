"""Many models at once: the simplex they span, its barrier, the merged model, all pairs.

N models of one architecture (aligned into one frame by `multi_align`, or
not) span a simplex of parameters: theta(w) = sum_i w_i theta_i with w >= 0,
sum w = 1. Its vertices are the models, its edges the linear paths between
pairs, its centroid the merged model (the plain mean; Ainsworth et al.'s
MergeMany merge, Wortsman et al.'s model soup). `simplex_metrics` evaluates
an objective at K points of the simplex in one compiled program, exactly as
`path_core.path_metrics` evaluates a path: at every point the parameters,
their BatchNorm statistics recomputed from data (or REPAIR's: every site
renormalised to sum_i w_i of the models' statistics, which on an edge is
REPAIR's interpolation), and each eval set's exact means.

The barrier at w generalises the path's rise above the chord: v(w) - sum_i
w_i v(theta_i); on an edge it is the path's at that t. `SimplexEval` holds the
metrics, the barriers, their maximum and where it sits; `pairwise_barriers`
evaluates every pair's path (the edges) in one call; `merged_variables`.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import functools
import itertools

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np

from mechconn import batchnorm
from mechconn import evaluation
from mechconn import finite
from mechconn import input_checks
from mechconn import path_core
from mechconn import paths
from mechconn import repair
from mechconn import simplex_checks
from mechconn.simplex_checks import check_weights  # pylint: disable=unused-import
from mechconn.objectives import Objective
from mechconn.types import ApplyFn, Params, StackedBatches

CLASSIFICATION = path_core.CLASSIFICATION


@dataclasses.dataclass(frozen=True)
class SimplexGrid:
  """Points of the simplex of N models: weights [K, N] (rows on the simplex) and labels."""

  weights: np.ndarray
  labels: tuple[str, ...]


def simplex_grid(num_models: int, *, num_samples: int = 16, concentration: float = 1.0,
                 seed: int = 0) -> SimplexGrid:
  """The vertices, the edge midpoints, the centroid and Dirichlet samples of the simplex.

  Args:
    num_models: N >= 2.
    num_samples: points drawn from Dirichlet(concentration, ...) (concentration 1.0:
      uniform on the simplex; larger: nearer the centroid), with numpy `seed`.

  Returns:
    SimplexGrid with labels 'vertex i', 'edge i-j' (the midpoint), 'centroid'
    and 'dirichlet k', in that order (N + N(N-1)/2 + 1 + num_samples points;
    for N = 2 the centroid is the edge's midpoint, listed once).

  Example:
    grid = simplex_grid(4, num_samples=32)   # 4 + 6 + 1 + 32 points
  """
  if not isinstance(num_models, (int, np.integer)) or num_models < 2:
    raise ValueError(f"simplex_grid: num_models must be an integer >= 2, got {num_models!r}.")
  if not isinstance(num_samples, (int, np.integer)) or num_samples < 0 or not concentration > 0:
    raise ValueError(f"simplex_grid: num_samples must be >= 0 and concentration > 0, got "
                     f"{num_samples} and {concentration}.")
  eye = np.eye(num_models)
  rows, labels = list(eye), [f"vertex {i}" for i in range(num_models)]
  for i, j in itertools.combinations(range(num_models), 2):
    rows.append((eye[i] + eye[j]) / 2)
    labels.append(f"edge {i}-{j}")
  if num_models > 2:
    rows.append(np.full(num_models, 1.0 / num_models))
    labels.append("centroid")
  samples = np.random.default_rng(seed).dirichlet(np.full(num_models, concentration),
                                                  num_samples)
  rows += list(samples)
  labels += [f"dirichlet {k}" for k in range(num_samples)]
  return SimplexGrid(np.asarray(rows, np.float64), tuple(labels))


@flax.struct.dataclass
class SimplexEval:
  """An objective's metrics at K points of the simplex of N models.

  Attributes:
    weights: [K, N] the points (rows on the simplex).
    metrics: {metric: [K]} exact means over the eval set at each point.
    statistics_finite: [K] whether the recomputed statistics were finite.
    statistics_vary: {layer: [K]} whether they vary (`path_core.PathEval`'s).
    labels: a name per point ('vertex 0', 'edge 0-1', 'centroid', ...).
    higher_is_better, complements: the objective's.
  """

  weights: jax.Array
  metrics: dict[str, jax.Array]
  statistics_finite: jax.Array | None = None
  statistics_vary: dict[str, jax.Array] | None = None
  labels: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())
  higher_is_better: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())
  complements: tuple[tuple[str, str], ...] = flax.struct.field(pytree_node=False, default=())

  def vertices(self) -> np.ndarray:
    """[N] the row of each vertex (model i alone); ValueError if one is not a point."""
    w = np.asarray(jax.device_get(self.weights))
    rows = []
    for i in range(w.shape[1]):
      hits = np.flatnonzero(np.all(w == np.eye(w.shape[1])[i], axis=1))
      if not hits.size:
        raise ValueError(f"The simplex barrier needs every vertex among the points; model "
                         f"{i}'s is not one (simplex_grid has them; or add np.eye(N)).")
      rows.append(int(hits[0]))
    return np.asarray(rows)

  def barriers(self) -> dict[str, np.ndarray]:
    """{barrier name: [K]} v(w) - sum_i w_i v(vertex i), per `PathEval.barrier_curves` name."""
    w = np.asarray(jax.device_get(self.weights))
    rows = self.vertices()
    curves = path_core.barrier_curves(jax.device_get(self.metrics), self.higher_is_better,
                                      self.complements)
    return {name: np.asarray(v) - w @ np.asarray(v)[rows] for name, v in curves.items()}

  def summary(self) -> dict:
    """{name: the largest barrier, name + '_label': its point, name + '_at': its weights}."""
    w = np.asarray(jax.device_get(self.weights))
    out = {}
    for name, b in self.barriers().items():
      k = int(np.argmax(b))
      out.update({name: float(b[k]), f"{name}_label": self.labels[k] if self.labels else str(k),
                  f"{name}_at": [float(x) for x in w[k]]})
    return out

  def at(self, label: str) -> dict[str, float]:
    """{metric: value} at the point named `label` (e.g. 'centroid': the merged model)."""
    if label not in self.labels:
      raise KeyError(f"No simplex point {label!r}; points: {list(self.labels)[:8]}...")
    k = self.labels.index(label)
    return {name: float(v[k]) for name, v in jax.device_get(self.metrics).items()}


# --- The pure core. ------------------------------------------------------------------


def _repair_mix(targets, w):
  """REPAIR's target statistics at w: sum_i w_i of each model's mean and std, per site."""
  return {site: {key: sum(w[i] * t[site][key] for i, t in enumerate(targets))
                 for key in ("mean", "std")} for site in targets[0]}


def simplex_loop(models, weights, eval_sets, bn_batches, *, apply_fn, strategy, chunk_size,
                 renormalize, objective):
  """({set: {metric: [K]}}, statistics finite [K], {layer: vary [K]}) at the rows of `weights`."""
  inputs = objective.inputs
  targets = None
  if renormalize == "repair":
    targets = [repair.endpoint_stats(apply_fn, m, bn_batches, inputs) for m in models]

  def at(w):
    mixed = None if targets is None else (_repair_mix(targets, w),) * 2
    variables, stats = path_core.network_at(apply_fn, paths.combination(models, w), 0.0,
                                            bn_batches, renormalize=renormalize, inputs=inputs,
                                            targets=mixed)
    return ({name: evaluation.mean_metrics(apply_fn, variables, batches, objective)
             for name, batches in eval_sets.items()}, finite.all_finite(stats),
            input_checks.statistics_vary(stats))

  return path_core.map_over(at, weights, strategy, chunk_size)


@functools.partial(jax.jit, static_argnames=("apply_fn", "strategy", "chunk_size",
                                             "renormalize", "objective"))
def simplex_jit(models, weights, eval_sets, bn_batches, *, apply_fn, strategy, chunk_size,
                renormalize, objective):
  """`simplex_loop` as one compiled program."""
  return simplex_loop(models, weights, eval_sets, bn_batches, apply_fn=apply_fn,
                      strategy=strategy, chunk_size=chunk_size, renormalize=renormalize,
                      objective=objective)


def simplex_metrics(apply_fn: ApplyFn, models: Sequence[Params], weights: chex.Array,
                    eval_sets: Mapping[str, StackedBatches],
                    bn_batches: StackedBatches | None = None, *,
                    objective: Objective = CLASSIFICATION, renormalize: str | None = "auto",
                    strategy: str | None = None, chunk_size: int = path_core.DEFAULT_CHUNK_SIZE,
                    labels: Sequence[str] = ()) -> dict[str, SimplexEval]:
  """The objective's metrics at K points of the simplex, on each eval set: one program.

  Arguments as `path_core.path_metrics`, with `models` (N params trees, not
  the full variables) for its points and `weights` ([K, N], rows on the
  simplex) for its grid. It checks what needs no data; `evaluate_simplex` is
  the checked entry point (finite inputs and results).
  """
  models, weights, apply_fn, strategy, renormalize = simplex_checks.prepare(
      apply_fn, models, weights, eval_sets, bn_batches, objective, renormalize, strategy,
      "simplex_metrics")
  out, stats_finite, stats_vary = simplex_jit(
      models, jnp.asarray(weights, jnp.float32), dict(eval_sets),
      bn_batches if renormalize else None, apply_fn=apply_fn, strategy=strategy,
      chunk_size=int(chunk_size), renormalize=renormalize, objective=objective)
  return {name: SimplexEval(weights=jnp.asarray(weights, jnp.float32), metrics=metrics,
                            statistics_finite=stats_finite, statistics_vary=stats_vary,
                            labels=tuple(labels),
                            higher_is_better=objective.higher_is_better,
                            complements=objective.complements)
          for name, metrics in out.items()}


def evaluate_simplex(apply_fn: ApplyFn, models: Sequence[Params],
                     grid: SimplexGrid | chex.Array, eval_sets: Mapping[str, StackedBatches],
                     bn_batches: StackedBatches | None = None, *,
                     objective: Objective = CLASSIFICATION, renormalize: str | None = "auto",
                     strategy: str | None = None,
                     chunk_size: int = path_core.DEFAULT_CHUNK_SIZE) -> dict[str, SimplexEval]:
  """The objective's metrics at points of the simplex of N models, per eval set; checked.

  Args:
    apply_fn: the model's apply (Linen `model.apply`; NNX through `adapters.from_nnx`).
    models: N >= 2 params trees of one architecture (aligned: `MultiAlignment.aligned`).
    grid: a `SimplexGrid` (`simplex_grid`) or weights [K, N].
    eval_sets: {name: stacked batches}, e.g. the four counterfactual views.
    bn_batches: stacked training batches for BatchNorm / REPAIR statistics.
    objective, renormalize, strategy, chunk_size: as `barriers.evaluate_path`.

  Returns:
    {name: SimplexEval} (`.summary()`: the largest barrier and where;
    `.at('centroid')`: the merged model).

  Raises:
    ValueError: bad weights or inputs (`input_checks`).
    finite.NonFiniteError: NaN or infinity in the inputs, statistics or metrics.

  Example:
    grid = simplex.simplex_grid(len(aligned))
    evals = simplex.evaluate_simplex(model.apply, [v["params"] for v in aligned], grid,
                                     views, bn_batches)
    evals["clean"].summary()["error"], evals["clean"].at("centroid")["accuracy"]
  """
  is_grid = isinstance(grid, SimplexGrid)
  weights, labels = (grid.weights, grid.labels) if is_grid else (grid, ())
  models = path_core.check_points(models, "evaluate_simplex")
  if not isinstance(eval_sets, Mapping) or not eval_sets:
    raise ValueError("evaluate_simplex: eval_sets must be a non-empty {name: stacked batches}; "
                     f"got {type(eval_sets).__name__}.")
  named = {f"the parameters of model {i} of {len(models)}": m for i, m in enumerate(models)}
  input_checks.check_inputs(apply_fn, named, dict(eval_sets), bn_batches, objective)
  out = simplex_metrics(apply_fn, models, weights, eval_sets, bn_batches, objective=objective,
                        renormalize=renormalize, strategy=strategy, chunk_size=chunk_size,
                        labels=labels)
  labels = labels or [str(k) for k in range(len(np.asarray(weights)))]
  simplex_checks.check_results(out, labels)
  simplex_checks.check_statistics_vary(next(iter(out.values())), labels)
  return out


# --- Every pair, and the merged model. ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PairwiseBarriers:
  """Every pair's linear path: `paths[(i, j)]` the `PathEval` of model i (t = 0) to j."""

  num_models: int
  paths: dict[tuple[int, int], path_core.PathEval]

  def matrix(self, name: str = "error") -> np.ndarray:
    """[N, N] barrier heights ('loss', 'error', ...: `PathEval.summary` names), 0 on the diagonal."""
    out = np.zeros((self.num_models, self.num_models))
    for (i, j), path in self.paths.items():
      out[i, j] = out[j, i] = path.summary()[name]
    return out

  def summary(self) -> dict:
    """{name: [N, N] as lists, 'mean_' + name: the mean over pairs}."""
    names = [k for k in next(iter(self.paths.values())).summary() if not k.endswith("_t")]
    out = {}
    for name in names:
      m = self.matrix(name)
      out[name] = m.tolist()
      out[f"mean_{name}"] = float(m[np.triu_indices(self.num_models, 1)].mean())
    return out


def pairwise_barriers(apply_fn: ApplyFn, models: Sequence[Params], ts: chex.Array,
                      eval_sets: Mapping[str, StackedBatches],
                      bn_batches: StackedBatches | None = None, *,
                      objective: Objective = CLASSIFICATION, renormalize: str | None = "auto",
                      strategy: str | None = None,
                      chunk_size: int = path_core.DEFAULT_CHUNK_SIZE
                      ) -> dict[str, PairwiseBarriers]:
  """The linear path of every pair i < j, at the grid `ts`, in one compiled program.

  The simplex's edges: the points (1 - t) e_i + t e_j for every pair and t,
  one `evaluate_simplex`. Each pair's `PathEval` equals
  `barriers.evaluate_path_on_sets(apply_fn, (models[i], models[j]), ts, ...)`.

  Returns: {set name: PairwiseBarriers} (`.matrix('error')`: [N, N] error barriers).
  """
  ts = path_core.check_grid(ts)
  n = len(path_core.check_points(models, "pairwise_barriers"))
  if n < 2:
    raise ValueError(f"pairwise_barriers needs at least 2 models, got {n}.")
  pairs = list(itertools.combinations(range(n), 2))
  eye = np.eye(n)
  weights = np.concatenate([np.outer(1 - ts, eye[i]) + np.outer(ts, eye[j]) for i, j in pairs])
  labels = [f"edge {i}-{j} t={t:.4g}" for i, j in pairs for t in ts]
  out = evaluate_simplex(apply_fn, models, SimplexGrid(weights, tuple(labels)), eval_sets,
                         bn_batches, objective=objective, renormalize=renormalize,
                         strategy=strategy, chunk_size=chunk_size)
  k = len(ts)
  result = {}
  for name, ev in out.items():
    per_pair = {}
    for p, pair in enumerate(pairs):
      metrics = {m: v[p * k:(p + 1) * k] for m, v in ev.metrics.items()}
      per_pair[pair] = path_core.PathEval(
          ts=jnp.asarray(ts, jnp.float32), metrics=metrics,
          statistics_finite=ev.statistics_finite[p * k:(p + 1) * k],
          statistics_vary={layer: v[p * k:(p + 1) * k] for layer, v in ev.statistics_vary.items()},
          higher_is_better=ev.higher_is_better, complements=ev.complements)
    result[name] = PairwiseBarriers(n, per_pair)
  return result


def merged_params(models: Sequence[Params], weights: chex.Array | None = None) -> Params:
  """The weighted mean of N params trees (None: the plain mean, the merged model); jittable."""
  models = path_core.check_points(models, "merged_params")
  if weights is None:
    weights = np.full(len(models), 1.0 / len(models))
  elif not isinstance(weights, jax.core.Tracer):  # checked when concrete (jittable)
    weights = check_weights(np.asarray(weights)[None], len(models))[0]
  return paths.combination(models, jnp.asarray(weights, jnp.float32))


def merged_variables(apply_fn: ApplyFn, models: Sequence[Params],
                     bn_batches: StackedBatches | None = None, *,
                     objective: Objective = CLASSIFICATION, renormalize: str | None = "auto",
                     weights: chex.Array | None = None) -> dict:
  """The merged model's variables: the mean params with BatchNorm statistics recomputed.

  Args:
    apply_fn, objective: the model's apply and what its inputs are.
    models: N params trees (aligned).
    bn_batches: stacked training batches (required for a model with BatchNorm).
    renormalize: 'auto' / 'batchnorm' / 'batchnorm_unbiased' / None; REPAIR
      needs the repaired apply (`evaluate_simplex(..., renormalize='repair')`
      evaluates the merged model with it at the 'centroid').
    weights: [N] (None: the plain mean).

  Returns: {'params', 'batch_stats'?}, ready for `apply_fn` (and to save).
  """
  params = merged_params(models, weights)
  if renormalize == "repair":
    raise ValueError("merged_variables: REPAIR renormalises through a wrapped apply; evaluate "
                     "the merged model with evaluate_simplex(..., renormalize='repair') at "
                     "the 'centroid'.")
  has_bn = bn_batches is not None and batchnorm.has_batchnorm(
      apply_fn, {"params": params},
      objective.inputs_of(jax.tree.map(lambda x: x[0], bn_batches)))
  if renormalize == "auto":
    renormalize = "batchnorm" if has_bn else None
  path_core.check_renormalize(renormalize, has_bn, bn_batches)
  if renormalize is None:
    return {"params": params}
  return {"params": params, "batch_stats": batchnorm.recompute_batch_stats(
      apply_fn, {"params": params}, bn_batches, unbiased=renormalize == "batchnorm_unbiased",
      inputs=objective.inputs)}
