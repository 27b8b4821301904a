"""Flax NNX models in mechconn: one adapter to the Linen calling convention.

mechconn calls every network as Linen's `model.apply(variables, inputs, *,
train, mutable=...)` on a variables dict {'params', 'batch_stats'?}. An NNX
module keeps its state inside itself instead; `from_nnx(module)` splits it
(`nnx.split`) into

  - `apply_fn`: `NNXApply`, which merges the graph with the variables it is
    given (`nnx.merge`), runs the module in training or inference mode
    (`nnx.view(..., use_running_average=not train)`) and returns what Linen's
    apply returns ((outputs, {'batch_stats': ...}) with `mutable`);
  - `variables`: {'params': the nnx.Param leaves, 'batch_stats': the
    nnx.BatchStat leaves}, as nested dicts keyed by attribute names (list
    indices as strings, '0', '1', ...).

Everything else is the Linen code path itself: paths interpolate 'params',
BatchNorm statistics are recomputed and REPAIR is applied through
`mechconn.intercept` (the adapter routes the calls of the module's layers,
`nnx.BatchNorm`, `nnx.Conv`, `nnx.Linear`, ..., through its hooks), specs are
derived by tracing `apply_fn`, and a permutation acts on the variables.
`update(module, variables)` writes variables (aligned, or a point of a path)
back into an NNX module.

Example:
  >>> apply_fn, variables = nnx_adapter.from_nnx(model)          # an nnx.Module
  >>> result = barriers.evaluate_path(apply_fn, (variables["params"], other["params"]), ts,
  ...                                 eval_batches, bn_batches=bn_batches)
  >>> nnx_adapter.update(model, aligned_variables)
"""

from collections.abc import Mapping
import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from mechconn import intercept
from mechconn import trees

# The variable types that map to Linen collections; any other state is refused.
COLLECTIONS = (("params", nnx.Param), ("batch_stats", nnx.BatchStat))


def _str_keys(tree):
  """Nested dicts with every key a string (NNX list indices are ints)."""
  if isinstance(tree, Mapping):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return tree


def _nnx_keys(tree):
  """The inverse of `_str_keys`: digit strings back to list indices (no attribute is a number)."""
  if isinstance(tree, Mapping):
    return {(int(k) if isinstance(k, str) and k.isdigit() else k): _nnx_keys(v)
            for k, v in tree.items()}
  return tree


