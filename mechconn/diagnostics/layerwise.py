"""Layer-wise barriers: which parameter groups carry a path's barrier.

After Adilova et al. (ICLR 2024, "Layer-wise linear mode connectivity"): for a
parameter group g (a layer, a block; `diagnostics.groups`), the network at t
moves only g along the path and keeps every other parameter at one end point:

  theta_g(t)[leaf] = path(t)[leaf]   if leaf in g,
                     anchor[leaf]    otherwise,

with anchor the first point (anchor 'a') or the last (anchor 'b'); mode
'all_but' moves every leaf except g's. The barrier of each such path
(`path_core.barrier_height` over its own end values, so the chord joins
theta_g(0) and theta_g(1)) says how much of the barrier g alone carries, or
how much is left without it. BatchNorm statistics are recomputed at every
point, as on the full path; REPAIR is refused (its targets interpolate the end
points' statistics, which a path that moves one group does not have).

Every (group, mode, anchor, t) is one point of one compiled program: the
selection of moving leaves is a per-leaf lookup into a table fixed at trace
time, so G groups cost one compile and G x modes x anchors x K evaluations.

Example:
  >>> lw = layerwise.layerwise_barriers(model.apply, (a, b), np.linspace(0, 1, 11),
  ...                                   {"clean": batches}, bn_batches)
  >>> clean = lw.summary()["clean"]; clean["Conv_0"].get("only@a")  # {'loss', 'error'}
"""

from collections.abc import Mapping, Sequence
import functools
import itertools

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np

from mechconn import evaluation
from mechconn import finite
from mechconn import path_core
from mechconn.diagnostics import groups as groups_lib
from mechconn.objectives import Objective
from mechconn.types import ApplyFn, Params, PathFn, StackedBatches

MODES = ("only", "all_but")  # move the group alone, or everything but the group
ANCHORS = ("a", "b")  # where the parameters that do not move stay: the first or last point


@flax.struct.dataclass
class LayerwiseBarriers:
  """Metrics along each group's path: {set: {metric: [G, modes, anchors, K]}}.

  Attributes:
    ts: [K] the grid.
    metrics: {set: {metric: [groups, modes, anchors, K]}}.
    groups: the group names (axis 0), `modes` (axis 1), `anchors` (axis 2).
    members: {group: its leaf paths}.
    higher_is_better, complements: the objective's.
  """

  ts: jax.Array
  metrics: dict[str, dict[str, jax.Array]]
  groups: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())
  modes: tuple[str, ...] = flax.struct.field(pytree_node=False, default=MODES)
  anchors: tuple[str, ...] = flax.struct.field(pytree_node=False, default=ANCHORS)
  members: dict[str, tuple[str, ...]] = flax.struct.field(pytree_node=False, default=None)
  higher_is_better: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())
  complements: tuple[tuple[str, str], ...] = flax.struct.field(pytree_node=False, default=())

  def path_eval(self, eval_set: str, group: str, mode: str = "only",
                anchor: str = "a") -> path_core.PathEval:
    """The `PathEval` of one group's path (its barriers from `summary()`)."""
    g, m, a = self.groups.index(group), self.modes.index(mode), self.anchors.index(anchor)
    return path_core.PathEval(
        ts=self.ts, metrics={k: v[g, m, a] for k, v in self.metrics[eval_set].items()},
        higher_is_better=self.higher_is_better, complements=self.complements)

  def excess(self, eval_set: str, barrier: str = "loss", mode: str = "only",
             anchor: str = "a") -> np.ndarray:
    """[G, K]: each group's barrier curve minus its chord (the heatmap's cells)."""
    ts = np.asarray(self.ts)
    rows = []
    for group in self.groups:
      curve = np.asarray(self.path_eval(eval_set, group, mode, anchor).barrier_curves()[barrier])
      rows.append(curve - ((1 - ts) * curve[0] + ts * curve[-1]))
    return np.stack(rows)

  def summary(self) -> dict:
    """{set: {group: {'only@a': {barrier: height, barrier + '_t': t}, ...}}}."""
    return {name: {group: {f"{mode}@{anchor}": self.path_eval(name, group, mode, anchor).summary()
                           for mode in self.modes for anchor in self.anchors}
                   for group in self.groups}
            for name in self.metrics}


def _configurations(members, modes, anchors):
  """(moving leaves, anchor index) per configuration, in [G, modes, anchors] order."""
  out = []
  for leaves, mode, anchor in itertools.product(members, modes, anchors):
    out.append((frozenset(leaves), mode == "only", ANCHORS.index(anchor)))
  return out


def _moving_table(points, configs):
  """A tree like the parameters of [C] bool arrays: which configurations move each leaf."""
  paths = groups_lib.leaf_paths(points[0])
  flags = [jnp.asarray([(p in leaves) == only for leaves, only, _ in configs]) for p in paths]
  treedef = jax.tree.structure(points[0])
  return jax.tree.unflatten(treedef, flags)


