"""Aligning N models of one architecture into one frame: MergeMany and synchronisation.

Aligning each model to one reference, pair by pair, is not cycle-consistent:
the maps A <- B, B <- C and A <- C found independently need not compose
(`cycle_error` measures by how much). Both methods here return one
permutation per model into a shared frame, so every pair's map is the
composition of two of them and the cycle error is 0 by construction; they
differ in how well the frame fits all the models.

- 'merge_many' (Ainsworth, Hayase, Srinivasa, "Git Re-Basin", 2023, the
  MergeMany algorithm): each model in turn, in a seeded random order, is
  matched to the mean of the others (aligned by their current permutations),
  until a whole sweep changes nothing. This is block coordinate ascent on the
  sum over all pairs of their similarity in the shared frame.
- 'synchronized' (permutation synchronisation: Pachauri, Kondor, Singh,
  "Solving the multi-way matching problem by permutation synchronization",
  NeurIPS 2013): every pair is matched independently, then for each
  permutation group the [N n, N n] block matrix of the pairwise permutation
  matrices is projected onto its top n eigenvectors V (its best positive
  semidefinite rank-n approximation), and model i's map into the shared frame is the
  permutation nearest to V_0 V_i^T (one linear assignment). Chosen over
  C2M3's Frank-Wolfe because it takes any pairwise matcher (weight or
  activation matching, on any spec, written or derived) and is closed form
  (one eigendecomposition per group), where Frank-Wolfe is tied to weight
  matching's objective.

Matching: 'weight' (Git Re-Basin's weight matching: parameters only) or
'activation' (correlations of every pair of models' unit outputs, computed in
one pass over the batches, exact over all of them). The shared frame is model
0's: `perms[0]` is the identity, so N permuted copies of one model align to
exactly that model.
"""

from collections.abc import Iterable, Mapping, Sequence
import dataclasses
import functools
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from mechconn import align
from mechconn import matching as matching_lib
from mechconn.align import Params, Permutation, PermutationSpec
from mechconn.types import ApplyFn

METHODS = ("merge_many", "synchronized")
MATCHINGS = ("weight", "activation")
Pairwise = dict[tuple[int, int], Permutation]


@dataclasses.dataclass(frozen=True)
class MultiAlignment:
  """N models' permutations into one frame (model 0's).

  Attributes:
    perms: perms[i] maps model i into the frame: `align.apply_permutation(spec,
      perms[i], models[i])` is model i aligned; perms[0] is the identity.
    method, matching: how they were found (`METHODS`, `MATCHINGS`).
    sweeps: MergeMany's sweeps over the models (1 for 'synchronized').
    seconds: wall time of the whole alignment (statistics, matchings, synchronisation).
  """

  perms: tuple[Permutation, ...]
  method: str
  matching: str
  sweeps: int
  seconds: float

  def aligned(self, spec: PermutationSpec, models: Sequence[Params]) -> list[Params]:
    """Every model permuted into the frame (the kind it was given: variables or params)."""
    return [align.apply_permutation(spec, p, m) for p, m in zip(self.perms, models)]

  def pairwise(self) -> Pairwise:
    """{(i, j): model j's map into model i's frame} for i < j, composed from `perms`."""
    return {(i, j): _between(self.perms[i], self.perms[j])
            for i, j in itertools.combinations(range(len(self.perms)), 2)}


def _between(perm_i: Permutation, perm_j: Permutation) -> Permutation:
  """Model j into model i's frame, from both models' maps into the shared frame.

  Unit u of model i sits at frame position inverse_i[u], which holds unit
  perm_j[inverse_i[u]] of model j.
  """
  return {g: np.asarray(perm_j[g])[np.argsort(perm_i[g])] for g in perm_i}


def cycle_error(pairwise: Mapping[tuple[int, int], Permutation], num_models: int) -> float:
  """The fraction of units whose map around a cycle of three models is not the identity.

  Over every triple i < j < k and every group: unit u of model i maps to unit
  `pairwise[(i, j)][g][u]` of model j, which maps to a unit of model k by
  `pairwise[(j, k)][g]`; the direct map is `pairwise[(i, k)][g][u]`. 0 when the maps are
  cycle-consistent (any `MultiAlignment.pairwise()`); independent pairwise
  matchings (`pairwise_permutations`) are in general not.

  Args:
    pairwise: {(i, j): model j's map into model i's frame} for every i < j.
    num_models: N (at least 3 for a cycle; 0.0 below).

  Example:
    cycle_error(pairwise_permutations(spec, models), len(models))
  """
  _check_pairs(pairwise, num_models, "cycle_error")
  wrong = total = 0
  for i, j, k in itertools.combinations(range(num_models), 3):
    for g, direct in pairwise[(i, k)].items():
      via = np.asarray(pairwise[(j, k)][g])[np.asarray(pairwise[(i, j)][g])]
      wrong += int(np.sum(via != np.asarray(direct)))
      total += len(direct)
  return wrong / total if total else 0.0


