"""Small pytree helpers written once: Flax variables from their parts, stacking trees.

  - `variables_of(params, batch_stats)`: the Flax variables {'params': ...,
    'batch_stats': ...} a model's `apply` takes, with 'batch_stats' only when
    there are statistics (a model without BatchNorm has none);
  - `stack(trees)`: equally structured trees -> one tree whose leaves gain a
    leading axis (per-step metrics -> metrics over steps, models -> an ensemble).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mechconn.types import Params, Variables


def variables_of(params: Params, batch_stats: Params | None = None) -> Variables:
  """{'params': params, 'batch_stats': batch_stats}, without 'batch_stats' when it holds no array.

  Example:
    >>> logits = model.apply(trees.variables_of(params, batch_stats), x, train=False)
  """
  if jax.tree.leaves(batch_stats):
    return {"params": params, "batch_stats": batch_stats}
  return {"params": params}


def stack(trees: Sequence[object]):
  """One tree whose every leaf is the trees' leaves stacked on a new leading axis.

  Args:
    trees: one or more pytrees of one structure with equally shaped leaves.

  Returns:
    A tree of that structure; leaf [...] becomes [len(trees), ...].

  Example:
    >>> stack([{"loss": 1.0}, {"loss": 2.0}])   # {'loss': Array([1., 2.])}
  """
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
