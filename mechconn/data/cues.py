"""Spurious cues, built exactly as the paper's official code builds them.

Images are NHWC float arrays in the normalised [-1, 1] space (the official
code's `Normalize((0.5,) * 3, (0.5,) * 3)`); cue values are written in that
space unchanged, so a green box is (0, 1, 0) there, as in the official code.

Box cue (official `boxDataset.get_box`): a 3x3 patch at position label % 10 of
a 3x3 grid (0 upper-left, 1 upper-centre, 2 upper-right, 3 middle-left,
4 centre, 5 middle-right, 6 lower-left, 7 lower-centre, 8 lower-right).
Position 9 draws nothing for 10 classes and a mid-upper-left box (centre
offset by -H/4, -W/4) for 100 classes. Colour: HSV (hue, 1, 1) converted to
RGB and reordered (B, R, G) as the official code does; hue = (label // 10) / 10
for 100 classes and 1.0 for 10 classes, which gives green (0, 1, 0). The patch
replaces the pixels in all channels.

Dominoes (official `domDataset`): the simple image (32x32x3 in [0, 1], not
normalised) stacked above the complex one; the i-th complex example of class c
is paired with the i-th simple example of class c; no cue = zeros on top.
"""

import colorsys

import numpy as np

BOX_SIZE = 3
NO_BOX = 9  # position label % 10 == 9 draws nothing for 10-class data


def cue_mask(labels: np.ndarray, num_classes: int, proportion: float) -> np.ndarray:
  """Which training examples carry the cue: per class, the first int(n_c * p) in index order.

  `int(n_c * p)` in float64 is the official code's expression (so e.g.
  int(100 * 0.29) = 28, as there).
  """
  if not 0.0 <= proportion <= 1.0:
    raise ValueError(f"cue proportion must lie in [0, 1], got {proportion}.")
  labels = np.asarray(labels)
  mask = np.zeros(len(labels), bool)
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)
    mask[idx[:int(idx.shape[0] * proportion)]] = True
  return mask


def box_colour(hue: float) -> np.ndarray:
  """RGB of HSV (hue, 1, 1), reordered as the official code's [[2, 0, 1]]."""
  rgb = np.asarray(colorsys.hsv_to_rgb(float(hue), 1.0, 1.0), np.float32)
  return rgb[[2, 0, 1]]


def box_hue(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Hue of each label's box: (label // 10) / 10 for 100 classes, 1.0 otherwise."""
  labels = np.asarray(labels)
  if num_classes == 100:
    return (labels // 10) / 10.0
  return np.ones(labels.shape, np.float64)


def box_slices(position: int, height: int, width: int, num_classes: int):
  """(row slice, column slice) of the 3x3 box at a grid position, or None (no box)."""
  s = BOX_SIZE
  rows = {0: slice(0, s), 1: slice((height - s) // 2, (height + s) // 2),
          2: slice(height - s, height)}
  cols = {0: slice(0, s), 1: slice((width - s) // 2, (width + s) // 2),
          2: slice(width - s, width)}
  if position == NO_BOX:
    if num_classes != 100:
      return None
    return (slice((height - s) // 2 - height // 4, (height + s) // 2 - height // 4),
            slice((width - s) // 2 - width // 4, (width + s) // 2 - width // 4))
  if not 0 <= position <= 8:
    raise ValueError(f"box position must be in 0..9, got {position}.")
  return rows[position // 3], cols[position % 3]


def apply_box(images: np.ndarray, positions: np.ndarray, hues: np.ndarray,
              num_classes: int) -> np.ndarray:
  """Draws one box per image at `positions[i]` (0..9) with colour HSV(hues[i], 1, 1).

  Args:
    images: [N, H, W, 3] float, not modified.
    positions: [N] ints in 0..9.
    hues: [N] floats in [0, 1].
    num_classes: 10 or 100 (decides what position 9 means).

  Returns:
    A new [N, H, W, 3] array.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"Box cues need NHWC RGB images, got shape {images.shape}.")
  out = images.copy()
  _, height, width, _ = images.shape
  positions = np.asarray(positions)
  hues = np.asarray(hues)
  # Vectorised over examples: one pass per (position, distinct hue) group.
  for position in np.unique(positions):
    box = box_slices(int(position), height, width, num_classes)
    if box is None:
      continue
    at = positions == position
    for hue in np.unique(hues[at]):
      which = np.flatnonzero(at & (hues == hue))
      out[which, box[0], box[1], :] = box_colour(hue)
  return out


def box_cue(images: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Every image cued with the box of its own label."""
  labels = np.asarray(labels)
  return apply_box(images, labels % 10, box_hue(labels, num_classes), num_classes)


def dominoes_pairing(complex_labels: np.ndarray, simple_labels: np.ndarray) -> np.ndarray:
  """Index of the simple example paired with each complex example.

  The i-th complex example of class c gets the i-th simple example of class c.
  """
  complex_labels, simple_labels = np.asarray(complex_labels), np.asarray(simple_labels)
  pairs = np.empty(len(complex_labels), np.int64)
  for c in np.unique(complex_labels):
    idx_complex = np.flatnonzero(complex_labels == c)
    idx_simple = np.flatnonzero(simple_labels == c)
    if len(idx_simple) < len(idx_complex):
      raise ValueError(f"Dominoes: class {c} has {len(idx_complex)} complex examples but "
                       f"only {len(idx_simple)} simple ones to pair them with.")
    pairs[idx_complex] = idx_simple[:len(idx_complex)]
  return pairs


def dominoes(complex_images: np.ndarray, simple_images: np.ndarray) -> np.ndarray:
  """Stacks simple images ([N, 32, 32, 3] in [0, 1]) above complex ones: [N, 64, 32, 3]."""
  complex_images, simple_images = np.asarray(complex_images), np.asarray(simple_images)
  if complex_images.shape != simple_images.shape:
    raise ValueError(f"Dominoes halves differ in shape: complex {complex_images.shape}, "
                     f"simple {simple_images.shape}.")
  return np.concatenate([simple_images, complex_images], axis=1)
