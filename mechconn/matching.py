"""Finding the permutation that aligns one network to another.

`weight_matching` (Git Re-Basin's Algorithm 1: coordinate descent over
permutation groups, each step an exact linear assignment) and
`activation_matching` (each unit to its most correlated unit, from exact
correlations over many batches). Both take a `align.PermutationSpec`, hand-
written (`align.permutation_spec`) or derived (`symmetry.derive_spec`), and
return a `Permutation` for `align.apply_permutation`. `weight_matching` reads
only parameters (params or the full variables); `activation_matching` runs the
networks and takes the full variables ({'params', 'batch_stats'?, ...}).
"""

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from mechconn import align
from mechconn import intercept
from mechconn.align import Params, Permutation, PermutationSpec
from mechconn.types import ApplyFn


# --- Weight matching (Git Re-Basin, Algorithm 1). ------------------------------------


def weight_matching(spec: PermutationSpec, reference: Params, other: Params, *,
                    max_iter: int = 100, seed: int = 0, init: Permutation | None = None,
                    groups: Iterable[str] | None = None) -> Permutation:
  """Permutation of `other` maximising sum over leaves of <reference, permuted other>.

  Coordinate descent over permutation groups in a random order (seeded): for
  one group, with all others fixed, the objective is linear in its assignment,
  solved exactly by `scipy.optimize.linear_sum_assignment`. Stops when a full
  sweep improves nothing. Only the 'params' leaves are matched, so params
  suffice; full variables are accepted too (their 'params' are read).

  Args:
    spec: the architecture's spec.
    reference: params (or variables) to match (left unchanged).
    other: params (or variables) to permute.
    max_iter: at most this many sweeps.
    seed: the order of groups in each sweep.
    init: the permutation to start from (None: the identity).
    groups: the groups to match (None: all); the others keep `init`'s.

  Returns:
    perm such that `apply_permutation(spec, perm, other)` is aligned to reference.

  Raises:
    TypeError: `spec` is not a PermutationSpec, or a model is not a dict
      (arguments swapped?).
    ValueError: the spec has no permutation group (nothing to permute), does
      not fit the params, or the two models differ in a leaf's shape (`check_pair`).

  Example:
    perm = weight_matching(spec, variables_a, variables_b)
    aligned_b = align.apply_permutation(spec, perm, variables_b)
  """
  call = "weight_matching(spec, reference, other)"
  align._check_spec_arg(spec, call)
  align.check_has_groups(spec, call)
  reference = align._params_of(reference, call, "reference")
  other = align._params_of(other, call, "other")
  align.check_pair(spec, reference, other)
  ref, oth = _viewed(spec, reference), _viewed(spec, other)
  perm_to_axes = {name: [(p, a) for p, a in where if p in ref]
                  for name, where in spec.perm_to_axes.items()}
  nested = _nested_groups(spec, perm_to_axes)
  perm = align.identity_permutation(spec, reference)
  perm.update({name: np.asarray(p) for name, p in (init or {}).items()})
  rng = np.random.default_rng(seed)
  names = sorted(perm) if groups is None else sorted(groups)
  for _ in range(max_iter):
    improved = False
    for name in rng.permutation(names):
      improved |= _match_group(spec, ref, oth, perm, name, perm_to_axes[name], nested[name])
    if not improved:
      break
  return perm


def _viewed(spec: PermutationSpec, params: Params) -> dict[str, np.ndarray]:
  """{leaf path: the leaf in float64, in its view shape} of a params tree."""
  return {k: spec.view(k, np.asarray(v, np.float64))
          for k, v in align.flatten_variables({"params": params}).items()}


def _match_group(spec, ref, oth, perm, name, where, nested) -> bool:
  """Reassigns group `name` exactly, the others fixed; True when that improved the objective."""
  similarity = _similarity(spec, ref, oth, perm, name, where, nested)
  _, assignment = linear_sum_assignment(similarity, maximize=True)
  n = len(perm[name])
  old = similarity[np.arange(n), perm[name]].sum()
  new = similarity[np.arange(n), assignment].sum()
  if new > old + 1e-12 * max(1.0, abs(old)):
    perm[name] = assignment
    return True
  return False


# Groups of at most this many units are matched with their nested groups relaxed.
MAX_RELAXED_GROUP = 64


def _nested_groups(spec: PermutationSpec, perm_to_axes) -> dict[str, list[str]]:
  """{group: groups that only ever appear beside it} (a head's units, beside the heads).

  Matching heads with their units held at a wrong permutation compares the
  wrong units and can stop coordinate descent at a local optimum; so each
  pair of heads is scored by the best assignment of the units inside them.
  """
  leaves = {name: {path for path, _ in where} for name, where in perm_to_axes.items()}
  return {name: [other for other in sorted(leaves) if other != name
                 and leaves[other] <= leaves[name]
                 and len(perm_to_axes[name]) and leaves[other]]
          for name in leaves}


