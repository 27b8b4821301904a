"""How mechconn calls a model, and adapters for models that are called otherwise.

Every function of mechconn that runs a network calls it as Flax Linen's
`model.apply`:

  apply_fn(variables, inputs, *, train, mutable=False, **kwargs)

with `variables` = {'params': ..., 'batch_stats': ...?}; `train=True` only
where BatchNorm statistics are recomputed (inference otherwise). Models that
are called differently go through one adapter:

  - `without_train(model.apply)`: a Linen model whose `__call__` takes no
    `train` argument (no BatchNorm, no dropout: a transformer, a regression
    MLP);
  - `from_nnx(module)`: a Flax NNX module, as (apply_fn, variables) in the
    Linen convention; `update_nnx(module, variables)` writes variables back
    (see `mechconn.nnx_adapter`).

Adapters are frozen dataclasses, so they are hashable and pass to jitted code
as static arguments like `model.apply` itself.
"""

from collections.abc import Callable
import dataclasses
from typing import Any

from mechconn.nnx_adapter import from_nnx, update as update_nnx  # pylint: disable=unused-import


@dataclasses.dataclass(frozen=True)
class WithoutTrain:
  """`apply_fn` called as mechconn calls models, dropping the `train` argument."""

  apply_fn: Callable[..., Any]

  def __call__(self, variables, *args, train: bool = False, **kwargs):
    del train  # the model has no BatchNorm or dropout: train and inference are one
    return self.apply_fn(variables, *args, **kwargs)


def without_train(apply_fn: Callable[..., Any]) -> WithoutTrain:
  """Adapts the apply of a Linen model whose `__call__` takes no `train` argument.

  Example:
    >>> lm = CausalLM(vocab_size=16)                      # __call__(self, tokens)
    >>> apply_fn = adapters.without_train(lm.apply)
    >>> barriers.evaluate_path(apply_fn, (params_a, params_b), ts, batches,
    ...                        objective=objectives.next_token())
  """
  if isinstance(apply_fn, WithoutTrain):
    return apply_fn
  if not callable(apply_fn):
    raise TypeError(f"without_train needs the model's apply function; got "
                    f"{type(apply_fn).__name__}.")
  return WithoutTrain(apply_fn)


def train_argument_hint(error: TypeError) -> str | None:
  """A hint for a TypeError raised because the model takes no `train` argument, else None."""
  if "train" in str(error) and "unexpected keyword" in str(error):
    return ("the model's __call__ takes no `train` argument, but mechconn calls models as "
            "model.apply(variables, inputs, train=...): pass "
            "mechconn.adapters.without_train(model.apply) as the apply function")
  return None
