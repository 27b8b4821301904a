"""Feature connectivity along a path: LLFC cosines and activation-pattern agreement, per site.

A site is a submodule's output (its first `__call__`), read with the interception
activation matching uses (`matching.site_outputs`, `mechconn.intercept`): Linen and
NNX alike. At every t of a grid, on every eval set (a view: clean, cue, conflicting),
and at every site s, with f_t the features of the network on the path at t (its
BatchNorm or REPAIR statistics recomputed, `path_core.network_at`):

- LLFC (Zhou et al., "Going Beyond Linear Mode Connectivity: The Layerwise Linear
  Feature Connectivity", NeurIPS 2023): the cosine between the path network's features
  and the interpolation of the end points' features,

    cosine_s(t) = sum_i w_i cos(f_t(x_i), (1 - t) f_a(x_i) + t f_b(x_i)) / sum_i w_i,

  each example's site output flattened (spatial positions x channels), w the
  objective's weights (the mask: padding never counts). f_a and f_b are the end
  points' own networks, their statistics recomputed as the path's are at t = 0 and
  t = 1, so cosine_s(0) = cosine_s(1) = 1 (up to rounding). LLFC holds at s when the
  cosine stays near 1 (it allows a positive scale: the cosine ignores it). For a
  non-linear path (Bezier, polygonal chain) the reference is still the linear
  interpolation of the end points' features: the question stays "are the features on
  the path those of the two end points, mixed?". The cosine of two zero vectors is 1,
  of a zero and a non-zero vector 0.
- Activation-pattern agreement: the weighted fraction of units (every element of the
  site output: examples x positions x channels, weighted by the mask) whose on/off
  state (value > 0) equals end point a's (`agreement_a`) or end point b's
  (`agreement_b`). At a site that feeds a ReLU (a BatchNorm before its ReLU; a hidden
  Dense layer of an MLP) this is the agreement of ReLU activation patterns of the
  paper's claim C13 (`tasks.theory.sign_agreement` reads the same pre-activation
  signs); it is reported at every site, and at a site that feeds no ReLU (a conv
  before its BatchNorm, the logits) it is the agreement of the outputs' signs.
  agreement_a(0) = agreement_b(1) = 1, and agreement_b(0) = agreement_a(1) is the
  agreement of the two end points' patterns.

Default sites: the output of every convolution, dense and normalisation layer
(BatchNorm, LayerNorm) in call order, the logits layer included: for SmallCNN
Conv_i, BatchNorm_i (i = 0, 1, 2) and head. A ReLU written as a function
(`nn.relu(x)`) is no module, so no interception sees its output; the BatchNorm
output before it carries the same on/off pattern, and `post=jax.nn.relu` gives the
post-ReLU features of the LLFC paper (activation matching's 'post_relu'; choose
`sites` that feed a ReLU then). `sites` names any submodule whose output is a float
array (a residual block, say); its leading axes must be the weights' (the batch;
[B, L] for a token objective, each token its own cosine).

All t run in one compiled program (`path_core.map_over`): the statistics of the network
at each t are recomputed once; each batch of an eval set runs the two end points once
and the network at every t, so no whole-set feature is stored and the end points cost
two forward passes per batch, not 2K.
"""

from collections.abc import Callable, Mapping, Sequence
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mechconn import finite
from mechconn import input_checks
from mechconn import intercept
from mechconn import matching
from mechconn import path_core
from mechconn import paths
from mechconn.objectives import Objective
from mechconn.types import ApplyFn, Params, PathFn, StackedBatches

CLASSIFICATION = path_core.CLASSIFICATION
DEFAULT_SITE_KINDS = ("conv", "dense", "batchnorm", "layernorm")  # `intercept.kind`
QUANTITIES = ("cosine", "agreement_a", "agreement_b")
SitePath = tuple[str, ...]
WHERE = "feature_connectivity"


