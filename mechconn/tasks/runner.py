"""The one prologue of every task, its build record, and where records are written.

`launch(task, config, workdir)` is what the launcher calls for every task:

  1. the mesh over all devices (`mesh.data_mesh()`);
  2. the task's `check(config, num_devices)`: every field, before any work;
  3. the task's `inputs(config, dry_run)`: the finished runs it reads (loaded
     and checked now, so a missing or diverged input fails before anything is
     written), with their identities for the record;
  4. a dry run (`config.dry_run`): the task's `dry_run(config, mesh, inputs)`,
     which times the step its `build` makes; nothing is read or written;
  5. otherwise the workdir is claimed (`claimed`: config.json, the lock, the
     refusal of another config) and the task's `run(...)` runs inside.

A task module (`mechconn.tasks.train`, ...) provides NAME, LAYOUT, check,
inputs, build, run and dry_run; its run and its dry run both call its one
`build(config, mesh, inputs)`. Records are written by `write_outputs` only:
by process 0, atomically.
"""

from collections.abc import Callable, Iterator
import contextlib
import dataclasses
import os
from typing import Any, Protocol

import jax
from jax.experimental import multihost_utils
import numpy as np
import optax

from mechconn import dry_run as dry_run_lib
from mechconn import mesh as mesh_lib
from mechconn import workdir as workdir_lib
from mechconn.types import Batch, Metrics


@dataclasses.dataclass(frozen=True)
class Build:
  """What a task's run needs for one kind of step, made once by the task's `build`.

  The run hands `init_fn` and `step_fn` to `loop.train_loop`; the dry run
  times the same `step_fn` on zero batches (`time_build`).

  Attributes:
    name: what one step is, for logs and dry-run reports.
    init_fn: () -> the fresh state (run under jit, replicated over the mesh).
    step_fn: (state, batch) -> (state, metrics), statics and keys bound.
    batch_size: global examples per step.
    steps_per_epoch, num_steps: the run's length.
    image_shape: [H, W, C] of one input image.
    schedule: step -> learning rate (logged), or None.
    tx: the optimiser, where the run needs it apart from the step.
    model: the network, when the task has one.
    to_batch: a zero {'image', 'label'} batch -> the step's batch (e.g. CBFT's
      clean and cue halves); the identity for plain steps.
  """

  name: str
  init_fn: Callable[[], Any]
  step_fn: Callable[[Any, Batch], tuple[Any, Metrics]]
  batch_size: int
  steps_per_epoch: int
  num_steps: int
  image_shape: tuple[int, ...]
  schedule: optax.Schedule | None = None
  tx: optax.GradientTransformation | None = None
  model: Any = None
  to_batch: Callable[[Batch], Batch] = lambda batch: batch


def time_build(build: Build, mesh: jax.sharding.Mesh, *, state: Any = None,
               num_steps: int | None = None, name: str | None = None
               ) -> tuple[Any, dry_run_lib.StepTiming, Any]:
  """Times `build.step_fn` on zero batches from `build.init_fn()` (or `state`).

  Returns (state after the timed steps, timing, the last batch); `num_steps`
  replaces the build's step count in the estimate (e.g. times the seeds) and
  `name` its name in the report.
  """
  if state is None:
    state = jax.jit(build.init_fn, out_shardings=mesh_lib.replicated(mesh))()
  return dry_run_lib.time_on_zero_batches(
      name or build.name, build.step_fn, state, build.image_shape, mesh,
      global_batch=build.batch_size,
      num_steps=build.num_steps if num_steps is None else num_steps, to_batch=build.to_batch)


class Task(Protocol):
  """What `launch` needs of a task module."""

  NAME: str
  LAYOUT: workdir_lib.Layout

  def check(self, config: Any, num_devices: int) -> None: ...

  def inputs(self, config: Any, dry_run: bool) -> tuple[Any, dict | None]: ...

  def run(self, config: Any, workdir: str, mesh: jax.sharding.Mesh, inputs: Any,
          config_dict: dict, *, overwrite: bool) -> dict: ...

  def dry_run(self, config: Any, mesh: jax.sharding.Mesh, inputs: Any) -> dict: ...


def launch(task: Task, config: Any, workdir: str, *, overwrite: bool = False) -> dict:
  """Checks, then dry-runs or claims the workdir and runs `task`; returns its record.

  Everything that can fail cheaply (the config's fields, the finished runs it
  reads) fails before the workdir is touched. A workdir holding a run of
  another config is refused unless `overwrite` (which deletes only that run's
  `task.LAYOUT`); one of the same config resumes.
  """
  mesh = mesh_lib.data_mesh()
  task.check(config, mesh.devices.size)
  dry_run = bool(config.get("dry_run", False))
  inputs, identities = task.inputs(config, dry_run)
  if dry_run:
    return task.dry_run(config, mesh, inputs)
  with claimed(config, workdir, task.LAYOUT, overwrite, inputs=identities) as config_dict:
    return task.run(config, workdir, mesh, inputs, config_dict, overwrite=overwrite)


@contextlib.contextmanager
def claimed(config: Any, workdir: str, layout: workdir_lib.Layout, overwrite: bool,
            inputs: dict | None = None) -> Iterator[dict]:
  """Holds the workdir for this config while inside (see `workdir.claim`); yields the config dict.

  `inputs` ({name: `runs.run_identity(...)`}) are the finished runs the job
  reads; they are recorded with the config under 'inputs', so a relaunch
  after one of them was retrained in place is refused as a different config,
  never resumed or reported against the old one.

  In a multi-process job process 0 alone checks, locks and writes config.json
  (clearing the old run's `layout` when overwriting); the others wait for its
  outcome, so a refusal stops every process instead of leaving some waiting in
  a collective.
  """
  config_dict = workdir_lib.config_to_dict(config)
  if inputs:
    config_dict["inputs"] = workdir_lib.config_to_dict(inputs)
  if jax.process_count() == 1:
    with workdir_lib.claim(workdir, config_dict, layout, overwrite=overwrite):
      yield config_dict
    return
  with contextlib.ExitStack() as held:
    error = None
    if jax.process_index() == 0:
      try:
        held.enter_context(workdir_lib.claim(workdir, config_dict, layout, overwrite=overwrite))
      except Exception as e:  # re-raised below, after every process has heard
        error = e
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if error is not None:
      raise error
    if not ok:
      raise RuntimeError(f"Process 0 could not claim {workdir}; its error says why.")
    yield config_dict


def write_outputs(directory: str, outputs: dict[str, Any]) -> None:
  """Writes a task's records, from process 0 only: the one place results are written.

  `outputs` maps file names to what they hold: a dict (JSON, written
  atomically), a str (text) or a callable(path) that writes the file (figures).
  """
  if jax.process_index() != 0:
    return
  for name, content in outputs.items():
    path = os.path.join(directory, name)
    if isinstance(content, dict):
      workdir_lib.write_json_atomic(path, content)
    elif isinstance(content, str):
      tmp = f"{path}.tmp"
      with open(tmp, "w") as f:
        f.write(content)
      os.replace(tmp, path)
    else:
      content(path)
