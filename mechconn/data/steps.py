"""Training batches step by step, drawn on the host or on the devices: bitwise the same.

Every host builds the same split and takes its rows of each global batch
(`mesh.process_rows`); batches are pure functions of the step number, so a
resumed run reads exactly what an uninterrupted one reads. Two pipelines give
bitwise the same batches:
  - 'device': the split lives on the devices (`data.device`, replicated over
    the mesh) and the step draws its own batch: the epoch's indices are
    uploaded once per epoch and the step's compiled program gathers,
    normalises and draws the cue (`loop_inputs`), so the loop runs at the
    step's speed on an accelerator;
  - 'host': numpy gathers and cues the batch, which is then copied over
    (for data that does not fit in device memory);
  - 'auto': 'device' when the split takes at most `DEVICE_MEMORY_FRACTION` of
    one device's memory (on CPU, of `CPU_DEVICE_BYTES`), else 'host'.
A split that is not a cued image split (`pipeline.CueSplit`), e.g. token
sequences, always runs on the host pipeline.
"""

from collections.abc import Callable
import dataclasses
import functools
from typing import Any

import jax
import numpy as np

from mechconn import mesh as mesh_lib
from mechconn.data import batching
from mechconn.data import device
from mechconn.data import pipeline
from mechconn.types import Batch


PIPELINES = ("auto", "device", "host")
DEVICE_MEMORY_FRACTION = 0.25
CPU_DEVICE_BYTES = 8 << 30  # what 'auto' assumes a CPU "device" has (host memory)