@flax.struct.dataclass
class FeatureConnectivity:
  """Feature connectivity at every t of a grid, per eval set and site (arrays over t).

  Attributes:
    ts: [K] the grid.
    cosine: {set: {site: [K]}} the LLFC cosine (see the module docstring).
    agreement_a: {set: {site: [K]}} the fraction of units whose on/off pattern
      equals end point a's (1 at t = 0).
    agreement_b: {set: {site: [K]}} likewise for end point b (1 at t = 1).
    sites: the site names ('/'-joined module paths), in call order (the dicts
      hold their keys sorted, as pytrees do: iterate `sites` for the model's order).
  """

  ts: jax.Array
  cosine: dict[str, dict[str, jax.Array]]
  agreement_a: dict[str, dict[str, jax.Array]]
  agreement_b: dict[str, dict[str, jax.Array]]
  sites: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())

  def summary(self) -> dict[str, dict[str, dict[str, float]]]:
    """{set: {site: numbers}}, JSON-able.

    Per set and site: 'cosine_min' and 'cosine_min_t' (the lowest LLFC cosine and
    its t); 'endpoint_agreement' (end point a's pattern against b's, agreement_b at
    t = 0); 'agreement_min' and 'agreement_min_t' (the lowest over t of the
    agreement with the nearer end point, max(agreement_a, agreement_b)).
    """
    ts = np.asarray(jax.device_get(self.ts))
    cosine, agree_a, agree_b = jax.device_get((self.cosine, self.agreement_a,
                                               self.agreement_b))
    out = {}
    for name in cosine:
      out[name] = {}
      for site in self.sites:
        cos = np.asarray(cosine[name][site])
        nearer = np.maximum(np.asarray(agree_a[name][site]), np.asarray(agree_b[name][site]))
        out[name][site] = {
            "cosine_min": float(cos.min()), "cosine_min_t": float(ts[np.argmin(cos)]),
            "endpoint_agreement": float(np.asarray(agree_b[name][site])[0]),
            "agreement_min": float(nearer.min()),
            "agreement_min_t": float(ts[np.argmin(nearer)])}
    return out


# --- Sites. ------------------------------------------------------------------------


def _site_name(site: SitePath) -> str:
  return "/".join(map(str, site))


def site_table(apply_fn: ApplyFn, params: Params, inputs) -> dict[str, tuple]:
  """{site name: (module path, output shape, `intercept.kind`)} of every submodule, in call order.

  Abstract (`jax.eval_shape`, the model in training mode as `input_checks.check_outputs`
  runs it: the shapes are those of inference). A site is a submodule whose first
  `__call__` returns a float array.
  """
  order, found = [], {}

  def record(call, next_fun, args, kwargs):
    if call.method == "__call__" and call.path and call.path not in order:
      order.append(call.path)
    out = next_fun(*args, **kwargs)
    if (call.method == "__call__" and call.path not in found and isinstance(out, jax.Array)
        and jnp.issubdtype(out.dtype, jnp.inexact) and out.ndim):
      found[call.path] = (tuple(out.shape), intercept.kind(call.module))
    return out

  with intercept.intercept(record):
    jax.eval_shape(lambda p, x: apply_fn({"params": p}, x, train=True,
                                         mutable=["batch_stats"]), params, inputs)
  return {_site_name(p): (p, *found[p]) for p in order if p in found}


