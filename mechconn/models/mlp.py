"""A multilayer perceptron on flattened inputs."""

from collections.abc import Sequence

import flax.linen as nn
import jax

from mechconn.models import layers


class MLP(nn.Module):
  """Flatten, then Dense + ReLU per hidden layer, then a linear head.

  Attributes:
    num_classes: number of logits.
    hidden: widths of the hidden layers; the last one is the penultimate feature.
  """

  num_classes: int = 10
  hidden: Sequence[int] = (512, 512)
  dtype: jax.typing.DTypeLike | None = None

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    del train  # no BatchNorm or dropout
    x = x.reshape(x.shape[0], -1)
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, dtype=self.dtype, name=f"Dense_{i}")(x))
    return layers.classify(x, self.num_classes, self.dtype, return_features)
