"""Cued training splits and host-side batch iterators.

A `CueSplit` holds a split in memory as uint8 base images plus, per example,
whether it carries the cue (and, for Dominoes, its paired simple image). Cues
are drawn per batch in float32, vectorised, so a 50,000-example split costs
its uint8 bytes, not four times that.
"""

import dataclasses

import numpy as np

from mechconn.data import cues, datasets, views

CUE_KINDS = ("none", "box", "dominoes")


def input_shape(dataset: str, cue: str) -> tuple[int, int, int]:
  """[H, W, C] of the model inputs of a cued dataset (Dominoes stack the simple half on top)."""
  height, width, channels = datasets.info(dataset).image_shape
  return (2 * height, width, channels) if cue == "dominoes" else (height, width, channels)


@dataclasses.dataclass(frozen=True)
class CueSplit:
  """A split with a spurious cue on the examples where `has_cue` is True.

  Attributes:
    images: uint8 [n, 32, 32, 3] base (complex) images.
    labels: int32 [n].
    num_classes: 10 or 100.
    kind: 'none', 'box' or 'dominoes'.
    has_cue: bool [n], e.g. `cues.cue_mask(labels, num_classes, p)`.
    simple: float32 [n, 32, 32, 3] in [0, 1], the paired simple image of each
      example (Dominoes only).
  """

  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  kind: str = "none"
  has_cue: np.ndarray | None = None
  simple: np.ndarray | None = None

  def __post_init__(self):
    if self.kind not in CUE_KINDS:
      raise ValueError(f"Unknown cue kind {self.kind!r}; valid kinds: {CUE_KINDS}.")
    if self.kind == "dominoes" and self.simple is None:
      raise ValueError("A Dominoes split needs its paired simple images (simple=...).")
    if len(self.images) != len(self.labels):
      raise ValueError(f"images and labels differ in length: {len(self.images)} vs "
                       f"{len(self.labels)}.")

  def __len__(self) -> int:
    return len(self.labels)

  def subset(self, idx: np.ndarray, cued: bool | None = None) -> "CueSplit":
    """The examples at idx; `cued` True/False puts the cue on all/none of them."""
    has_cue = None if self.has_cue is None else self.has_cue[idx]
    if cued is not None:
      has_cue = np.full(len(idx), cued)
    return dataclasses.replace(
        self, images=self.images[idx], labels=self.labels[idx], has_cue=has_cue,
        simple=None if self.simple is None else self.simple[idx])

  def examples(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    """{'image': float32 model inputs, 'label'} for the examples at idx, cues applied."""
    images = datasets.normalize(self.images[idx])
    labels = self.labels[idx]
    cued = (np.zeros(len(idx), bool) if self.has_cue is None or self.kind == "none"
            else self.has_cue[idx])
    if self.kind == "box":
      images[cued] = cues.box_cue(images[cued], labels[cued], self.num_classes)
    elif self.kind == "dominoes":
      top = np.where(cued[:, None, None, None], self.simple[idx], 0.0).astype(np.float32)
      images = cues.dominoes(images, top)
    return {"image": images, "label": labels}


def make_cue_split(images: np.ndarray, labels: np.ndarray, num_classes: int, kind: str,
                   proportion: float, simple_images: np.ndarray | None = None,
                   simple_labels: np.ndarray | None = None) -> CueSplit:
  """A training split where the first int(n_c * p) examples of each class carry the cue."""
  simple = None
  if kind == "dominoes":
    if simple_images is None or simple_labels is None:
      raise ValueError("Dominoes needs simple_images and simple_labels.")
    simple = datasets.to_simple_half(
        np.asarray(simple_images)[cues.dominoes_pairing(labels, simple_labels)])
  return CueSplit(images=np.asarray(images), labels=np.asarray(labels, np.int32),
                  num_classes=num_classes, kind=kind,
                  has_cue=cues.cue_mask(labels, num_classes, proportion), simple=simple)


def _simple_pair(simple_dataset: str, split: str, seed: int, num_examples: int | None,
                 data_dir: str | None, download: bool):
  if simple_dataset not in datasets.NUM_CLASSES:
    raise ValueError(f"Unknown simple_dataset {simple_dataset!r}; valid datasets: "
                     f"{sorted(datasets.NUM_CLASSES)}.")
  return datasets.load_base(simple_dataset, split, seed=seed, num_examples=num_examples,
                            data_dir=data_dir, download=download)


def load_train_split(dataset: str, cue: str, proportion: float, *, seed: int = 0,
                     num_examples: int | None = None, simple_dataset: str | None = None,
                     data_dir: str | None = None, download: bool = False) -> CueSplit:
  """A cued training split of a named dataset (see `datasets.load_base`).

  Args:
    dataset: base (complex) dataset, e.g. 'shapes10' or 'cifar10'.
    cue: 'none', 'box' or 'dominoes'.
    proportion: fraction of each class's examples carrying the cue.
    seed: the embedded datasets' seed.
    num_examples: keep this many (None: all).
    simple_dataset: Dominoes' simple half, e.g. 'glyphs10' or 'fashion_mnist'.
    data_dir, download: TFDS options.
  """
  images, labels = datasets.load_base(dataset, "train", seed=seed, num_examples=num_examples,
                                      data_dir=data_dir, download=download)
  num_classes = datasets.NUM_CLASSES[dataset]
  simple_images = simple_labels = None
  if cue == "dominoes":
    simple_images, simple_labels = _simple_pair(simple_dataset, "train", seed, None, data_dir,
                                                download)
  return make_cue_split(images, labels, num_classes, cue, proportion, simple_images,
                        simple_labels)


def load_test_views(dataset: str, cue: str, *, seed: int = 0, num_examples: int | None = None,
                    simple_dataset: str | None = None, data_dir: str | None = None,
                    download: bool = False, cue_proportion: float = 1.0
                    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """The four counterfactual views (model inputs) of a named test split, and its labels.

  The views' random draws use `seed`, as does the embedded data. Box views for
  cue 'box' (and 'none'), Dominoes views for 'dominoes'. `cue_proportion`: the
  fraction of each class's test examples that the cue views treat (`views`).
  """
  images, labels = datasets.load_base(dataset, "test", seed=seed, num_examples=num_examples,
                                      data_dir=data_dir, download=download)
  images = datasets.normalize(images)
  if cue == "dominoes":
    simple_images, simple_labels = _simple_pair(simple_dataset, "test", seed, None, data_dir,
                                                download)
    return views.dominoes_views(images, labels, datasets.to_simple_half(simple_images),
                                simple_labels, seed, cue_proportion), labels
  return views.box_views(images, labels, datasets.NUM_CLASSES[dataset], seed,
                         cue_proportion), labels
