"""A tiny embedded image task: noisy, shifted copies of per-class prototypes.

Generated deterministically from a seed with numpy in milliseconds, so the
quickstart and the tests run on a fresh offline machine. Each class has a
smooth random RGB prototype; an example is its class prototype circularly
shifted by a few pixels, scaled in contrast, plus Gaussian pixel noise.
Values are in [-1, 1].
"""

import numpy as np


def make_prototype_images(seed: int, num_examples: int, *, num_classes: int = 10,
                          image_size: int = 16, channels: int = 3, max_shift: int = 2,
                          noise: float = 0.5, prototype_seed: int = 0
                          ) -> tuple[np.ndarray, np.ndarray]:
  """Returns (images [n, s, s, c] float32 in [-1, 1], labels [n] int32).

  Args:
    seed: draws labels, shifts, contrast and noise (use different seeds for
      train and test).
    num_examples: n.
    num_classes: classes (one prototype each).
    image_size: s.
    channels: c.
    max_shift: maximal circular shift, pixels, in each direction.
    noise: standard deviation of the Gaussian pixel noise.
    prototype_seed: draws the prototypes; shared by the splits of one task.
  """
  proto_rng = np.random.default_rng(prototype_seed)
  coarse = proto_rng.normal(size=(num_classes, 4, 4, channels))
  # Smooth prototypes: nearest-neighbour upsampling of a 4x4 pattern.
  reps = -(-image_size // 4)
  prototypes = np.repeat(np.repeat(coarse, reps, axis=1), reps, axis=2)
  prototypes = np.tanh(prototypes[:, :image_size, :image_size])

  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, size=num_examples).astype(np.int32)
  shifts = rng.integers(-max_shift, max_shift + 1, size=(num_examples, 2))
  contrast = rng.uniform(0.6, 1.0, size=(num_examples, 1, 1, 1))
  rows = (np.arange(image_size)[None, :] - shifts[:, :1]) % image_size  # [n, s]
  cols = (np.arange(image_size)[None, :] - shifts[:, 1:]) % image_size
  images = prototypes[labels[:, None, None], rows[:, :, None], cols[:, None, :]]
  images = contrast * images + noise * rng.normal(size=images.shape)
  return np.clip(images, -1, 1).astype(np.float32), labels
