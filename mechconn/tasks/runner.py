"""The one prologue of every task, what a run is handed, and where records are written.

`launch(task, config, workdir)` is what the launcher calls for every task:

  1. the mesh over all devices (`mesh.data_mesh()`);
  2. the task's `resolve(config, num_devices)`: the config read once into the
     task's typed spec, every field checked, before any work;
  3. the task's `inputs(spec, dry_run)`, where it has finished runs to read
     (loaded and checked now, so a missing or diverged input fails before
     anything is written), with their identities for the record;
  4. a dry run (`spec.dry_run`, where the task has one): the task's
     `dry_run(spec, job)`, which times the step its `build` makes; nothing is
     read or written;
  5. otherwise the workdir is claimed (`claimed`: config.json, the lock, the
     refusal of another config) and the task's `run(spec, job)` runs inside.

A task module (`mechconn.tasks.train`, ...) provides NAME, LAYOUT, resolve and
run; `inputs` and `dry_run` only where it has them. Records are written by
`write_outputs` only: by process 0, atomically.
"""

from collections.abc import Callable, Iterator
import contextlib
import dataclasses
import os
from typing import Any, Protocol

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax

from mechconn import dry_run as dry_run_lib
from mechconn import mesh as mesh_lib
from mechconn import timing
from mechconn import workdir as workdir_lib
from mechconn.tasks import records
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
    model: the network.
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
  model: nn.Module | None = None
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


@dataclasses.dataclass(frozen=True)
class Job:
  """What a task's run (or dry run) is handed besides its spec.

  Attributes:
    mesh: the devices.
    inputs: what the task's `inputs` loaded (None for a task without inputs).
    workdir: where the run writes ('' in a dry run, which writes nothing).
    config_dict: the config as recorded in the workdir.
    overwrite: whether the launch may replace runs of another config (a task that
      claims further directories, e.g. the study's runs, passes it on).
  """

  mesh: jax.sharding.Mesh
  inputs: Any = None
  workdir: str = ""
  config_dict: dict = dataclasses.field(default_factory=dict)
  overwrite: bool = False


class Task(Protocol):
  """What `launch` needs of a task module (and, where it has them, `inputs(spec, dry_run)
  -> (inputs, identities)` and `dry_run(spec, job) -> report`)."""

  NAME: str
  LAYOUT: workdir_lib.Layout

  def resolve(self, config: ml_collections.ConfigDict, num_devices: int) -> Any: ...

  def run(self, spec: Any, job: Job) -> dict: ...


def launch(task: Task, config: ml_collections.ConfigDict, workdir: str, *,
           overwrite: bool = False) -> dict:
  """Resolves, then dry-runs or claims the workdir and runs `task`; returns its record.

  Everything that can fail cheaply (the config's fields, the finished runs it
  reads) fails before the workdir is touched. A workdir holding a run of
  another config is refused unless `overwrite` (which deletes only that run's
  `task.LAYOUT`); one of the same config resumes.
  """
  mesh = mesh_lib.data_mesh()
  spec = task.resolve(config, mesh.devices.size)
  return launch_resolved(task, spec, workdir_lib.config_to_dict(config), workdir,
                         overwrite=overwrite, mesh=mesh)


def launch_resolved(task: Task, spec: Any, config_dict: dict, workdir: str, *,
                    overwrite: bool = False, mesh: jax.sharding.Mesh | None = None) -> dict:
  """`launch` from a spec already resolved (e.g. the study's cue model, resolved with the
  study); `config_dict` is the config it was resolved from, recorded in the workdir."""
  mesh = mesh_lib.data_mesh() if mesh is None else mesh
  dry_run = bool(getattr(spec, "dry_run", False))
  if dry_run and not hasattr(task, "dry_run"):
    raise ValueError(f"The {task.NAME} task has no dry run (config.dry_run=True).")
  inputs, identities = task.inputs(spec, dry_run) if hasattr(task, "inputs") else (None, None)
  if dry_run:
    return task.dry_run(spec, Job(mesh, inputs))
  with claimed(config_dict, workdir, task.LAYOUT, overwrite, inputs=identities) as recorded:
    return task.run(spec, Job(mesh, inputs, workdir, recorded, overwrite))


@contextlib.contextmanager
def claimed(config: ml_collections.ConfigDict | dict, workdir: str, layout: workdir_lib.Layout,
            overwrite: bool, inputs: dict | None = None) -> Iterator[dict]:
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
    with workdir_lib.claim(workdir, config_dict, layout, overwrite=overwrite,
                           vocabulary=records.VOCABULARY):
      yield config_dict
    return
  with contextlib.ExitStack() as held:
    error = None
    if jax.process_index() == 0:
      try:
        held.enter_context(workdir_lib.claim(workdir, config_dict, layout, overwrite=overwrite,
                                             vocabulary=records.VOCABULARY))
      except Exception as e:  # re-raised below, after every process has heard
        error = e
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if error is not None:
      raise error
    if not ok:
      raise RuntimeError(f"Process 0 could not claim {workdir}; its error says why.")
    yield config_dict


@timing.timed(timing.OUTPUTS)
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
