"""Shared type aliases and callable contracts, one name per meaning.

  Params          a parameter pytree (a Flax 'params' collection, or any subtree)
  Variables       Flax variables: {'params': ..., 'batch_stats': ...?}
  Batch           one batch: a dict of arrays with a leading batch axis, e.g.
                  {'image': [B, ...], 'label': [B], 'mask': [B]} (an objective says which
                  key is the model's input: `mechconn.objectives`)
  StackedBatches  batches stacked for a scan: every leaf [N, B, ...], e.g. {'image':
                  [N, B, ...], 'label': [N, B], 'mask': [N, B]}
                  (see `mechconn.data.batching.stack_batches`)
  Metrics         a flat dict of scalars
  ApplyFn         how mechconn calls a model: `model.apply` of a Flax Linen module
                  taking `train=` (others through `mechconn.adapters`)
  LossFn          what `step.train_step` differentiates
  PathFn          a path through parameter space, `path_fn(points, t)`
"""

from collections.abc import Sequence
from typing import Any, Protocol

import chex
import jax

Params = chex.ArrayTree
Variables = dict[str, Params]
Batch = dict[str, jax.Array]
StackedBatches = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
PRNGKey = jax.Array


class ApplyFn(Protocol):
  """`apply_fn(variables, images, *, train, mutable=False)` as Flax `Module.apply`."""

  def __call__(self, variables: Variables, images: jax.Array, *, train: bool,
               mutable: Any = False) -> Any:
    ...


class LossFn(Protocol):
  """loss_fn(params, batch_stats, batch, rng) -> (loss, (new_batch_stats, metrics)).

  Differentiated with respect to `params`; `metrics` is a dict of scalars
  averaged into the logs beside the loss. A loss is passed to the jitted step
  as a pytree, so it may carry arrays (fixed endpoints, a reference model):
  write it as a `flax.struct.dataclass` whose functions are static fields, or
  wrap a plain function with `jax.tree_util.Partial(fn, *arrays)`.
  """

  def __call__(self, params: Params, batch_stats: Params, batch: Batch, rng: PRNGKey
               ) -> tuple[jax.Array, tuple[Params, Metrics]]:
    ...


class PathFn(Protocol):
  """`path_fn(points, t) -> params`: the point of the path at t in [0, 1]."""

  def __call__(self, points: Sequence[Params], t: chex.Numeric) -> Params:
    ...
