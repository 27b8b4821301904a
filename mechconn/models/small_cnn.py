"""A small three-layer convolutional network with BatchNorm, for CPU-sized runs."""

import flax.linen as nn
import jax

from mechconn.models import layers


class SmallCNN(nn.Module):
  """conv(w) -> conv(2w, stride 2) -> conv(4w, stride 2), each + BN + ReLU; GAP; head.

  Attributes:
    num_classes: number of logits.
    width: channels of the first layer (the next two have 2x and 4x).
    conv_impl: 'auto' | 'xla' | 'patches' (see `layers.conv_general_dilated_auto`).
  """

  num_classes: int = 10
  width: int = 32
  conv_impl: str = "auto"
  dtype: jax.typing.DTypeLike | None = None

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    layers.check_images(x)
    for i, (mult, stride) in enumerate(((1, 1), (2, 2), (4, 2))):
      x = layers.conv(self.width * mult, 3, stride, impl=self.conv_impl, dtype=self.dtype,
                      name=f"Conv_{i}")(x)
      x = nn.relu(layers.batch_norm(train, self.dtype, name=f"BatchNorm_{i}")(x))
    features = x.mean(axis=(1, 2))
    return layers.classify(features, self.num_classes, self.dtype, return_features)
