"""Embedded procedural image sets: `shapes10` (complex) and `glyphs10` (simple).

Both are generated deterministically from a seed with vectorised numpy, so
every command runs offline on a fresh machine in seconds. Images are uint8
NHWC 32x32x3 (normalise with `mechconn.data.datasets.normalize`).

shapes10: the class is a shape (disk, square, triangle, plus, ring, bar,
diamond, cross, hollow square, ellipse) with random position, size, rotation
(within +-15 degrees, so square/diamond and plus/cross stay distinct),
foreground and background colours (kept apart in brightness) and Gaussian pixel
noise. The shape is the hard attribute, the box cue the simple one. The
defaults are calibrated (benchmarks/shapes_difficulty.py, 3 epochs of a
SmallCNN(32) on 50,000 images): no cue, 0.82 clean
test accuracy; box cue at p = 0.8: clean 0.68, cue 0.99, rand_cue 0.43,
rand_img 0.55 (the paper's signature of a cue-reliant model).

glyphs10: seven-segment digits 0-9, white on black, with random offset,
scale and stroke width: the simple half of an offline Dominoes.
"""

from concurrent import futures
import os

import numpy as np

SHAPE_NAMES = ("disk", "square", "triangle", "plus", "ring", "bar", "diamond", "cross",
               "hollow_square", "ellipse")
IMAGE_SIZE = 32
_CHUNK = 4096  # images generated per vectorised chunk (bounds memory)


def _box(u, v):
  return np.maximum(np.abs(u), np.abs(v))


# Inside-tests of each shape in its unit coordinates (u right, v up).
_SHAPES = (
    lambda u, v: u * u + v * v <= 1.0,                                           # disk
    lambda u, v: _box(u, v) <= 0.8,                                              # square
    lambda u, v: (v >= -0.6) & (np.sqrt(3) * np.abs(u) + v <= 0.95),             # triangle
    lambda u, v: (((np.abs(u) <= 0.25) & (np.abs(v) <= 1.0))
                  | ((np.abs(v) <= 0.25) & (np.abs(u) <= 1.0))),                 # plus
    lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= 0.55**2),           # ring
    lambda u, v: (np.abs(u) <= 1.0) & (np.abs(v) <= 0.3),                        # bar
    lambda u, v: np.abs(u) + np.abs(v) <= 1.0,                                   # diamond
    lambda u, v: (((np.abs(u - v) <= 0.31) | (np.abs(u + v) <= 0.31))
                  & (_box(u, v) <= 0.75)),                                       # cross
    lambda u, v: (_box(u, v) <= 0.85) & (_box(u, v) >= 0.5),                     # hollow square
    lambda u, v: u * u + v * v / 0.3 <= 1.0,                                     # ellipse
)