def choose_sites(apply_fn: ApplyFn, params: Params, batches: StackedBatches,
                 objective: Objective, sites: Sequence[str] | None) -> tuple[SitePath, ...]:
  """The module paths of the requested sites (None: `DEFAULT_SITE_KINDS`); named errors."""
  batch = jax.eval_shape(lambda b: jax.tree.map(lambda x: x[0], b), batches)
  table = site_table(apply_fn, params, jax.eval_shape(objective.inputs_of, batch))
  if sites is None:
    names = [name for name, (_, _, kind) in table.items() if kind in DEFAULT_SITE_KINDS]
    if not names:
      raise ValueError("feature_connectivity: the model calls no convolution, dense or "
                       f"normalisation layer; pass sites= from its submodules {list(table)}.")
  else:
    if isinstance(sites, str) or not isinstance(sites, Sequence):
      raise TypeError(f"feature_connectivity: sites must be a list of site names, e.g. "
                      f"{list(table)[:3]}; got {type(sites).__name__} {sites!r}.")
    names = list(dict.fromkeys(sites))
    unknown = [s for s in names if s not in table]
    if not names or unknown:
      raise ValueError(f"feature_connectivity: unknown sites {unknown or '(none given)'}; "
                       f"the model's sites (submodules with a float output) are {list(table)}.")
  lead = jax.eval_shape(objective.weights_of, batch).shape
  for name in names:
    shape = table[name][1]
    if shape[:len(lead)] != lead:
      raise ValueError(f"feature_connectivity: site {name!r} outputs shape {shape}, whose "
                       f"leading axes are not those of the objective's weights {lead} (one "
                       "value per example or token); choose another site.")
  return tuple(table[name][0] for name in names)


# --- The maths of one batch. ----------------------------------------------------------


def cosine(x: jax.Array, y: jax.Array) -> jax.Array:
  """cos(x, y) over the last axis, in [-1, 1]; 1 for two zero vectors, 0 for one."""
  norm_x = jnp.sqrt(jnp.sum(jnp.square(x), -1))
  norm_y = jnp.sqrt(jnp.sum(jnp.square(y), -1))
  nonzero = (norm_x > 0) & (norm_y > 0)
  safe_x, safe_y = jnp.where(nonzero, norm_x, 1.0), jnp.where(nonzero, norm_y, 1.0)
  cos = jnp.clip(jnp.sum(x * y, -1) / safe_x / safe_y, -1.0, 1.0)
  return jnp.where(nonzero, cos, jnp.where((norm_x == 0) & (norm_y == 0), 1.0, 0.0))


def _features(apply_fn, variables, inputs, sites, lead) -> list[jax.Array]:
  """Every site's output, float32, each [*lead, units] (lead: the weights' shape)."""
  return [f.reshape(*lead, -1) for f in matching.site_outputs(apply_fn, variables, inputs,
                                                              sites)]


def _end_features(at_a, at_b, post) -> list[tuple]:
  """Per site (post(f_a), post(f_b), f_a > 0, f_b > 0): one batch's end-point features, read at
  every t."""
  post = post or (lambda f: f)
  return [(post(fa), post(fb), fa > 0, fb > 0) for fa, fb in zip(at_a, at_b)]


def _site_sums(at_t, ends, t, w, sites, post) -> dict:
  """{quantity: {site: sum over the batch of w x value}} of the features at t."""
  post = post or (lambda f: f)
  sums = {q: {} for q in QUANTITIES}
  for site, ft, (fa, fb, on_a, on_b) in zip(sites, at_t, ends):
    name = _site_name(site)
    on = ft > 0
    sums["cosine"][name] = jnp.sum(w * cosine(post(ft), (1 - t) * fa + t * fb))
    sums["agreement_a"][name] = jnp.sum(w * jnp.mean(on == on_a, -1))
    sums["agreement_b"][name] = jnp.sum(w * jnp.mean(on == on_b, -1))
  return sums


def _set_means(batch_sums, batches):
  """The exact weighted means over a set of what `batch_sums(batch)` -> (sums, weight) sums."""
  first = jax.tree.map(lambda x: x[0], batches)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(batch_sums, first))
  (sums, weight), _ = jax.lax.scan(
      lambda acc, batch: (jax.tree.map(jnp.add, acc, batch_sums(batch)), None), zeros, batches)
  return jax.tree.map(lambda s: s / weight, sums)