def _template(tree) -> tuple:
  """A hashable description of a tree's leaves: ((path, shape, dtype), ...)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return tuple((tuple(str(k.key) for k in path), tuple(np.shape(leaf)), str(jnp.result_type(leaf)))
               for path, leaf in flat)


def _zeros(template: tuple) -> dict:
  out: dict = {}
  for path, shape, dtype in template:
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = jnp.zeros(shape, dtype)
  return out


@dataclasses.dataclass(frozen=True)
class NNXApply:
  """An NNX module's graph, called as Linen's `model.apply`; hashable (a static jit argument).

  Attributes:
    graphdef: the module's structure (`nnx.split`).
    batch_stats: the shapes of its BatchNorm statistics, used (as zeros) when
      a call passes only 'params' (statistics are being recomputed).
  """

  graphdef: Any
  batch_stats: tuple = ()

  def __call__(self, variables, inputs, *args, train: bool = False, mutable: Any = False,
               **kwargs):
    unknown = sorted(set(variables) - {"params", "batch_stats"})
    if unknown:
      raise ValueError(f"An NNX model's variables hold 'params' and 'batch_stats'; got also "
                       f"{unknown}.")
    stats = variables.get("batch_stats") or _zeros(self.batch_stats)
    model = nnx.merge(self.graphdef, _nnx_keys(variables["params"]), _nnx_keys(stats))
    model = nnx.view(model, use_running_average=not train, deterministic=True,
                     raise_if_not_found=False)
    hooks = intercept.active_hooks()
    if hooks:
      out = _call_hooked(model, hooks, inputs, *args, **kwargs)
    else:
      out = model(inputs, *args, **kwargs)
    if not mutable:
      return out
    new_stats = _str_keys(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
    wanted = ["batch_stats"] if mutable is True else list(mutable)
    return out, ({"batch_stats": new_stats} if "batch_stats" in wanted and new_stats else {})


def _call_hooked(model, hooks, inputs, *args, **kwargs):
  """model(inputs, ...) with every submodule's __call__ routed through `hooks`."""
  paths = {id(m): tuple(str(k) for k in path) for path, m in nnx.iter_modules(model)}
  classes = {type(m) for _, m in nnx.iter_modules(model)}
  originals = {cls: cls.__call__ for cls in classes}  # resolved before any is patched
  owned = {cls: "__call__" in cls.__dict__ for cls in classes}
  running: set[int] = set()  # a layer whose __call__ calls super().__call__ is hooked once

  def patched(original):
    def call(self, *a, **kw):
      key = id(self)
      if key not in paths or key in running:
        return original(self, *a, **kw)
      running.add(key)
      try:
        return intercept.run_hooks(hooks, intercept.LayerCall(paths[key], self),
                                   lambda *a2, **kw2: original(self, *a2, **kw2), a, kw)
      finally:
        running.discard(key)
    return call

  try:
    for cls in classes:
      setattr(cls, "__call__", patched(originals[cls]))
    return model(inputs, *args, **kwargs)
  finally:
    for cls in classes:
      if owned[cls]:
        setattr(cls, "__call__", originals[cls])
      else:
        delattr(cls, "__call__")


def from_nnx(module: nnx.Module) -> tuple[NNXApply, dict]:
  """(apply_fn, variables) of an NNX module, in the Linen convention mechconn takes.

  Example:
    >>> apply_fn, variables = from_nnx(model)          # {'params', 'batch_stats'?}
    >>> spec = symmetry.derive_spec(apply_fn, variables, x[:2])
    >>> stats = batchnorm.recompute_batch_stats(apply_fn, {"params": p}, bn_batches)

  Raises:
    TypeError: `module` is not an nnx.Module.
    ValueError: the module holds state other than nnx.Param and nnx.BatchStat
      (RNG streams for dropout, caches): build it for evaluation without them.
  """
  if not isinstance(module, nnx.Module):
    raise TypeError(f"from_nnx takes an nnx.Module; got {type(module).__name__} (a Linen "
                    "model needs no adapter: pass model.apply and its variables).")
  graphdef, params, stats, rest = nnx.split(module, *(t for _, t in COLLECTIONS), ...)
  others = jax.tree.leaves(nnx.to_pure_dict(rest))
  if others:
    kinds = sorted({type(v).__name__ for _, v in nnx.to_flat_state(rest)})
    raise ValueError(f"The NNX module holds state other than nnx.Param and nnx.BatchStat "
                     f"({kinds}); build it for evaluation without RNG streams or caches "
                     "(e.g. rngs=None for dropout) or split them off before from_nnx.")
  params, stats = _str_keys(nnx.to_pure_dict(params)), _str_keys(nnx.to_pure_dict(stats))
  variables = trees.variables_of(params, stats)
  return NNXApply(graphdef, _template(stats)), variables


def update(module: nnx.Module, variables: dict) -> nnx.Module:
  """Writes variables ({'params', 'batch_stats'?}, from `from_nnx`'s layout) into `module`.

  Returns the module (updated in place), e.g. after alignment:
    >>> nnx_adapter.update(model_b, align.apply_permutation(spec, perm, variables_b))
  """
  for collection, variable_type in COLLECTIONS:
    if collection in variables:
      state = nnx.state(module, variable_type)
      nnx.replace_by_pure_dict(state, _nnx_keys(variables[collection]))
      nnx.update(module, state)
  return module