def _shape_masks(u: np.ndarray, v: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Inside-masks [n, H, W] of each example's shape (one vectorised test per class)."""
  mask = np.zeros(u.shape, bool)
  for c, inside in enumerate(_SHAPES):
    at = labels == c
    if at.any():
      mask[at] = inside(u[at], v[at])
  return mask


def _render_shapes(rng: np.random.Generator, labels: np.ndarray, noise: float, min_size: float,
                   max_size: float, min_contrast: float) -> np.ndarray:
  n = len(labels)
  size = IMAGE_SIZE
  scale = rng.uniform(min_size, max_size, size=n)  # half-size of the shape, pixels
  centre = rng.uniform(scale[:, None], size - scale[:, None], size=(n, 2))
  angle = np.deg2rad(rng.uniform(-15.0, 15.0, size=n))
  fg = rng.uniform(0.0, 1.0, size=(n, 3))
  bg = rng.uniform(0.0, 1.0, size=(n, 3))
  # Keep foreground and background apart in mean brightness (>= min_contrast).
  low_contrast = np.abs(fg.mean(1) - bg.mean(1)) < min_contrast
  fg[low_contrast] = np.clip(1.0 - bg[low_contrast], 0, 1)
  flip = np.abs(fg.mean(1) - bg.mean(1)) < min_contrast
  fg[flip] = np.where(bg[flip].mean(1, keepdims=True) > 0.5, 0.0, 1.0)
  grid = np.arange(size, dtype=np.float32) + 0.5
  dy = grid[None, :, None] - centre[:, 0, None, None]
  dx = grid[None, None, :] - centre[:, 1, None, None]
  cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
  s = scale[:, None, None]
  u = (cos * dx + sin * dy) / s
  v = (-sin * dx + cos * dy) / s
  v = -v  # v points up, so the triangle's apex is up
  mask = _shape_masks(u.astype(np.float32), v.astype(np.float32), labels)[..., None]
  images = np.where(mask, fg[:, None, None, :], bg[:, None, None, :])
  images = images + noise * rng.normal(size=images.shape)
  return np.clip(np.round(images * 255), 0, 255).astype(np.uint8)


def shapes10(seed: int, num_examples: int, *, noise: float = 0.2, min_size: float = 4.5,
             max_size: float = 9.0, min_contrast: float = 0.2
             ) -> tuple[np.ndarray, np.ndarray]:
  """(images [n, 32, 32, 3] uint8, labels [n] int32), classes balanced in random order.

  Args:
    seed: everything is drawn from it (use different seeds for train and test).
    num_examples: n.
    noise: std of the Gaussian pixel noise, in [0, 1] intensity units.
    min_size, max_size: range of the shapes' half-size, pixels.
    min_contrast: least difference of mean brightness between shape and background.
  """
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.arange(num_examples) % 10).astype(np.int32)
  def chunk(i):  # each chunk draws from its own generator: threads give the same images
    return _render_shapes(np.random.default_rng([seed, i]),
                          labels[i * _CHUNK:(i + 1) * _CHUNK], noise, min_size, max_size,
                          min_contrast)

  with futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # numpy releases the GIL
    chunks = list(pool.map(chunk, range(-(-num_examples // _CHUNK))))
  images = np.concatenate(chunks) if chunks else np.zeros((0, 32, 32, 3), np.uint8)
  return images, labels


# Seven segments (a top, b upper right, c lower right, d bottom, e lower left,
# f upper left, g middle) lit for each digit.
_SEGMENTS = {0: "abcdef", 1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc", 5: "afgcd",
             6: "afgedc", 7: "abc", 8: "abcdefg", 9: "abcdfg"}


def _segment_masks(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
  """Masks of the seven segments of a digit box spanning x, y in [0, 1]."""
  def horizontal(level):
    return (np.abs(y - level) <= w) & (x >= 0) & (x <= 1)

  def vertical(col, lo, hi):
    return (np.abs(x - col) <= w) & (y >= lo) & (y <= hi)

  return {"a": horizontal(0.0), "g": horizontal(0.5), "d": horizontal(1.0),
          "f": vertical(0.0, 0.0, 0.5), "b": vertical(1.0, 0.0, 0.5),
          "e": vertical(0.0, 0.5, 1.0), "c": vertical(1.0, 0.5, 1.0)}


def glyphs10(seed: int, num_examples: int) -> tuple[np.ndarray, np.ndarray]:
  """(images [n, 32, 32, 3] uint8, labels [n] int32): seven-segment digits, jittered."""
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.arange(num_examples) % 10).astype(np.int32)
  n = num_examples
  height = rng.uniform(18, 24, size=n)
  width = height * rng.uniform(0.45, 0.6, size=n)
  top = rng.uniform(2, IMAGE_SIZE - 2 - height)
  left = rng.uniform(3, IMAGE_SIZE - 3 - width)
  stroke = rng.uniform(0.07, 0.11, size=n)[:, None, None]
  grid = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5
  y = (grid[None, :, None] - top[:, None, None]) / height[:, None, None]
  x = (grid[None, None, :] - left[:, None, None]) / width[:, None, None]
  y, x = np.broadcast_arrays(y, x)
  segments = _segment_masks(x, y, stroke)
  lit = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), bool)
  for name, mask in segments.items():
    uses = np.array([name in _SEGMENTS[d] for d in range(10)])[labels]
    lit |= mask & uses[:, None, None]
  images = np.repeat((lit * 255).astype(np.uint8)[..., None], 3, axis=-1)
  return images, labels
