"""ResNet-18 for CIFAR-sized inputs (3x3 stem, no max-pool)."""

import flax.linen as nn
import jax

from mechconn.models import layers


class BasicBlock(nn.Module):
  """conv-BN-ReLU-conv-BN plus a shortcut (1x1 conv + BN when the shape changes), ReLU."""

  features: int
  strides: int = 1
  conv_impl: str = "auto"
  dtype: jax.typing.DTypeLike | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    y = layers.conv(self.features, 3, self.strides, impl=self.conv_impl, dtype=self.dtype,
                    name="Conv_0")(x)
    y = nn.relu(layers.batch_norm(train, self.dtype, name="BatchNorm_0")(y))
    y = layers.conv(self.features, 3, 1, impl=self.conv_impl, dtype=self.dtype,
                    name="Conv_1")(y)
    y = layers.batch_norm(train, self.dtype, name="BatchNorm_1")(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = layers.conv(self.features, 1, self.strides, impl=self.conv_impl,
                             dtype=self.dtype, name="shortcut_conv")(x)
      shortcut = layers.batch_norm(train, self.dtype, name="shortcut_bn")(shortcut)
    return nn.relu(y + shortcut)


class ResNet18(nn.Module):
  """CIFAR ResNet-18: stem 3x3 conv(64), BasicBlocks [2, 2, 2, 2] at 64/128/256/512."""

  num_classes: int = 10
  width: float = 1.0
  conv_impl: str = "auto"
  dtype: jax.typing.DTypeLike | None = None

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    layers.check_images(x)
    x = layers.conv(layers.scaled(64, self.width), 3, 1, impl=self.conv_impl,
                    dtype=self.dtype, name="stem_conv")(x)
    x = nn.relu(layers.batch_norm(train, self.dtype, name="stem_bn")(x))
    for stage, channels in enumerate((64, 128, 256, 512)):
      for block in range(2):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(layers.scaled(channels, self.width), strides, self.conv_impl,
                       self.dtype, name=f"layer{stage + 1}_{block}")(x, train)
    features = x.mean(axis=(1, 2))
    return layers.classify(features, self.num_classes, self.dtype, return_features)
