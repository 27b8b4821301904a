"""VGG-13 exactly as the paper's code defines it (CIFAR-sized inputs).

Ten 3x3 convolutions without bias, each followed by BatchNorm and ReLU, with
channels 64, 64s2, 128, 128s2, 256, 256s2, 512, 512s2, 512, 512 ('s2' =
stride 2 instead of pooling); global average pooling; one linear head.
"""

import flax.linen as nn
import jax

from mechconn.models import layers

# (channels, stride) of the ten conv layers.
VGG13_CFG = ((64, 1), (64, 2), (128, 1), (128, 2), (256, 1), (256, 2),
             (512, 1), (512, 2), (512, 1), (512, 1))


class VGG13(nn.Module):
  """The paper's VGG-13; `width` scales every channel count (1.0 = paper).

  `weight_init`: 'default' or 'torch' (PyTorch's default initialisation, as the
  official code's model gets it; `layers.WEIGHT_INITS`).
  """

  num_classes: int = 10
  width: float = 1.0
  conv_impl: str = "auto"
  dtype: jax.typing.DTypeLike | None = None
  weight_init: str = "default"

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    layers.check_images(x)
    for i, (channels, stride) in enumerate(VGG13_CFG):
      x = layers.conv(layers.scaled(channels, self.width), 3, stride, impl=self.conv_impl,
                      dtype=self.dtype, name=f"Conv_{i}", weight_init=self.weight_init)(x)
      x = nn.relu(layers.batch_norm(train, self.dtype, name=f"BatchNorm_{i}")(x))
    features = x.mean(axis=(1, 2))
    return layers.classify(features, self.num_classes, self.dtype, return_features,
                           self.weight_init)