# --- Checks. ------------------------------------------------------------------------


def _check_pairs(pairwise, num_models: int, where: str) -> None:
  """Raises ValueError unless `pairwise` holds exactly the pairs i < j of num_models models."""
  expected = set(itertools.combinations(range(num_models), 2))
  if set(pairwise) != expected:
    raise ValueError(f"{where}: pairwise must hold a map for every pair (i, j), i < j, of the "
                     f"{num_models} models; missing {sorted(expected - set(pairwise))[:4]}, "
                     f"extra {sorted(set(pairwise) - expected)[:4]}.")


def _check_models(spec: PermutationSpec, models, method: str, matching: str,
                  apply_fn, batches, where: str) -> list:
  align._check_spec_arg(spec, where)
  align.check_has_groups(spec, where)
  if method not in METHODS:
    raise ValueError(f"`{where}`: unknown method {method!r}; valid: {METHODS}.")
  if matching not in MATCHINGS:
    raise ValueError(f"`{where}`: unknown matching {matching!r}; valid: {MATCHINGS}.")
  if isinstance(models, Mapping) or not isinstance(models, Sequence) or len(models) < 2:
    raise ValueError(f"`{where}`: `models` must be a sequence of at least 2 models (params or "
                     f"full variables), got {type(models).__name__}"
                     f"{'' if isinstance(models, Mapping) else f' of length {len(models)}'}.")
  for i, model in enumerate(models[1:], start=1):
    try:
      align.check_pair(spec, models[0], model)
    except ValueError as e:
      raise ValueError(f"`{where}`: model {i} cannot be aligned with model 0: {e}") from None
  if matching == "activation":
    if apply_fn is None or batches is None:
      raise ValueError(f"`{where}`: activation matching runs the models: pass apply_fn and "
                       "batches (image batches, each [B, ...]).")
    for i, model in enumerate(models):
      align._check_variables_arg(model, where, f"models[{i}]")
  return list(models)


# --- Correlations of every pair of models, in one pass. ---------------------------------


def joint_correlations(apply_fn: ApplyFn, spec: PermutationSpec, models: Sequence[dict],
                       batches: Iterable[jax.Array], post=None) -> dict[str, np.ndarray]:
  """{group: [N, N, n, n]} correlations of every model's units with every model's units.

  `matching.activation_statistics` for N models at once: per batch, each
  model's site outputs (through `post`) side by side, [examples, N n], their
  means and centred cross-products on device; merged over batches on the host
  in float64 (Chan et al.), so entry [i, j, u, v] is the exact Pearson
  correlation over all the data of unit u of model i and unit v of model j
  (summed over a group's sites, as activation matching does).
  """
  for i, model in enumerate(models):
    align._check_variables_arg(model, "joint_correlations(apply_fn, spec, models, batches)",
                               f"models[{i}]")
  names = [name for name in spec.names if spec.sites.get(name)]
  sites = tuple(tuple(site) for name in names for site in spec.sites[name])
  totals = None
  for images in batches:
    m = [tuple(np.asarray(v, np.float64) for v in site) for site in jax.device_get(
        _moments(list(models), images, apply_fn=apply_fn, sites=sites, post=post))]
    totals = m if totals is None else [_merge(t, x) for t, x in zip(totals, m)]
  if totals is None:
    raise ValueError("joint_correlations needs at least one batch.")
  out, s = {}, 0
  for name in names:
    for _ in spec.sites[name]:
      cov = totals[s][2]
      std = np.sqrt(np.diag(cov)) + 1e-12
      corr = (cov / np.outer(std, std)).reshape(len(models), -1, len(models), len(std) //
                                                 len(models))
      out[name] = out.get(name, 0.0) + corr.transpose(0, 2, 1, 3)
      s += 1
  return out


@functools.partial(jax.jit, static_argnames=("apply_fn", "sites", "post"))
def _moments(models, images, *, apply_fn, sites, post):
  """Per site: (count, mean [N n], centred cross-products [N n, N n]) of one batch."""
  per_model = [matching_lib.site_outputs(apply_fn, v, images, sites, post) for v in models]
  out = []
  for s in range(len(sites)):
    x = jnp.concatenate([acts[s] for acts in per_model], axis=1)  # [examples, N n]
    centred = x - x.mean(0, keepdims=True)
    out.append((jnp.float32(x.shape[0]), x.mean(0), centred.T @ centred))
  return out


