"""Synthetic data with two predictive attributes of different complexity (the paper's Section 2).

Each example is a vector [a_linear, a_complex, noise_1..noise_d] with a binary label:
  - the linear attribute a_linear = (2y - 1) u, u ~ U(0.1, 1): the label is its sign,
    a linear function of the input (one ReLU suffices);
  - the complex attribute a_complex lies in one of `bands` equal bands of [-1, 1]
    (away from the band edges), and the label is the band's index mod 2: a
    piecewise-constant function with bands - 1 switches, which a one-hidden-layer
    ReLU network needs several units to express (higher spline complexity);
  - noise: d standard normal dimensions times `noise_scale`, independent of y.
`predictive` names the attributes that carry the label; the others are drawn from
the same distribution with an independent random label, so they carry nothing.
Training on 'linear' data makes a network that relies on the linear attribute, on
'complex' data one that relies on the complex attribute; on data where both are
predictive both networks are minimisers, with different mechanisms.
"""

import numpy as np

ATTRIBUTES = ("linear", "complex")


def make(num_examples: int, predictive: tuple[str, ...], *, seed: int, bands: int = 4,
         noise_dims: int = 8, noise_scale: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
  """(float32 inputs [n, 2 + noise_dims], int32 labels [n]) with `predictive` attributes."""
  unknown = sorted(set(predictive) - set(ATTRIBUTES))
  if unknown or not predictive:
    raise ValueError(f"predictive={predictive!r} must name attributes of {ATTRIBUTES}.")
  if bands < 2 or bands % 2:
    raise ValueError(f"bands={bands} must be an even number >= 2 (both labels need bands).")
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, num_examples)

  def carried(name):  # the label the attribute encodes: the true one, or an independent draw
    return labels if name in predictive else rng.integers(0, 2, num_examples)

  linear = (2 * carried("linear") - 1) * rng.uniform(0.1, 1.0, num_examples)
  band = 2 * rng.integers(0, bands // 2, num_examples) + carried("complex")  # parity = label
  complex_ = -1 + (band + rng.uniform(0.1, 0.9, num_examples)) * (2 / bands)
  noise = noise_scale * rng.normal(size=(num_examples, noise_dims))
  inputs = np.concatenate([linear[:, None], complex_[:, None], noise], axis=1)
  return inputs.astype(np.float32), labels.astype(np.int32)


def complex_label(values: np.ndarray, bands: int = 4) -> np.ndarray:
  """The label the complex attribute encodes: the index of its band of [-1, 1], mod 2."""
  return (np.floor((np.asarray(values) + 1) * bands / 2).astype(int) % 2).astype(np.int32)
