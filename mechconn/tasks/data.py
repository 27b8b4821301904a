"""Data for the tasks: a config's `data` section loaded, batched per step and sharded.

Every host builds the same split and takes its rows of each global batch
(`mesh.process_rows`); batches are pure functions of the step number, so a
resumed run reads exactly what an uninterrupted one reads.

Two pipelines give bitwise the same batches (`data.pipeline`):
  - 'device': the split lives on the devices (`data.device`, replicated over
    the mesh) and the step draws its own batch: the epoch's indices are
    uploaded once per epoch and the step's compiled program gathers,
    normalises and draws the cue (`loop_inputs`), so the loop runs at the
    step's speed on an accelerator;
  - 'host': numpy gathers and cues the batch, which is then copied over
    (for data that does not fit in device memory);
  - 'auto' (default): 'device' when the split takes at most
    `DEVICE_MEMORY_FRACTION` of one device's memory (on CPU, of
    `CPU_DEVICE_BYTES`), else 'host'.
A split of token sequences (`tasks.sequences.SequenceSplit`: anything that is
not a cued image split) always runs on the host pipeline: the device pipeline
draws cued images only.
"""

from collections.abc import Callable
import functools
from typing import Any

import jax
import numpy as np

from mechconn import config_checks as checks
from mechconn import counterfactual
from mechconn import mesh as mesh_lib
from mechconn import rngs
from mechconn.data import batching
from mechconn.data import device
from mechconn.data import pipeline
from mechconn.types import Batch, StackedBatches

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

  @functools.partial(jax.jit, donate_argnums=0)
  def drawing_step(state, sources):
    drawn = {name: batches.draw(sources[name][1], state.step % batches.steps_per_epoch,
                                batch_axis=1 if isinstance(seed, list) else 0,
                                data=sources[name][0])
             for name, (batches, seed) in parts.items()}
    return step_fn(state, assemble(drawn))

  drawing_step.__wrapped__ = step_fn  # the step it runs (tests compare it with the build's)
  return drawing_step, batch_fn


def examples_or_all(value: int) -> int | None:
  """A config's example count, with -1 (the whole split) as None."""
  return None if value == -1 else value


def loader_args(data: Any) -> dict:
  """The keyword arguments of `pipeline.load_*` shared by every split of a `data` section."""
  return dict(seed=data.seed, simple_dataset=data.simple_dataset,
              data_dir=data.data_dir or None, download=data.download)


def load_train_split(data: Any, *, cue_proportion: float | None = None,
                     num_examples: int | None = None) -> pipeline.CueSplit:
  """The cued training split of a `data` section (its proportion and size, unless given)."""
  return pipeline.load_train_split(
      data.dataset, data.cue, data.cue_proportion if cue_proportion is None else cue_proportion,
      num_examples=examples_or_all(data.num_train) if num_examples is None else num_examples,
      **loader_args(data))


def load_test_views(data: Any) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """The four views of a `data` section's test split, and its labels."""
  return pipeline.load_test_views(data.dataset, data.cue,
                                  num_examples=examples_or_all(data.num_test),
                                  cue_proportion=test_cue_proportion(data),
                                  **loader_args(data))


def test_cue_proportion(data: Any) -> float:
  """The fraction of each class's test examples the cue views treat (1: all; runs recorded
  before the field existed read as 1)."""
  return data.get("test_cue_proportion", 1.0)


def load_data(data: Any) -> tuple[pipeline.CueSplit, dict[str, np.ndarray], np.ndarray]:
  """(training split, test views, test labels) of a `data` section."""
  return (load_train_split(data), *load_test_views(data))


def loop_inputs_for(step_fn: Callable, split: pipeline.CueSplit, batch_size: int, seed: int,
                    mesh: jax.sharding.Mesh, mode: str = "auto"
                    ) -> tuple[Callable, Callable[[int], Any]]:
  """`loop_inputs` for a step reading one split's batches in `seed`'s order."""
  return loop_inputs(step_fn, {"batch": (StepBatches(split, batch_size, mesh, mode), seed)})


def shard_views(test_views: dict[str, np.ndarray], labels: np.ndarray, batch_size: int,
                mesh: jax.sharding.Mesh) -> counterfactual.ViewBatches:
  """The views stacked into masked batches, each batch sharded over the mesh."""
  rows = mesh_lib.process_rows(batch_size)
  return {name: mesh_lib.shard_batch({k: v[:, rows] for k, v in batches.items()}, mesh,
                                     batch_axis=1)
          for name, batches in counterfactual.stack_views(test_views, labels,
                                                          batch_size).items()}


def bn_batches_of(examples: dict[str, np.ndarray], batch_size: int) -> StackedBatches:
  """Stacked full batches of images ({'image': [M, B, ...]}) for BatchNorm statistics."""
  stacked = batching.stack_batches(examples["image"], examples["label"], batch_size,
                                   drop_remainder=True)
  return {"image": stacked["image"]}


# --- The fine-tuning sets (clean and cue) of a cue model's training split. ---------


def set_sizes(num_train: int, num_clean: int, num_cue: int) -> int:
  """The number of cue examples (num_cue, or -1: the rest); raises unless both sets fit."""
  num_cue = num_train - num_clean if num_cue == -1 else num_cue
  if num_cue < 1 or num_clean + num_cue > num_train:
    raise ValueError(f"config.finetune.num_clean={num_clean} + finetune.num_cue={num_cue} "
                     f"exceed the {num_train} training examples of the cue model's data (the "
                     "clean and cue sets are disjoint).")
  return num_cue


# CBFT's cue set: every example cued (the paper), or cued as in the training split at the
# cue model's p (the official script). Path evaluation's BatchNorm examples: all cued.
CUE_SETS = ("all_cued", "as_split")


def cue_set_of(ft: Any) -> str:
  """`finetune.cbft.cue_set`, checked (configs recorded before the field existed: 'all_cued')."""
  cue_set = ft.cbft.get("cue_set", "all_cued")
  checks.check_choice(cue_set, CUE_SETS, "finetune.cbft.cue_set")
  return cue_set


def split_clean_and_cue(split: pipeline.CueSplit, num_clean: int, num_cue: int, seed: int,
                        cue_set: str = "all_cued"
                        ) -> tuple[pipeline.CueSplit, pipeline.CueSplit]:
  """Disjoint (clean set without cue, cue set), drawn without replacement; the cue set is
  all cued, or keeps the split's own cue flags (`cue_set='as_split'`, see `CUE_SETS`)."""
  checks.check_choice(cue_set, CUE_SETS, "finetune.cbft.cue_set")
  n = len(split)
  num_cue = set_sizes(n, num_clean, num_cue)
  order = np.random.default_rng([seed, rngs.CLEAN_CUE_SPLIT]).permutation(n)
  clean_idx, cue_idx = np.sort(order[:num_clean]), np.sort(order[num_clean:num_clean + num_cue])
  return (split.subset(clean_idx, cued=False),
          split.subset(cue_idx, cued=True if cue_set == "all_cued" else None))
