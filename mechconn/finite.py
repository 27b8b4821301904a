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
  - `raise_if_any(flags, context)`: raises naming every flag that is False;
  - `raise_if_diverged(metrics over steps, first step, saved)`: a training
    window's metrics (loss, gradient and parameter norms) checked on the host,
    raising at the first step that is not finite.
"""

from collections.abc import Callable, Mapping

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
  """'/'-joined keys of a `tree_flatten_with_path` path: dict keys, indices, attribute names."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


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


def first_nonfinite_step(stacked: Mapping[str, np.ndarray]) -> tuple[int, dict] | None:
  """(index, that step's metrics) of the first step with a non-finite metric, or None.

  `stacked` holds each metric over steps (leading axis), e.g. loss, grad_norm
  and param_norm: the norms are one reduction each over every gradient and
  parameter leaf, so a single NaN anywhere shows in them. Ensemble metrics
  ([steps, members]) count when any member's value is not finite.
  """
  num_steps = len(next(iter(stacked.values())))
  ok = np.ones(num_steps, bool)
  for value in stacked.values():
    value = np.asarray(value)
    if np.issubdtype(value.dtype, np.inexact):
      ok &= np.isfinite(value.reshape(num_steps, -1)).all(axis=1)
  if ok.all():
    return None
  i = int(np.argmin(ok))
  return i, {k: np.asarray(v)[i].tolist() for k, v in stacked.items()}


def raise_if_diverged(stacked: Mapping[str, np.ndarray], first_step: int,
                      saved: Callable[[], str]) -> None:
  """Raises NonFiniteError at the first step of the window whose metrics are not finite.

  Args:
    stacked: metrics over the steps of the window.
    first_step: the 0-based step of the window's first entry.
    saved: () -> what was saved before it (e.g. the last good checkpoint), for
      the message; called only when raising.
  """
  found = first_nonfinite_step(stacked)
  if found is None:
    return
  i, values = found
  bad = {k: v for k, v in values.items() if not np.all(np.isfinite(v))}
  raise NonFiniteError(
      f"Training diverged at step {first_step + i + 1} (the update from step "
      f"{first_step + i} to {first_step + i + 1}; step numbers count updates, as the "
      f"checkpoints and metrics do): non-finite {bad}. Nothing from that step on was saved; "
      f"{saved()}. Look for NaN or infinity in the data, or lower the learning rate (then "
      "relaunch into a new --workdir, or here with --overwrite).")
