"""Seeing and changing what a network's layers compute, for Flax Linen and NNX alike.

mechconn's renormalisations and alignments need to look inside a network
without per-architecture code: the input of every BatchNorm (exact statistics
recomputation), the output of every conv and dense layer (REPAIR, activation
matching), every layer's output (the sites of a derived permutation spec).
`intercept(hook)` runs `hook(call, next_fun, args, kwargs)` around every
layer's `__call__` inside the `with` block, where `call.path` is where the
layer's variables live in the variables tree ('Conv_0', or
('block', 'bn')) and `call.module` the layer; the hook returns the layer's
output (`next_fun(*args, **kwargs)`, or something else in its place).

Linen modules are intercepted with `flax.linen.intercept_methods`; NNX modules
through `mechconn.nnx_adapter`, which routes the calls of the layers of the
module it runs through the same hooks. Hooks keep what they record in Python
(not in Flax side collections), so a model is intercepted the same way in
both frameworks; the values they record belong to the trace in which the
model runs (record and return them within one function).
"""

from collections.abc import Callable, Iterator
import contextlib
import dataclasses
from typing import Any

import flax.linen as nn
from flax import nnx

Hook = Callable[["LayerCall", Callable[..., Any], tuple, dict], Any]

_ACTIVE: list[Hook] = []  # the hooks NNX calls go through (Linen keeps its own stack)


@dataclasses.dataclass(frozen=True)
class LayerCall:
  """One call of a layer: where it lives, the layer, and which method."""

  path: tuple[str, ...]
  module: Any
  method: str = "__call__"


def kind(module: Any) -> str | None:
  """'batchnorm', 'conv', 'dense' or 'layernorm' for the layers mechconn knows; else None."""
  if isinstance(module, (nn.BatchNorm, nnx.BatchNorm)):
    return "batchnorm"
  if isinstance(module, (nn.Conv, nnx.Conv)):
    return "conv"
  if isinstance(module, (nn.Dense, nnx.Linear)):
    return "dense"
  if isinstance(module, (nn.LayerNorm, nnx.LayerNorm)):
    return "layernorm"
  return None


def _linen_interceptor(hook: Hook):
  def intercept_linen(next_fun, args, kwargs, context):
    module = context.module
    path = tuple(module.scope.path) if module.scope is not None else ()
    return hook(LayerCall(path, module, context.method_name), next_fun, args, kwargs)
  return intercept_linen


@contextlib.contextmanager
def intercept(hook: Hook) -> Iterator[None]:
  """Runs `hook` around every layer call of Linen models and NNX models run by the adapter.

  Example:
    >>> outputs = {}
    >>> def record(call, next_fun, args, kwargs):
    ...   out = next_fun(*args, **kwargs)
    ...   if call.method == "__call__" and kind(call.module) == "dense":
    ...     outputs[call.path] = out
    ...   return out
    >>> with intercept(record):
    ...   model.apply(variables, x, train=False)
  """
  _ACTIVE.append(hook)
  try:
    with nn.intercept_methods(_linen_interceptor(hook)):
      yield
  finally:
    _ACTIVE.remove(hook)


def active_hooks() -> tuple[Hook, ...]:
  """The hooks in force, innermost last (for the NNX adapter)."""
  return tuple(_ACTIVE)


def run_hooks(hooks: tuple[Hook, ...], call: LayerCall, next_fun: Callable[..., Any],
              args: tuple, kwargs: dict) -> Any:
  """`next_fun(*args, **kwargs)` through `hooks`, the innermost (last) closest to the layer.

  Linen's order: the outermost interceptor sees the call first.
  """
  if not hooks:
    return next_fun(*args, **kwargs)
  outer, inner = hooks[0], hooks[1:]
  return outer(call, lambda *a, **kw: run_hooks(inner, call, next_fun, a, kw), args, kwargs)
