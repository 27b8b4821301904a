"""Data for the tasks: a config's `data` section loaded, batched per step and sharded.

Every host builds the same split and takes its rows of each global batch
(`mesh.process_rows`); batches are pure functions of the step number, so a
resumed run reads exactly what an uninterrupted one reads.
"""

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from mechconn import counterfactual
from mechconn import mesh as mesh_lib
from mechconn.data import batching
from mechconn.data import pipeline
from mechconn.types import Batch, StackedBatches


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
                                  **loader_args(data))


def load_data(data: Any) -> tuple[pipeline.CueSplit, dict[str, np.ndarray], np.ndarray]:
  """(training split, test views, test labels) of a `data` section."""
  return (load_train_split(data), *load_test_views(data))


def batch_fn_for(split: pipeline.CueSplit, batch_size: int, seed: int,
                 mesh: jax.sharding.Mesh) -> Callable[[int], Batch]:
  """step -> the step's global batch, sharded over the mesh (this host loads its rows)."""
  rows = mesh_lib.process_rows(batch_size)

  def batch_fn(step):
    local = pipeline.batch_at_step(split, batch_size, seed=seed, step=step, rows=rows)
    return mesh_lib.shard_batch(local, mesh)

  return batch_fn


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