def _similarity(spec, ref, oth, perm, name, where, nested) -> np.ndarray:
  """[n, n]: how well unit i of reference matches unit j of other, for group `name`."""
  n = len(perm[name])
  relax = nested if n <= MAX_RELAXED_GROUP else []
  similarity = np.zeros((n, n))
  blocks: dict[str, np.ndarray] = {}  # nested group -> [n, m, n, m]
  for path, axis in where:
    inner = [(a, p) for a, p in enumerate(spec.axes[path]) if p in relax]
    w_oth = oth[path]
    for other_axis, p in enumerate(spec.axes[path]):  # other groups at current perms
      if p is not None and other_axis != axis and (len(inner) != 1 or p != inner[0][1]):
        w_oth = np.take(w_oth, perm[p], axis=other_axis)
    if len(inner) == 1:  # score (i, j) by the best assignment of the nested group's units
      inner_axis, g = inner[0]
      m = w_oth.shape[inner_axis]
      a = np.moveaxis(ref[path], (axis, inner_axis), (0, 1)).reshape(n, m, -1)
      b = np.moveaxis(w_oth, (axis, inner_axis), (0, 1)).reshape(n, m, -1)
      blocks[g] = blocks.get(g, 0) + np.einsum("iur,jvr->iujv", a, b)
    else:
      similarity += np.moveaxis(ref[path], axis, 0).reshape(n, -1) @ \
          np.moveaxis(w_oth, axis, 0).reshape(n, -1).T
  for block in blocks.values():
    for i in range(n):
      for j in range(n):
        rows, cols = linear_sum_assignment(block[i, :, j, :], maximize=True)
        similarity[i, j] += block[i, rows, j, cols].sum()
  return similarity


# --- Activation matching. -----------------------------------------------------------


def site_outputs(apply_fn: ApplyFn, variables: dict, images: jax.Array,
                 sites: Iterable[tuple[str, ...]], post=None) -> list[jax.Array]:
  """Outputs of the given modules' first __call__ (through `post`, if given), flattened to
  [examples * positions, units]."""
  sites = [tuple(site) for site in sites]
  wanted, outputs = set(sites), {}

  def record(call, next_fun, args, kwargs):
    out = next_fun(*args, **kwargs)
    if call.method == "__call__" and call.path in wanted:
      outputs.setdefault(call.path, out)
    return out

  with intercept.intercept(record):
    apply_fn(variables, images, train=False)
  missing = [site for site in sites if site not in outputs]
  if missing:
    raise ValueError(f"Activation matching: the model never called the modules {missing[:3]} "
                     "named as sites by the spec (a spec of another architecture?).")
  values = [outputs[site] if post is None else post(outputs[site]) for site in sites]
  return [v.reshape(-1, v.shape[-1]).astype(jnp.float32) for v in values]


def _merge_moments(m1, m2):
  """Chan et al.'s pairwise update of (n, mean_a, mean_b, M2_a, M2_b, C_ab)."""
  n1, ma1, mb1, sa1, sb1, c1 = m1
  n2, ma2, mb2, sa2, sb2, c2 = m2
  n = n1 + n2
  da, db = ma2 - ma1, mb2 - mb1
  w = n1 * n2 / n
  return (n, ma1 + da * n2 / n, mb1 + db * n2 / n, sa1 + sa2 + da**2 * w, sb1 + sb2 + db**2 * w,
          c1 + c2 + np.outer(da, db) * w)


def _check_activation_args(spec, variables_ref, variables_other, call: str) -> None:
  """Raises unless `spec` is a spec and both models are full variables."""
  align._check_spec_arg(spec, call, position="second")
  align.check_has_groups(spec, call)
  align._check_variables_arg(variables_ref, call, "variables_ref")
  align._check_variables_arg(variables_other, call, "variables_other")