_STATIC = ("apply_fn", "path_fn", "strategy", "chunk_size", "renormalize", "objective",
           "sites", "post")


@functools.partial(jax.jit, static_argnames=_STATIC)
def connectivity_jit(points, ts, eval_sets, bn_batches, *, apply_fn, path_fn, strategy,
                     chunk_size, renormalize, objective, sites, post):
  """({set: {quantity: {site: [K]}}}, statistics finite [K], end points' statistics finite).

  The statistics of the network at each t are computed once (over t by `strategy`);
  then each batch of a set runs the two end points once and the network at every t
  (its parameters formed again by the path: tree maths), so the end points' features
  are computed once per batch, not once per batch and t, and never stored beyond it.
  """
  targets = path_core.repair_targets(apply_fn, points, bn_batches, renormalize,
                                     objective.inputs)

  def network(t):
    return path_core.network_at(apply_fn, path_fn(points, t), t, bn_batches,
                                renormalize=renormalize, inputs=objective.inputs,
                                targets=targets)

  def state_at(t):  # what the network at t is normalised to: its collections but 'params'
    variables, stats = network(t)
    return {k: v for k, v in variables.items() if k != "params"}, finite.all_finite(stats)

  states, stats_finite = path_core.map_over(state_at, ts, strategy, chunk_size)
  (variables_a, stats_a), (variables_b, stats_b) = network(0.0), network(1.0)

  def batch_sums(batch):
    w, x = objective.weights_of(batch), objective.inputs_of(batch)
    ends = _end_features(*(_features(apply_fn, v, x, sites, w.shape)
                           for v in (variables_a, variables_b)), post)

    def at(t_and_state):
      t, state = t_and_state
      at_t = _features(apply_fn, {"params": path_fn(points, t), **state}, x, sites, w.shape)
      return _site_sums(at_t, ends, t, w, sites, post)

    return path_core.map_over(at, (ts, states), strategy, chunk_size), jnp.sum(w)

  out = {name: _set_means(batch_sums, batches) for name, batches in eval_sets.items()}
  return out, stats_finite, finite.all_finite((stats_a, stats_b))


# --- The checked, eager entry point. ----------------------------------------------------


def feature_connectivity(apply_fn: ApplyFn, points: Sequence[Params], ts,
                         eval_sets: Mapping[str, StackedBatches],
                         bn_batches: StackedBatches | None = None, *,
                         objective: Objective = CLASSIFICATION, path: str | PathFn = "linear",
                         renormalize: str | None = "auto", strategy: str | None = None,
                         chunk_size: int = path_core.DEFAULT_CHUNK_SIZE,
                         sites: Sequence[str] | None = None,
                         post: Callable[[jax.Array], jax.Array] | None = None
                         ) -> FeatureConnectivity:
  """LLFC cosines and activation-pattern agreement at every t of a path, per set and site.

  Eager and checked (as `barriers.evaluate_path_on_sets`): the inputs are checked,
  one compiled program runs every t (`connectivity_jit`, the pure core), and a result
  from non-finite statistics or features raises. The formulas, the default sites and
  what the agreement means at each site: the module docstring.

  Arguments not listed take their meaning from `path_core.path_metrics` (points
  are params; ts a grid from 0 to 1; eval_sets {name: stacked batches}, each a view).

  Args:
    sites: site names ('/'-joined module paths, e.g. ['BatchNorm_1', 'head']);
      None: every conv, dense and normalisation layer's output.
    post: maps every site's features before the cosine (e.g. `jax.nn.relu`, at
      sites that feed a ReLU: the post-ReLU features); the agreement reads the
      site's own output (value > 0).

  Returns:
    FeatureConnectivity with cosine, agreement_a and agreement_b, each
    {set: {site: [K]}}, and `summary()`.

  Raises:
    TypeError, ValueError: malformed points, grid, batches or sites (an unknown site
      names the model's sites), as `evaluate_path`'s checks.
    finite.NonFiniteError: NaN or infinity in the inputs, the recomputed statistics
      (the t named) or a result (the set, site and t named).

  Example:
    >>> fc = feature_connectivity(model.apply, (params_a, params_b), np.linspace(0, 1, 11),
    ...                           {"clean": clean, "cue": cue}, bn_batches)
    >>> clean = fc.cosine["clean"]; clean["BatchNorm_2"]      # [11]
    >>> cue = fc.summary()["cue"]; cue["BatchNorm_2"].get("cosine_min")
  """
  points = path_core.check_points(points, WHERE)
  ts = path_core.check_grid(ts)
  statics, bn_batches = _prepare(apply_fn, points, eval_sets, bn_batches, objective=objective,
                                 path=path, renormalize=renormalize, strategy=strategy,
                                 sites=sites)
  out, stats_finite, ends_finite = connectivity_jit(
      points, jnp.asarray(ts, jnp.float32), dict(eval_sets), bn_batches,
      chunk_size=int(chunk_size), post=post, **statics)
  _check_results(ts, out, stats_finite, ends_finite, statics["renormalize"])
  return FeatureConnectivity(
      ts=jnp.asarray(ts, jnp.float32), sites=tuple(map(_site_name, statics["sites"])),
      **{q: {name: per_set[q] for name, per_set in out.items()} for q in QUANTITIES})


