"""Checkpoints through orbax, in one module so that orbax's API churn stays here.

A `Checkpointer` saves a pytree (a `TrainState`, a curve's control points, ...)
under `directory/<step>/` with orbax's `CheckpointManager`: writes are atomic
(a killed save leaves a temporary directory that is ignored and cleaned up,
never a half-written step), asynchronous (training goes on while the files are
written), and only the newest `max_to_keep` steps are kept.

Restoring goes into an abstract target (`jax.eval_shape` of the init, with
shardings), after checking the checkpoint's recorded shapes and dtypes leaf by
leaf: an incompatible or unreadable checkpoint raises `CheckpointError` naming
the step directory and the mismatch, and is left untouched.

Trees are stored as flax state dicts (nested dicts of arrays), so a checkpoint
reads back without mechconn's classes: `orbax.checkpoint.StandardCheckpointer()
.restore(path)` gives plain dicts. No pickle anywhere.
"""

import os
from typing import Any

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from mechconn import finite

PyTree = Any
CONFIG_KEY = "mechconn_config"  # the run's config, in a step's custom metadata


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored into the requested target."""


def _cause(e: BaseException, limit: int = 300) -> str:
  """'Type: message' of the innermost exception in e's chain (where orbax and
  TensorStore put the actual reason, e.g. a failed decompression of one leaf)."""
  seen = set()
  while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  text = " ".join(str(e).split()).split(" [tensorstore_spec=")[0]  # drop the spec dump
  return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _leaves_by_path(tree: PyTree) -> dict[str, Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {finite.leaf_path(path): leaf for path, leaf in flat}


def check_compatible(stored: PyTree, target: PyTree, where: str) -> None:
  """Raises CheckpointError at the first leaf whose path, shape or dtype differs.

  Args:
    stored: the checkpoint's metadata tree (leaves with .shape and .dtype).
    target: the abstract target state dict (leaves with .shape and .dtype).
    where: the checkpoint directory, for the message.
  """
  stored, target = _leaves_by_path(stored), _leaves_by_path(target)
  only_stored = sorted(set(stored) - set(target))
  only_target = sorted(set(target) - set(stored))
  if only_stored or only_target:
    raise CheckpointError(
        f"Checkpoint {where} does not match the model/optimiser being restored: leaves only "
        f"in the checkpoint {only_stored[:5]}, leaves only in the target {only_target[:5]}. "
        "The checkpoint was left as is.")
  for path in sorted(target):
    s, t = stored[path], target[path]
    if tuple(s.shape) != tuple(t.shape) or np.dtype(s.dtype) != np.dtype(t.dtype):
      raise CheckpointError(
          f"Checkpoint {where}: leaf {path!r} is {np.dtype(s.dtype).name}{list(s.shape)} "
          f"but the target expects {np.dtype(t.dtype).name}{list(t.shape)}. "
          "The checkpoint was left as is.")


class Checkpointer:
  """Periodic, atomic, asynchronous checkpoints of one pytree in a directory.

  Example:
    >>> with Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    ...   state = ckpt.restore(abstract_state) if ckpt.latest_step() is not None else init()
    ...   ckpt.save(int(state.step), state)
  """

  def __init__(self, directory: str, *, max_to_keep: int | None = 3):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=ocp.StandardCheckpointHandler())

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, tree: PyTree, *, config: dict | None = None) -> None:
    """Starts an asynchronous, atomic save of `tree` as `step` (a no-op if it exists).

    `config` (the run's config as a JSON-compatible dict) is recorded in the
    step's metadata, so that a resume can tell whose checkpoint it is
    (`recorded_config`).
    """
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.StandardSave(flax.serialization.to_state_dict(tree)),
                       force=True,
                       custom_metadata=None if config is None else {CONFIG_KEY: config})

  def recorded_config(self, step: int) -> dict | None:
    """The config `save` recorded with `step`, or None (saved without one, or unreadable)."""
    try:
      custom = self._manager.metadata(step).custom_metadata or {}
    except Exception:  # pylint: disable=broad-except  # orbax raises several types
      return None
    return custom.get(CONFIG_KEY)

  def _stored_tree(self, step: int, purpose: str) -> PyTree:
    """The metadata tree (shapes and dtypes) of `step`; raises CheckpointError when unreadable.

    `purpose` completes the advice "move it away to <purpose> an earlier step".
    """
    where = self.step_dir(step)
    try:
      stored = getattr(self._manager.item_metadata(step), "tree", None)
    except Exception as e:  # orbax raises several types for an unreadable step
      raise CheckpointError(f"Checkpoint {where} is unreadable ({_cause(e)}). It was left "
                            f"as is; move it away to {purpose} an earlier step.") from e
    if stored is None:
      raise CheckpointError(f"Checkpoint {where} has no readable metadata (incomplete or "
                            f"corrupt). It was left as is; move it away to {purpose} an "
                            "earlier step.")
    return stored

  def _restore(self, step: int, target: PyTree, purpose: str) -> PyTree:
    """orbax's restore of `step` into `target` (a state dict); raises CheckpointError."""
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as e:  # orbax and TensorStore raise several types
      raise CheckpointError(f"Checkpoint {self.step_dir(step)} could not be read "
                            f"({_cause(e)}). It was left as is; move it away to {purpose} an "
                            "earlier step.") from e

  def restore(self, abstract_tree: PyTree, step: int | None = None) -> PyTree:
    """Restores `step` (default: the latest) into the structure of `abstract_tree`.

    Args:
      abstract_tree: the target, e.g. `jax.eval_shape(init)`; leaves are
        `jax.ShapeDtypeStruct`s whose `.sharding` (when set) places the result.
      step: which step; None for the latest.

    Raises:
      CheckpointError: no checkpoint, or one that is unreadable or does not
        match `abstract_tree` (message names the directory and the leaf).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"No checkpoint to restore in {self.directory}.")
    where = self.step_dir(step)
    target = flax.serialization.to_state_dict(abstract_tree)
    check_compatible(self._stored_tree(step, "resume from"), target, where)
    restored = self._restore(step, target, "resume from")
    return flax.serialization.from_state_dict(abstract_tree, restored)

  def read(self, step: int | None = None) -> dict:
    """The stored state dict of `step` (default: latest) as nested dicts, on one local device.

    Needs no model or target: for inspecting a checkpoint, or reading one
    written on another device count.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"No checkpoint to read in {self.directory}.")
    stored = self._stored_tree(step, "read")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          stored)
    return self._restore(step, target, "read")

  def wait(self) -> None:
    """Blocks until pending saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