def activation_statistics(apply_fn: ApplyFn, spec: PermutationSpec,
                          variables_ref: dict, variables_other: dict,
                          batches: Iterable[jax.Array], post=None) -> dict[str, np.ndarray]:
  """Correlation of every unit of `reference` with every unit of `other`, per group.

  Per batch, means and centred second moments of the two models' activations
  (over examples and spatial positions) are computed on device; batches are
  merged on the host in float64 (Chan et al.'s pairwise update), so the result
  is the exact Pearson correlation over all the data, not an average of
  per-batch estimates. A group with several sites (e.g. a residual stream)
  sums their correlations. `post` (e.g. `jax.nn.relu`) maps every site's
  output first: sites are module outputs, before the nonlinearity that follows
  them, and units that differ only in their bias correlate perfectly there.

  Args:
    apply_fn: `model.apply`, run in inference mode (`train=False`).
    spec: the architecture's spec; its `sites` are correlated.
    variables_ref, variables_other: the two models' full variables
      ({'params', 'batch_stats'?, ...}): BatchNorm reads its statistics.
    batches: image batches, each [B, ...].
    post: maps every site's output first (None: the outputs themselves).

  Returns:
    {group: [n, n] correlations (reference units x other units)} for every
    group with sites.

  Example:
    corr = activation_statistics(model.apply, spec, variables_a, variables_b, batches)
  """
  _check_activation_args(spec, variables_ref, variables_other,
                         "activation_statistics(apply_fn, spec, variables_ref, "
                         "variables_other, batches)")
  names = [name for name in spec.names if spec.sites.get(name)]
  all_sites = [site for name in names for site in spec.sites[name]]

  @jax.jit
  def moments(images):
    acts_a = site_outputs(apply_fn, variables_ref, images, all_sites, post)
    acts_b = site_outputs(apply_fn, variables_other, images, all_sites, post)
    out = []
    for a, b in zip(acts_a, acts_b):
      ca, cb = a - a.mean(0, keepdims=True), b - b.mean(0, keepdims=True)
      out.append((jnp.float32(a.shape[0]), a.mean(0), b.mean(0), (ca * ca).sum(0),
                  (cb * cb).sum(0), ca.T @ cb))
    return out

  totals = None
  for images in batches:
    m = jax.device_get(moments(images))
    m = [tuple(np.asarray(x, np.float64) for x in site) for site in m]
    totals = m if totals is None else [_merge_moments(t, x) for t, x in zip(totals, m)]
  if totals is None:
    raise ValueError("activation_statistics needs at least one batch.")
  return _correlations(spec, names, totals)


def _correlations(spec: PermutationSpec, names: list[str], totals: list) -> dict[str, np.ndarray]:
  """{group: the sum over its sites of the correlations}, from merged moments per site."""
  out, i = {}, 0
  for name in names:
    corr = 0.0
    for _ in spec.sites[name]:
      _, _, _, m2_a, m2_b, c_ab = totals[i]
      i += 1
      corr = corr + c_ab / np.outer(np.sqrt(m2_a) + 1e-12, np.sqrt(m2_b) + 1e-12)
    out[name] = corr
  return out


def activation_matching(apply_fn: ApplyFn, spec: PermutationSpec,
                        variables_ref: dict, variables_other: dict,
                        batches: Iterable[jax.Array], post=None) -> Permutation:
  """Permutation of `other` matching each unit to its most correlated unit of reference.

  One assignment per group (`linear_sum_assignment` on the correlations of
  `activation_statistics` over all batches), each made with the activations of
  the unpermuted networks: permuting units does not change any other group's
  activations, so the groups are independent. Groups that no module output
  carries on its last axis (attention heads, say) are then weight-matched with
  the others held at their activation-matched permutations.

  Args:
    apply_fn, spec, batches: as for `activation_statistics`.
    variables_ref: the full variables ({'params', 'batch_stats'?, ...}) to match.
    variables_other: the full variables of the model to permute.
    post: see `activation_statistics` (`jax.nn.relu` where every site feeds a ReLU).

  Returns:
    perm such that `apply_permutation(spec, perm, variables_other)` is aligned.

  Raises:
    TypeError: `spec` is not a PermutationSpec, or a model is not a dict.
    ValueError: the spec has no permutation group (nothing to permute), a model
      is given as bare params (BatchNorm needs its statistics), or the models do
      not fit the spec or each other (`align.check_pair`).

  Example:
    perm = activation_matching(model.apply, spec, variables_a, variables_b, batches,
                               post=jax.nn.relu)
  """
  _check_activation_args(spec, variables_ref, variables_other,
                         "activation_matching(apply_fn, spec, variables_ref, "
                         "variables_other, batches)")
  align.check_pair(spec, variables_ref, variables_other)
  correlations = activation_statistics(apply_fn, spec, variables_ref, variables_other, batches,
                                       post)
  perm = {name: linear_sum_assignment(c, maximize=True)[1] for name, c in correlations.items()}
  unseen = [name for name in spec.names if name not in perm]
  if unseen:
    perm = weight_matching(spec, variables_ref, variables_other, init=perm, groups=unseen)
  return perm