def _prepare(apply_fn, points, eval_sets, bn_batches, *, objective, path, renormalize,
             strategy, sites) -> tuple[dict, StackedBatches | None]:
  """Checks the inputs; (the core's statics but chunk_size and post, the statistics batches)."""
  paths.check_matching(points)
  if isinstance(eval_sets, Mapping):
    for name, batches in eval_sets.items():
      input_checks.check_batches(batches, f"eval set {name!r}", objective)
  if bn_batches is not None:
    input_checks.check_batches(bn_batches, "bn_batches", objective, weighted=False)
  core_apply, path_fn, strategy, renormalize = path_core.resolve(
      apply_fn, points, eval_sets, bn_batches, objective=objective, path=path,
      renormalize=renormalize, strategy=strategy, where=WHERE)
  # The sites and checks read the user's apply_fn: REPAIR's wrapper runs only with statistics.
  chosen = choose_sites(apply_fn, points[0], next(iter(eval_sets.values())), objective, sites)
  bn_batches = bn_batches if renormalize else None
  named_points = {f"the parameters of path point {i} of {len(points)} (point 0 is t = 0)": p
                  for i, p in enumerate(points)}
  input_checks.check_inputs(apply_fn, named_points, dict(eval_sets), bn_batches, objective,
                            where=WHERE)
  return dict(apply_fn=core_apply, path_fn=path_fn, strategy=strategy, renormalize=renormalize,
              objective=objective, sites=chosen), bn_batches


def _check_results(ts: np.ndarray, out: dict, stats_finite, ends_finite,
                   renormalize: str | None) -> None:
  """Raises NonFiniteError naming where (t; set and site) statistics or results are not finite."""
  kind = "REPAIR" if renormalize == "repair" else "BatchNorm"
  stats_finite = np.asarray(jax.device_get(stats_finite))
  flags = {f"the recomputed {kind} statistics of the end points' networks": ends_finite}
  if not stats_finite.all():
    flags[f"the recomputed {kind} statistics at t = "
          + ", ".join(f"{t:.3g}" for t in ts[~stats_finite])] = False
  for name, per_set in jax.device_get(out).items():
    for quantity, per_site in per_set.items():
      for site, values in per_site.items():
        bad = ~np.isfinite(np.asarray(values))
        if bad.any():
          flags[f"the {quantity} at site {site!r} on {name!r} at t = "
                + ", ".join(f"{t:.3g}" for t in ts[bad])] = False
  finite.raise_if_any(flags, "Feature connectivity")
