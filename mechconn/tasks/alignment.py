"""The end point of a path aligned to its start: no alignment, weight or activation matching."""

from collections.abc import Callable, Sequence

import jax

from mechconn import align
from mechconn import matching
from mechconn.types import ApplyFn, Params

ALIGNMENTS = ("none", "weight", "activation")


def aligned_end(how: str, spec: align.PermutationSpec, apply_fn: ApplyFn, start: dict, end: dict,
                batches: Sequence[jax.Array], *, seed: int = 0,
                post: Callable[[jax.Array], jax.Array] | None = jax.nn.relu
                ) -> tuple[Params, dict | None]:
  """(end's params permuted to match start's, the permutation) for `how` in ALIGNMENTS.

  `start` and `end` are variables ({'params', ...}); weight matching (Git
  Re-Basin, groups in `seed`'s order) reads their params, activation matching
  correlates `post` of every site's output on `batches` of inputs.
  """
  if how == "none":
    return end["params"], None
  if how == "weight":
    perm = matching.weight_matching(spec, start["params"], end["params"], seed=seed)
  else:
    perm = matching.activation_matching(apply_fn, spec, start, end, list(batches), post=post)
  return align.apply_permutation(spec, perm, end["params"]), perm