def _merge(m1, m2):
  """Chan et al.'s pairwise update of (count, mean, centred cross-products)."""
  n1, mean1, c1 = m1
  n2, mean2, c2 = m2
  n, d = n1 + n2, mean2 - mean1
  return n, mean1 + d * n2 / n, c1 + c2 + np.outer(d, d) * n1 * n2 / n


# --- Pairwise matchings. --------------------------------------------------------------


def _unseen(spec: PermutationSpec, correlations: dict) -> list[str]:
  """Groups no module output carries: activation matching weight-matches them."""
  return [name for name in spec.names if name not in correlations]


def pairwise_permutations(spec: PermutationSpec, models: Sequence[Params], *,
                          matching: str = "weight", apply_fn: ApplyFn | None = None,
                          batches: Iterable[jax.Array] | None = None, post=None,
                          seed: int = 0, correlations: dict | None = None) -> Pairwise:
  """Every pair i < j matched independently: {(i, j): model j's map into model i's frame}.

  Args:
    spec: the architecture's spec.
    models: N models (params or full variables; full variables for activation matching).
    matching: 'weight' (`matching.weight_matching`) or 'activation' (each
      group's assignment on the pair's correlations, as
      `matching.activation_matching`; groups without sites weight-matched).
    apply_fn, batches, post: for activation matching, as `matching.activation_matching`.
    seed: weight matching's order of groups.
    correlations: `joint_correlations`' output, to reuse (activation matching).

  Example:
    cycle_error(pairwise_permutations(spec, models), len(models))   # > 0 in general
  """
  where = "pairwise_permutations(spec, models)"
  models = _check_models(spec, models, METHODS[0], matching, apply_fn, batches, where)
  if matching == "activation" and correlations is None:
    correlations = joint_correlations(apply_fn, spec, models, batches, post)
  out = {}
  for i, j in itertools.combinations(range(len(models)), 2):
    if matching == "weight":
      out[(i, j)] = matching_lib.weight_matching(spec, models[i], models[j], seed=seed)
      continue
    perm = {g: linear_sum_assignment(c[i, j], maximize=True)[1]
            for g, c in correlations.items()}
    unseen = _unseen(spec, correlations)
    if unseen:
      perm = matching_lib.weight_matching(spec, models[i], models[j], init=perm, groups=unseen,
                                      seed=seed)
    out[(i, j)] = perm
  return out


# --- Permutation synchronisation. -----------------------------------------------------


def synchronize(pairwise: Mapping[tuple[int, int], Permutation],
                num_models: int) -> tuple[Permutation, ...]:
  """Each model's map into model 0's frame, cycle-consistent, nearest the pairwise maps.

  Per group: the block matrix W with W[i, j] the permutation matrix of model
  j into model i (W[j, i] its transpose, W[i, i] = I) is, for consistent
  maps, U U^T with U the stacked maps into a shared frame, of rank n with
  eigenvalue N. Its top n eigenvectors V span U's columns, and V_0 V_i^T is
  (1 / N times) model i's map into model 0's frame; the nearest permutation
  is one linear assignment. Exact when the pairwise maps are consistent.

  Args:
    pairwise: {(i, j): model j's map into model i's frame} for every i < j.
    num_models: N.

  Returns:
    perms: perms[i] maps model i into model 0's frame (perms[0] the identity).
  """
  _check_pairs(pairwise, num_models, "synchronize")
  groups = pairwise[(0, 1)]
  perms = [{} for _ in range(num_models)]
  for g, first in groups.items():
    n = len(first)
    w = np.eye(num_models * n)
    for (i, j), perm in pairwise.items():
      block = np.zeros((n, n))
      block[np.arange(n), np.asarray(perm[g])] = 1.0  # row: unit of i, column: its unit of j
      w[i * n:(i + 1) * n, j * n:(j + 1) * n] = block
      w[j * n:(j + 1) * n, i * n:(i + 1) * n] = block.T
    _, vectors = np.linalg.eigh(w)
    top = vectors[:, -n:].reshape(num_models, n, n)
    perms[0][g] = np.arange(n)
    for i in range(1, num_models):
      perms[i][g] = linear_sum_assignment(top[0] @ top[i].T, maximize=True)[1]
  return tuple(perms)


# --- MergeMany. ------------------------------------------------------------------------


def _mean_of_others(spec, models, perms, i) -> Params:
  """The mean of every model but i, each in the frame (params)."""
  others = [align.apply_permutation(spec, perms[j], models[j]["params"] if "params" in models[j]
                                    else models[j])
            for j in range(len(models)) if j != i]
  return jax.tree.map(lambda *xs: sum(np.asarray(x, np.float64) for x in xs) / len(xs), *others)


