"""Counterfactual views of a test split: clean, cue, rand_cue, rand_img.

- clean: no cue at all;
- cue: every example carries the cue of its own label;
- rand_cue: every example carries the cue of a random label (cue randomised;
  high accuracy = the model ignores the cue). For box cues the position is
  uniform over 0..9 as in the official code, so for 10 classes it is "no box"
  with probability 0.1; for 100 classes the hue is uniform in [0, 1), also as
  there;
- rand_img: the cue of the true label on another, randomly drawn image of the
  split (image randomised; high accuracy = the model predicts from the cue).

Labels are the split's labels in every view. All draws come from
`np.random.default_rng([seed, tag])`, so views are deterministic given a seed.

`cue_proportion` (default 1: every example) is the official fine-tuning
script's `--cue_proportion` applied to its test loaders: only the first
int(n_c * p) examples of each class (`cues.cue_mask`) get the cue in the cue,
rand_cue and rand_img views; the rest stay clean in the cue and rand_cue views,
and in rand_img they are the other image without any cue (that script
randomises the image of every example, the cue only of the masked ones).
"""

import numpy as np

from mechconn.data import cues

VIEWS = ("clean", "cue", "rand_cue", "rand_img")
_RAND_CUE, _RAND_IMG = 1, 2  # rng tags


def other_indices(rng: np.random.Generator, n: int) -> np.ndarray:
  """For each i a uniformly random j != i (n >= 2)."""
  if n < 2:
    raise ValueError(f"rand_img needs at least 2 examples, got {n}.")
  return (np.arange(n) + rng.integers(1, n, size=n)) % n


def _partly_cued(cued: np.ndarray, uncued: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """`cued` where mask, else `uncued` (both [N, ...])."""
  if mask.all():
    return cued
  return np.where(mask.reshape((-1,) + (1,) * (cued.ndim - 1)), cued, uncued)


def box_views(images: np.ndarray, labels: np.ndarray, num_classes: int,
              seed: int, cue_proportion: float = 1.0) -> dict[str, np.ndarray]:
  """The four views of a box-cue test split: {view: [N, H, W, 3] images}."""
  images, labels = np.asarray(images), np.asarray(labels)
  n = len(labels)
  mask = cues.cue_mask(labels, num_classes, cue_proportion)
  rng_cue = np.random.default_rng([seed, _RAND_CUE])
  positions = rng_cue.integers(0, 10, size=n)
  hues = (rng_cue.uniform(size=n) if num_classes == 100
          else cues.box_hue(labels, num_classes))
  others = other_indices(np.random.default_rng([seed, _RAND_IMG]), n)
  return {
      "clean": images.copy(),
      "cue": _partly_cued(cues.box_cue(images, labels, num_classes), images, mask),
      "rand_cue": _partly_cued(cues.apply_box(images, positions, hues, num_classes), images,
                               mask),
      "rand_img": _partly_cued(cues.box_cue(images[others], labels, num_classes),
                               images[others], mask),
  }


def dominoes_views(complex_images: np.ndarray, labels: np.ndarray,
                   simple_images: np.ndarray, simple_labels: np.ndarray,
                   seed: int, cue_proportion: float = 1.0) -> dict[str, np.ndarray]:
  """The four views of a Dominoes test split: {view: [N, 64, 32, 3] images}."""
  complex_images, labels = np.asarray(complex_images), np.asarray(labels)
  simple_images = np.asarray(simple_images)
  n = len(labels)
  # The mask depends only on the classes present, so their count is enough here.
  mask = cues.cue_mask(labels, int(labels.max(initial=-1)) + 1, cue_proportion)
  blank = np.zeros((n,) + simple_images.shape[1:], simple_images.dtype)
  paired = _partly_cued(simple_images[cues.dominoes_pairing(labels, simple_labels)], blank,
                        mask)
  random_simple = _partly_cued(simple_images[np.random.default_rng([seed, _RAND_CUE]).integers(
      0, len(simple_images), size=n)], blank, mask)
  others = other_indices(np.random.default_rng([seed, _RAND_IMG]), n)
  return {
      "clean": cues.dominoes(complex_images, np.zeros_like(complex_images)),
      "cue": cues.dominoes(complex_images, paired),
      "rand_cue": cues.dominoes(complex_images, random_simple),
      "rand_img": cues.dominoes(complex_images[others], paired),
  }