_STATIC = ("apply_fn", "path_fn", "strategy", "chunk_size", "renormalize", "objective",
           "configs")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _layerwise_program(points, ts, eval_sets, bn_batches, *, apply_fn, path_fn, strategy,
                       chunk_size, renormalize, objective, configs):
  """({set: {metric: [C * K]}}, statistics finite [C * K]) over every (configuration, t)."""
  moving = _moving_table(points, configs)
  anchor_is_last = jnp.asarray([anchor == 1 for _, _, anchor in configs])
  config_index = jnp.repeat(jnp.arange(len(configs)), ts.shape[0])
  t_of = jnp.tile(ts, len(configs))

  def at(index_and_t):
    c, t = index_and_t
    on_path = path_fn(points, t)
    anchor = jax.tree.map(lambda first, last: jnp.where(anchor_is_last[c], last, first),
                          points[0], points[-1])
    params = jax.tree.map(lambda table, moved, still: jnp.where(table[c], moved, still),
                          moving, on_path, anchor)
    variables, stats = path_core.network_at(apply_fn, params, t, bn_batches,
                                            renormalize=renormalize, inputs=objective.inputs)
    return ({name: evaluation.mean_metrics(apply_fn, variables, batches, objective)
             for name, batches in eval_sets.items()}, finite.all_finite(stats))

  return path_core.map_over(at, (config_index, t_of), strategy, chunk_size)


def _check_choice(values, valid, name) -> tuple[str, ...]:
  values = (values,) if isinstance(values, str) else tuple(values)
  bad = [v for v in values if v not in valid]
  if bad or not values:
    raise ValueError(f"layerwise_barriers: {name} must be a non-empty subset of {valid}; "
                     f"got {list(values)}.")
  return values


def layerwise_barriers(apply_fn: ApplyFn, points: Sequence[Params], ts: chex.Array,
                       eval_sets: Mapping[str, StackedBatches],
                       bn_batches: StackedBatches | None = None, *,
                       groups: groups_lib.Groups = None, modes: Sequence[str] = MODES,
                       anchors: Sequence[str] = ANCHORS,
                       objective: Objective = path_core.CLASSIFICATION,
                       path: str | PathFn = "linear", renormalize: str | None = "auto",
                       strategy: str | None = None,
                       chunk_size: int = path_core.DEFAULT_CHUNK_SIZE) -> LayerwiseBarriers:
  """Each group's path (only it moves, or all but it), on each eval set, at every t.

  The arguments it shares with `path_core.path_metrics` mean what they mean there.

  Args:
    groups: `diagnostics.groups.Groups` (None: the top-level submodules).
    modes: 'only' (the group moves, the rest stays at the anchor) and/or
      'all_but' (everything but the group moves).
    anchors: 'a' (the still parameters stay at the first point) and/or 'b'
      (at the last).
    renormalize: 'auto', 'batchnorm', 'batchnorm_unbiased' or None ('repair'
      is refused, see the module docstring).

  Returns:
    A `LayerwiseBarriers`; `summary()` gives every path's barriers and
    `excess()` the heatmap of one (group x t).

  Raises:
    NonFiniteError: where statistics or metrics are not finite (names the
      group, mode, anchor and t).
  """
  points = path_core.check_points(points, "layerwise_barriers")
  ts = path_core.check_grid(ts)
  modes, anchors = _check_choice(modes, MODES, "modes"), _check_choice(anchors, ANCHORS, "anchors")
  if renormalize == "repair":
    raise ValueError("layerwise_barriers: renormalize='repair' is not defined for a path that "
                     "moves one group (REPAIR's targets interpolate the end points' statistics); "
                     "use 'batchnorm' (models with BatchNorm) or None.")
  members = groups_lib.parameter_groups(points[0], groups)
  apply_fn, path_fn, strategy, renormalize = path_core.resolve(
      apply_fn, points, eval_sets, bn_batches, objective=objective, path=path,
      renormalize=renormalize, strategy=strategy, where="layerwise_barriers")
  configs = tuple(_configurations(members.values(), modes, anchors))
  ts = jnp.asarray(ts, jnp.float32)
  out, stats_finite = _layerwise_program(
      points, ts, dict(eval_sets), bn_batches if renormalize else None, apply_fn=apply_fn,
      path_fn=path_fn, strategy=strategy, chunk_size=int(chunk_size), renormalize=renormalize,
      objective=objective, configs=configs)
  shape = (len(members), len(modes), len(anchors), ts.shape[0])
  labels = [f"group {g!r} {m}@{a}" for g, m, a in itertools.product(members, modes, anchors)]
  _check_finite(np.asarray(ts), out, stats_finite, labels)
  metrics = {name: {k: jnp.reshape(v, shape) for k, v in values.items()}
             for name, values in out.items()}
  return LayerwiseBarriers(ts=ts, metrics=metrics, groups=tuple(members), modes=modes,
                           anchors=anchors, members=members,
                           higher_is_better=objective.higher_is_better,
                           complements=objective.complements)


def _check_finite(ts, out, stats_finite, labels) -> None:
  """Raises NonFiniteError naming each (configuration, t) with non-finite numbers."""
  k = ts.shape[0]

  def where(bad):
    return "; ".join(f"{labels[i // k]} at t = {ts[i % k]:.3g}" for i in np.flatnonzero(bad))

  flags = {}
  stats_ok = np.asarray(jax.device_get(stats_finite))
  if not stats_ok.all():
    flags[f"the recomputed statistics ({where(~stats_ok)})"] = False
  for name, metrics in jax.device_get(out).items():
    for metric, values in metrics.items():
      bad = ~np.isfinite(np.asarray(values))
      if bad.any():
        flags[f"the {metric} on {name!r} ({where(bad)})"] = False
  finite.raise_if_any(flags, "Layer-wise barriers")
