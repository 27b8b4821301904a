"""Base datasets: the embedded procedural sets and TFDS datasets, as in-memory arrays.

Every loader returns (images uint8 [n, H, W, C], labels int32 [n]).

- Embedded, offline: 'shapes10' (complex) and 'glyphs10' (simple), generated
  from a seed; train and test splits come from different seeds.
- TFDS: 'cifar10', 'cifar100', 'fashion_mnist', 'mnist' via `tfds.data_source`
  (ArrayRecord; no TensorFlow at read time), from `data_dir` or TFDS_DATA_DIR.
  Nothing is downloaded unless `download=True`.

`normalize` maps uint8 to the official code's [-1, 1] space;
`to_simple_half` makes a Dominoes simple image (32x32, 3 channels, [0, 1]).
"""

import dataclasses
import functools
import os

import jax
import numpy as np

from mechconn.data import shapes


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What is known about a base dataset without loading it."""

  num_classes: int
  train_size: int
  test_size: int
  image_shape: tuple[int, int, int]  # [H, W, C] of its uint8 images
  tfds_name: str | None = None  # None: embedded (generated here, offline)


# The one table of dataset facts: loading, config checks and dry runs read it.
DATASETS = {
    "shapes10": DatasetInfo(10, 50_000, 10_000, (32, 32, 3)),
    "glyphs10": DatasetInfo(10, 50_000, 10_000, (32, 32, 3)),
    "cifar10": DatasetInfo(10, 50_000, 10_000, (32, 32, 3), "cifar10"),
    "cifar100": DatasetInfo(100, 50_000, 10_000, (32, 32, 3), "cifar100"),
    "fashion_mnist": DatasetInfo(10, 60_000, 10_000, (28, 28, 1), "fashion_mnist"),
    "mnist": DatasetInfo(10, 60_000, 10_000, (28, 28, 1), "mnist"),
}
EMBEDDED = {"shapes10": shapes.shapes10, "glyphs10": shapes.glyphs10}
NUM_CLASSES = {name: info.num_classes for name, info in DATASETS.items()}
TFDS_NAMES = {name: info.tfds_name for name, info in DATASETS.items() if info.tfds_name}


def info(name: str) -> DatasetInfo:
  """The facts of a named dataset; raises naming the valid ones."""
  if name not in DATASETS:
    raise ValueError(f"Unknown dataset {name!r}; valid datasets: {sorted(DATASETS)}.")
  return DATASETS[name]


_SPLIT_TAG = {"train": 0, "test": 1}


class DatasetNotFoundError(FileNotFoundError):
  """A TFDS dataset is not prepared where we looked."""


def _tfds_dir(data_dir: str | None) -> str:
  return data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


@functools.lru_cache(maxsize=4)
def _generated(name: str, seed: int, num_examples: int) -> tuple[np.ndarray, np.ndarray]:
  """An embedded dataset's arrays, generated once per process (a study and the cue model it
  trains read the same split; callers get copies), read-only."""
  images, labels = EMBEDDED[name](seed, num_examples)
  images.flags.writeable = labels.flags.writeable = False
  return images, labels


def load_base(name: str, split: str, *, seed: int = 0, num_examples: int | None = None,
              data_dir: str | None = None, download: bool = False
              ) -> tuple[np.ndarray, np.ndarray]:
  """Loads a base dataset split into memory.

  Args:
    name: one of NUM_CLASSES' keys.
    split: 'train' or 'test'.
    seed: embedded datasets only (>= 0); train uses 2 seed, test 2 seed + 1.
    num_examples: embedded: how many to generate (default 50,000 / 10,000);
      TFDS: keep the first n (default all).
    data_dir: TFDS data directory (default TFDS_DATA_DIR, then ~/tensorflow_datasets).
    download: let TFDS download and prepare the data (needs the internet).

  Returns:
    (images uint8 [n, H, W, C], labels int32 [n]).
  """
  facts = info(name)
  if split not in _SPLIT_TAG:
    raise ValueError(f"Unknown split {split!r}; valid splits: {sorted(_SPLIT_TAG)}.")
  if name in EMBEDDED:
    full = facts.train_size if split == "train" else facts.test_size
    n = full if num_examples is None else num_examples
    images, labels = _generated(name, 2 * seed + _SPLIT_TAG[split], n)  # a seed per split
    return images.copy(), labels.copy()
  return _load_tfds(name, split, num_examples=num_examples, data_dir=data_dir,
                    download=download)


def _load_tfds(name, split, *, num_examples, data_dir, download):
  import tensorflow_datasets as tfds  # imported lazily: slow, and unused offline

  where = _tfds_dir(data_dir)
  try:
    source = tfds.data_source(TFDS_NAMES[name], split=split, data_dir=data_dir,
                              download=download)
  except Exception as e:  # tfds raises several types for "not prepared"
    raise DatasetNotFoundError(
        f"TFDS dataset {TFDS_NAMES[name]!r} (split {split!r}) is not prepared under {where} "
        f"(data_dir={data_dir!r}, TFDS_DATA_DIR={os.environ.get('TFDS_DATA_DIR')!r}). "
        f"Prepare it on a machine with internet access, in array_record format: "
        f"`pip install tensorflow tensorflow-datasets && tfds build {TFDS_NAMES[name]} "
        f"--data_dir=DIR --file_format=array_record`, copy DIR here and set "
        f"TFDS_DATA_DIR=DIR (or the config's data_dir); or pass download=True where the "
        f"internet is reachable. Offline, use the embedded 'shapes10'/'glyphs10'. "
        f"(TFDS said: {type(e).__name__}: {str(e)[:300]})") from e
  n = len(source) if num_examples is None else min(num_examples, len(source))
  examples = [source[i] for i in range(n)]  # one-off load into memory
  images = np.stack([np.asarray(ex["image"], np.uint8) for ex in examples])
  labels = np.asarray([ex["label"] for ex in examples], np.int32)
  return images, labels


def normalize(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1] (the official Normalize((0.5,) * 3, (0.5,) * 3))."""
  return (np.asarray(images, np.float32) / 255.0 - 0.5) / 0.5


def to_simple_half(images: np.ndarray, size: int = 32) -> np.ndarray:
  """Dominoes simple image: RGB, resized (bilinear) to size x size, float32 in [0, 1]."""
  x = np.asarray(images, np.float32) / 255.0
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  if x.shape[1:3] != (size, size):
    x = np.asarray(jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear"))
  return np.clip(x, 0.0, 1.0)
