"""Finiteness: no result is reported, and nothing is saved, from NaN or infinity.

On XLA:CPU a network with NaN weights or a NaN input can still produce finite
logits (after fusion, ReLU of NaN comes out as 0), so a finite loss proves
nothing about the numbers it came from. The rule everywhere in mechconn: check
the inputs and intermediate results that matter with one cheap in-graph
reduction each (`all_finite`), read those flags on the host, and raise
`NonFiniteError` naming what was not finite before anything is returned or
written.

  - `all_finite(tree)`: one boolean over every float leaf (jit-friendly);
  - `first_nonfinite_leaf(tree)`: the '/'-joined path of the first bad leaf,
    on the host (only on the error path, to name it);
  - `raise_if_any(flags, context)`: raises naming every flag that is False.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np


class NonFiniteError(FloatingPointError):
  """NaN or infinity in an input, a parameter or a result that was about to be used."""


def _is_float(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def all_finite(tree) -> jax.Array:
  """A scalar bool: every float leaf of `tree` is finite (True for a tree without any)."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if _is_float(x)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


all_finite_jit = jax.jit(all_finite)


def leaf_path(path) -> str:
  """'/'-joined keys of a `tree_flatten_with_path` path."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                  for k in path)


def first_nonfinite_leaf(tree) -> str | None:
  """The path of the first float leaf holding a NaN or infinity (host-side), or None."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if _is_float(leaf) and not np.all(np.isfinite(np.asarray(jax.device_get(leaf)))):
      return leaf_path(path) or "<root>"
  return None


def raise_if_any(flags: Mapping[str, object], context: str) -> None:
  """Raises NonFiniteError naming every entry of {what: finite?} that is False.

  Args:
    flags: {description of an input or result: scalar bool (host or device)}.
    context: what was being computed, for the message.
  """
  bad = [what for what, ok in flags.items() if not bool(np.asarray(jax.device_get(ok)))]
  if bad:
    raise NonFiniteError(f"{context}: NaN or infinity in {', '.join(bad)}. No result was "
                         "returned from these numbers.")
