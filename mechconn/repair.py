"""REPAIR: renormalising the activations of an interpolated network without BatchNorm.

Interpolating two networks shrinks the variance of their hidden activations
(the units of the two end points are only partly correlated), and the
collapse compounds with depth. REPAIR (Jordan, Sedghi, Saukh, Entezari,
Neyshabur, "REPAIR: REnormalizing Permuted Activations for Interpolation
Repair", ICLR 2023) restores, at every site, the statistics the interpolated
network should have: each unit's activation is standardised by the
interpolated network's own mean and standard deviation and rescaled to the
interpolation of the end points' ones,

  y' = (y - mean_t) / sqrt(var_t + eps) * ((1 - t) std_A + t std_B) + (1 - t) mean_A + t mean_B.

Sites are module outputs (by default every conv and dense layer, Linen or NNX, but the
last one called: the logits stay as they are). The interpolated network's own
statistics are computed like the exact BatchNorm reset of `batchnorm`: a pass
over the batches in which every site normalises by its batch's moments (so
later sites see the earlier ones corrected), then the plain mean of the
per-batch mean and biased variance. The end points' statistics are their
sites' outputs, uncorrected, averaged the same way. All of it is traceable:
`barriers.evaluate_path(..., renormalize='repair')` runs it at every t inside
its one compiled program.
"""

from collections.abc import Callable
import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp

from mechconn import intercept
from mechconn.types import ApplyFn, StackedBatches

COLLECTION = "repair"  # {site path: {"stats": {"mean", "var", "target_mean", "target_std"}}}
EPSILON = 1e-5


def default_site(module) -> bool:
  """Every convolution and dense layer, Linen or NNX (the last one called is dropped by
  `sites_of`)."""
  return intercept.kind(module) in ("conv", "dense")


def _moments(y: jax.Array) -> dict[str, jax.Array]:
  axes = tuple(range(y.ndim - 1))
  mean = jnp.mean(y, axis=axes)
  return {"mean": mean, "var": jnp.mean(jnp.square(y - jnp.expand_dims(mean, axes)), axis=axes)}


@dataclasses.dataclass(frozen=True)
class Repaired:
  """`apply_fn` with REPAIR at `sites` (module paths); hashable, so a static jit argument.

  Called like the model's apply with variables that hold `COLLECTION`; with
  `mode='moments'` it returns each site's batch moments instead (correcting
  the sites by them, so later sites see the earlier ones corrected), with
  `mode='moments_only'` the uncorrected sites' moments.
  """

  apply_fn: ApplyFn
  sites: tuple[tuple[str, ...], ...]

  def __call__(self, variables, *args, mode: str = "apply", **kwargs):
    per_site = _tree_to_sites(variables.get(COLLECTION, {}), depth=1)
    model_variables = {k: v for k, v in variables.items() if k != COLLECTION}
    recorded: dict = {}

    def repair(call, next_fun, a, kw):
      out = next_fun(*a, **kw)
      if call.method != "__call__" or call.path not in self.sites:
        return out
      y = jnp.asarray(out, jnp.float32)
      if mode == "apply":
        moments = per_site[call.path]
      else:
        moments = recorded[call.path] = _moments(y)
        if mode == "moments_only":
          return out
      stats = per_site[call.path]
      per_unit = lambda v: jnp.expand_dims(v, tuple(range(y.ndim - 1)))  # [C] -> [1, ..., C]
      y = (y - per_unit(moments["mean"])) / per_unit(jnp.sqrt(moments["var"] + EPSILON)) * \
          per_unit(stats["target_std"]) + per_unit(stats["target_mean"])
      return y.astype(jnp.asarray(out).dtype)

    with intercept.intercept(repair):
      out = self.apply_fn(model_variables, *args, **kwargs)
    return out if mode == "apply" else recorded


def sites_of(apply_fn: ApplyFn, variables: dict, images, is_site: Callable[[Any], bool]
             = default_site) -> tuple[tuple[str, ...], ...]:
  """Paths of the modules `is_site` accepts, in call order, without the last one (the logits)."""
  found = []

  def record(call, next_fun, args, kwargs):
    if call.method == "__call__" and is_site(call.module) and call.path not in found:
      found.append(call.path)
    return next_fun(*args, **kwargs)

  with intercept.intercept(record):
    jax.eval_shape(lambda v, x: apply_fn(v, x, train=False), variables, images)
  return tuple(found[:-1])


def _tree_to_sites(tree, depth: int = 1) -> dict:
  """{site path: {name: array}} of the `COLLECTION` variables ({...site: {'stats': {...}}})."""
  per_site: dict = {}
  for path, value in flax.traverse_util.flatten_dict(tree).items():
    per_site.setdefault(path[:-1 - depth], {})[path[-1]] = value
  return per_site


def _sites_to_tree(per_site: dict) -> dict:
  """The `COLLECTION` variables ({...site: {'stats': {...}}}) of {site path: {name: array}}."""
  return flax.traverse_util.unflatten_dict(
      {(*site, "stats", name): v for site, d in per_site.items() for name, v in d.items()})


def _mean_moments(repaired: Repaired, variables, batches: StackedBatches, mode: str,
                  inputs: str | Callable = "image") -> dict:
  """{site: {'mean', 'var'}}: the mean over batches of each batch's moments."""
  select = inputs if callable(inputs) else (lambda batch: batch[inputs])

  def moments(batch):
    return repaired(variables, select(batch), train=False, mode=mode)

  first = jax.tree.map(lambda x: x[0], batches)
  num_batches = jax.tree.leaves(batches)[0].shape[0]
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(moments, first))
  total, _ = jax.lax.scan(lambda acc, b: (jax.tree.map(jnp.add, acc, moments(b)), None),
                          zeros, batches)
  return jax.tree.map(lambda s: s / num_batches, total)


def endpoint_stats(repaired: Repaired, params, batches: StackedBatches,
                   inputs: str | Callable = "image") -> dict:
  """{site: {'mean', 'std'}} of an end point's uncorrected sites over the batches.

  `inputs`: the key of the model's input in a batch, or inputs(batch).
  """
  m = _mean_moments(repaired, {"params": params}, batches, "moments_only", inputs)
  return {site: {"mean": s["mean"], "std": jnp.sqrt(s["var"])} for site, s in m.items()}


def repaired_variables(repaired: Repaired, params, target_a: dict, target_b: dict, t,
                       batches: StackedBatches, inputs: str | Callable = "image") -> dict:
  """Variables of `params` (the network at t) with REPAIR's statistics, for `repaired`.

  The targets interpolate the end points' statistics at t; the network's own
  statistics are recomputed with every site corrected by its batch's moments.
  """
  targets = {site: {"target_mean": (1 - t) * target_a[site]["mean"] + t * target_b[site]["mean"],
                    "target_std": (1 - t) * target_a[site]["std"] + t * target_b[site]["std"]}
             for site in target_a}
  with_targets = {"params": params, COLLECTION: _sites_to_tree(
      {site: {**tg, "mean": jnp.zeros_like(tg["target_mean"]),
              "var": jnp.ones_like(tg["target_std"])} for site, tg in targets.items()})}
  own = _mean_moments(repaired, with_targets, batches, "moments", inputs)
  return {"params": params, COLLECTION: _sites_to_tree(
      {site: {**targets[site], "mean": own[site]["mean"], "var": own[site]["var"]}
       for site in targets})}
