"""A task's data: its typed `data` section loaded, its views and statistics batches sharded,
and the fine-tuning clean and cue sets of a cue model's training split.

Training batches step by step are `mechconn.data.steps`' (the same on the host
and on the devices).
"""

import jax
import numpy as np

from mechconn import config_checks as checks
from mechconn import counterfactual
from mechconn import mesh as mesh_lib
from mechconn import rngs
from mechconn import timing
from mechconn.data import batching
from mechconn.data import pipeline
from mechconn.tasks.specs import ImageData
from mechconn.types import StackedBatches


def examples_or_all(value: int) -> int | None:
  """A config's example count, with -1 (the whole split) as None."""
  return None if value == -1 else value


def loader_args(data: ImageData) -> dict:
  """The keyword arguments of `pipeline.load_*` shared by every split of a `data` section."""
  return dict(seed=data.seed, simple_dataset=data.simple_dataset,
              data_dir=data.data_dir or None, download=data.download)


def load_train_split(data: ImageData, *, cue_proportion: float | None = None,
                     num_examples: int | None = None) -> pipeline.CueSplit:
  """The cued training split of a `data` section (its proportion and size, unless given)."""
  return pipeline.load_train_split(
      data.dataset, data.cue, data.cue_proportion if cue_proportion is None else cue_proportion,
      num_examples=examples_or_all(data.num_train) if num_examples is None else num_examples,
      **loader_args(data))


def load_test_views(data: ImageData) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """The four views of a `data` section's test split, and its labels."""
  return pipeline.load_test_views(data.dataset, data.cue,
                                  num_examples=examples_or_all(data.num_test),
                                  cue_proportion=data.test_cue_proportion,
                                  **loader_args(data))


@timing.timed(timing.DATA)
def load_data(data: ImageData) -> tuple[pipeline.CueSplit, dict[str, np.ndarray], np.ndarray]:
  """(training split, test views, test labels) of a `data` section."""
  return (load_train_split(data), *load_test_views(data))


@timing.timed(timing.DATA)
def shard_views(test_views: dict[str, np.ndarray], labels: np.ndarray, batch_size: int,
                mesh: jax.sharding.Mesh) -> counterfactual.ViewBatches:
  """The views stacked into masked batches, each batch sharded over the mesh."""
  rows = mesh_lib.process_rows(batch_size)
  return {name: mesh_lib.shard_batch({k: v[:, rows] for k, v in batches.items()}, mesh,
                                     batch_axis=1)
          for name, batches in counterfactual.stack_views(test_views, labels,
                                                          batch_size).items()}


@timing.timed(timing.DATA)
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


@timing.timed(timing.DATA)
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