def device_memory_bytes() -> int:
  """Memory of one local device (its allocator's limit; `CPU_DEVICE_BYTES` on CPU)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return int(stats.get("bytes_limit", CPU_DEVICE_BYTES))


def on_device(split: Any, mode: str) -> bool:
  """Whether `mode` ('auto', 'device' or 'host') puts this split on the devices (never a
  split that is not a `pipeline.CueSplit`: 'auto' is 'host' for it, 'device' raises)."""
  if mode not in PIPELINES:
    raise ValueError(f"Unknown data pipeline {mode!r}; valid: {list(PIPELINES)}.")
  if not isinstance(split, pipeline.CueSplit):
    if mode == "device":
      raise ValueError(f"The device pipeline draws cued image batches; a "
                       f"{type(split).__name__} runs on data.pipeline 'host' (or 'auto').")
    return False
  if mode != "auto":
    return mode == "device"
  return device.nbytes(split) <= DEVICE_MEMORY_FRACTION * device_memory_bytes()


class StepBatches:
  """A split's training batches, step by step, in one seed's order (or several seeds').

  `batches(seed, step)` is the global batch of `batching.batch_indices_at_step`
  ({'image', 'label'}; a sequence split's {'tokens', 'mask'}), sharded over the
  mesh; `batches([s1, s2, ...], step)` stacks several seeds' batches on a
  leading axis (sharded on axis 1), for vmapped seed ensembles. The same arrays
  from either pipeline (see the module docstring). A loop uses them through
  `loop_inputs`, which on the device pipeline moves the drawing into the step's
  own program.
  """

  def __init__(self, split: pipeline.CueSplit, batch_size: int, mesh: jax.sharding.Mesh,
               mode: str = "auto"):
    self.split, self.batch_size, self.mesh = split, batch_size, mesh
    self.rows = mesh_lib.process_rows(batch_size)
    self.steps_per_epoch = len(split) // batch_size
    self.on_device = on_device(split, mode)
    self.data = (mesh_lib.replicate(device.host_split(split), mesh) if self.on_device
                 else None)
    self._epoch = (None, None)  # (key, its indices on the devices)

  def _local_indices(self, seed: int, step: int) -> np.ndarray:
    return batching.batch_indices_at_step(len(self.split), self.batch_size, seed=seed,
                                          step=step)[self.rows]

  def __call__(self, seed: int | list[int], step: int) -> Batch:
    seeds = seed if isinstance(seed, list) else None
    batch_axis = 0 if seeds is None else 1
    if seeds is None:
      idx = self._local_indices(seed, step)
    else:
      idx = np.stack([self._local_indices(s, step) for s in seeds])
    if self.on_device:
      global_idx = mesh_lib.shard_batch({"index": idx}, self.mesh, batch_axis)["index"]
      return self.draw(global_idx[..., None, :], 0, batch_axis)
    if seeds is None:
      return mesh_lib.shard_batch(self.split.examples(idx), self.mesh)
    stacked = [self.split.examples(i) for i in idx]  # CueSplit.examples takes 1-D indices
    return mesh_lib.shard_batch({k: np.stack([b[k] for b in stacked]) for k in stacked[0]},
                                self.mesh, batch_axis)

  def epoch_indices(self, seed: int | list[int], step: int) -> jax.Array:
    """The indices of the whole epoch holding `step` on the devices, [steps_per_epoch, B]
    ([seeds, steps_per_epoch, B] for a list), sharded on the batch axis; uploaded once
    per epoch (device pipeline)."""
    epoch = step // self.steps_per_epoch
    key = (tuple(seed) if isinstance(seed, list) else seed, epoch)
    if self._epoch[0] != key:
      seeds = seed if isinstance(seed, list) else [seed]
      idx = np.stack([batching.epoch_batches(len(self.split), self.batch_size, seed=s,
                                             epoch=epoch)[:, self.rows] for s in seeds])
      if not isinstance(seed, list):
        idx = idx[0]
      self._epoch = (key, mesh_lib.shard_batch({"index": idx}, self.mesh,
                                               batch_axis=idx.ndim - 1)["index"])
    return self._epoch[1]

  def draw(self, indices: jax.Array, i: jax.Array | int, batch_axis: int,
           data: device.DeviceSplit | None = None) -> Batch:
    """The batch at position `i` of an epoch's indices, gathered and cued on the devices.

    `data` is this split's `DeviceSplit` (default: its own); a compiled step
    takes it as an argument, so that the data is not baked into the program.
    """
    return device.examples(self.data if data is None else data, indices[..., i, :],
                           out_sharding=mesh_lib.batch_sharding(self.mesh, batch_axis))


def loop_inputs(step_fn: Callable, parts: dict[str, tuple[StepBatches, int | list[int]]],
                assemble: Callable[[dict[str, Batch]], Batch] = lambda b: b["batch"]
                ) -> tuple[Callable, Callable[[int], Any]]:
  """(step, batch_fn) for `loop.train_loop` from a step and the batches it reads.

  `parts` names each split's batches and the seed(s) ordering them (e.g. CBFT's
  clean and cue batches); `assemble` makes the step's batch from them
  ({name: batch}; default: the part named 'batch').

  On the device pipeline the step draws its own batch: `batch_fn(step)` gives
  each part's indices for the whole epoch (uploaded once per epoch), and the
  returned step, one compiled program, picks row `state.step % steps_per_epoch`
  of each, gathers, normalises and cues on the devices, then runs `step_fn`.
  The host pipeline returns `step_fn` itself and a `batch_fn` of host batches.
  Either way each step sees bitwise the same batch.
  """
  if not all(batches.on_device for batches, _ in parts.values()):
    def host_batch_fn(step):
      return assemble({name: batches(seed, step) for name, (batches, seed) in parts.items()})
    return step_fn, host_batch_fn

  def batch_fn(step):  # the same device arrays for every step of an epoch
    return {name: (batches.data, batches.epoch_indices(seed, step))
            for name, (batches, seed) in parts.items()}

  fn, static, arrays = _lifted(step_fn)
  plan = _DrawingPlan(fn, static, assemble, tuple(
      (name, batches.steps_per_epoch, 1 if isinstance(seed, list) else 0, batches.mesh)
      for name, (batches, seed) in parts.items()))
  try:
    hash(plan)
  except TypeError:  # a keyword that is neither arrays nor hashable: the step as it is
    plan, arrays = dataclasses.replace(plan, step=step_fn, static=()), {}
  drawing_step = functools.partial(_drawing_step, arrays=arrays, plan=plan)
  drawing_step.__wrapped__ = step_fn  # the step it runs (tests compare it with the build's)
  return drawing_step, batch_fn


@dataclasses.dataclass(frozen=True)
class _DrawingPlan:
  """What a drawing step's program depends on besides its arguments: equal plans (e.g. the
  seeds of one method: the same step, optimiser and data layout) share one compiled program."""

  step: Callable  # (state, batch, **static, **arrays) -> (state, metrics)
  static: tuple  # ((keyword, hashable value), ...)
  assemble: Callable
  draws: tuple  # ((part name, steps per epoch, batch axis, mesh), ...)


def _lifted(step_fn: Callable) -> tuple[Callable, tuple, dict]:
  """(function, static keywords, array keywords) of a step bound by `functools.partial`
  with keywords only (e.g. `train_step` with its root key, loss and optimiser): keywords whose
  leaves are all arrays (the root key, a loss holding parameters) become arguments of the
  compiled program rather than constants baked into it; the others are static."""
  if not isinstance(step_fn, functools.partial) or step_fn.args:
    return step_fn, (), {}
  arrays = {k: v for k, v in step_fn.keywords.items()
            if all(isinstance(x, jax.Array) for x in jax.tree.leaves(v))}
  static = tuple(sorted((k, v) for k, v in step_fn.keywords.items() if k not in arrays))
  return step_fn.func, static, arrays


@functools.partial(jax.jit, static_argnames="plan", donate_argnums=0)
def _drawing_step(state, sources, *, arrays, plan: _DrawingPlan):
  """Draws each part's batch at row `state.step % steps_per_epoch` of its epoch's indices
  (gathered, normalised and cued on the devices), then runs the step."""
  drawn = {name: device.examples(sources[name][0], sources[name][1][..., state.step % per_epoch, :],
                                 out_sharding=mesh_lib.batch_sharding(mesh, batch_axis))
           for name, per_epoch, batch_axis, mesh in plan.draws}
  return plan.step(state, plan.assemble(drawn), **dict(plan.static), **arrays)


def loop_inputs_for(step_fn: Callable, split: pipeline.CueSplit, batch_size: int, seed: int,
                    mesh: jax.sharding.Mesh, mode: str = "auto"
                    ) -> tuple[Callable, Callable[[int], Any]]:
  """`loop_inputs` for a step reading one split's batches in `seed`'s order."""
  return loop_inputs(step_fn, {"batch": (StepBatches(split, batch_size, mesh, mode), seed)})