def _match_to_others(spec, models, perms, i, correlations, seed) -> Permutation:
  """Model i's map into the frame that best matches the others there."""
  if correlations is None:
    return matching_lib.weight_matching(spec, _mean_of_others(spec, models, perms, i), models[i],
                                    init=perms[i], seed=seed)
  perm = {}
  for g, c in correlations.items():  # row k: the others' units at frame position k
    similarity = sum(c[j, i][np.asarray(perms[j][g])] for j in range(len(models)) if j != i)
    new, old = linear_sum_assignment(similarity, maximize=True)[1], np.asarray(perms[i][g])
    rows = np.arange(len(new))  # a tie (dead units) keeps the current assignment: no cycling
    better = similarity[rows, new].sum() > similarity[rows, old].sum() + 1e-9 * len(new)
    perm[g] = new if better else old
  unseen = _unseen(spec, correlations)
  if unseen:
    perm = matching_lib.weight_matching(spec, _mean_of_others(spec, models, perms, i), models[i],
                                    init={**perms[i], **perm}, groups=unseen, seed=seed)
  return perm


def merge_many(spec: PermutationSpec, models: Sequence[Params], *, correlations=None,
               max_sweeps: int = 100, seed: int = 0) -> tuple[tuple[Permutation, ...], int]:
  """MergeMany: each model in turn matched to the mean of the others, until nothing changes.

  Starts from the identity (every model in its own order). With
  `correlations` (`joint_correlations`), a model's units are matched to the
  others' aligned units by the sum of their correlations (the covariance with
  the mean of the others' standardised units, up to a constant); without,
  by weight matching to the mean of the others' aligned parameters.

  Returns:
    (perms into model 0's frame, number of sweeps).
  """
  rng = np.random.default_rng(seed)
  perms = [align.identity_permutation(spec, m) for m in models]
  sweeps = 0
  for sweeps in range(1, max_sweeps + 1):
    changed = False
    for i in rng.permutation(len(models)):
      new = _match_to_others(spec, models, perms, int(i), correlations, seed + sweeps)
      changed |= any(not np.array_equal(new[g], perms[i][g]) for g in new)
      perms[i] = {g: np.asarray(p) for g, p in new.items()}
    if not changed:
      break
  to_first = perms[0]  # re-anchor: model 0's frame
  return tuple(_between(to_first, p) for p in perms), sweeps


# --- The entry point. ---------------------------------------------------------------


def align_models(spec: PermutationSpec, models: Sequence[Params], *,
                 method: str = "synchronized", matching: str = "weight",
                 apply_fn: ApplyFn | None = None, batches: Iterable[jax.Array] | None = None,
                 post=None, max_sweeps: int = 100, seed: int = 0) -> MultiAlignment:
  """Aligns N models of one architecture into model 0's frame.

  Args:
    spec: the architecture's spec (written, `align.permutation_spec`, or
      derived, `symmetry.derive_spec`; Linen or NNX through `adapters.from_nnx`).
    models: N >= 2 models: params or the full variables ({'params',
      'batch_stats'?}); the full variables for activation matching.
    method: 'synchronized' or 'merge_many' (see the module docstring).
    matching: 'weight' or 'activation'.
    apply_fn, batches, post: activation matching's (`matching.activation_matching`):
      the model's apply, image batches (any iterable: read once), and
      what maps each site's output first (`jax.nn.relu` for post-ReLU units).
    max_sweeps: MergeMany's bound on sweeps.
    seed: the order of models (MergeMany) and of groups (weight matching).

  Returns:
    MultiAlignment (`perms`, `.aligned(spec, models)`, `.pairwise()`, `seconds`).

  Example:
    result = multi_align.align_models(spec, [variables_a, variables_b, variables_c])
    aligned = result.aligned(spec, [variables_a, variables_b, variables_c])
  """
  where = "align_models(spec, models)"
  models = _check_models(spec, models, method, matching, apply_fn, batches, where)
  start = time.perf_counter()
  correlations = (joint_correlations(apply_fn, spec, models, batches, post)
                  if matching == "activation" else None)
  if method == "merge_many":
    perms, sweeps = merge_many(spec, models, correlations=correlations, max_sweeps=max_sweeps,
                               seed=seed)
  else:
    pairwise = pairwise_permutations(spec, models, matching=matching,
                                     apply_fn=apply_fn, batches=batches, post=post, seed=seed,
                                     correlations=correlations)
    perms, sweeps = synchronize(pairwise, len(models)), 1
  return MultiAlignment(perms=tuple(perms), method=method, matching=matching,
                        sweeps=sweeps, seconds=time.perf_counter() - start)
