"""ResNet-18: CIFAR-sized (3x3 stem, no max-pool) or torchvision's ImageNet stem."""

import flax.linen as nn
import jax

from mechconn.models import layers


STEMS = ("cifar", "imagenet")


class BasicBlock(nn.Module):
  """conv-BN-ReLU-conv-BN plus a shortcut (1x1 conv + BN when the shape changes), ReLU."""

  features: int
  strides: int = 1
  conv_impl: str = "auto"
  dtype: jax.typing.DTypeLike | None = None
  weight_init: str = "default"

  @nn.compact
  def __call__(self, x, train: bool):
    y = layers.conv(self.features, 3, self.strides, impl=self.conv_impl, dtype=self.dtype,
                    name="Conv_0", weight_init=self.weight_init)(x)
    y = nn.relu(layers.batch_norm(train, self.dtype, name="BatchNorm_0")(y))
    y = layers.conv(self.features, 3, 1, impl=self.conv_impl, dtype=self.dtype,
                    name="Conv_1", weight_init=self.weight_init)(y)
    y = layers.batch_norm(train, self.dtype, name="BatchNorm_1")(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = layers.conv(self.features, 1, self.strides, impl=self.conv_impl,
                             dtype=self.dtype, name="shortcut_conv",
                             weight_init=self.weight_init)(x)
      shortcut = layers.batch_norm(train, self.dtype, name="shortcut_bn")(shortcut)
    return nn.relu(y + shortcut)


class ResNet18(nn.Module):
  """ResNet-18: a stem, BasicBlocks [2, 2, 2, 2] at 64/128/256/512, mean pool, head.

  Attributes:
    stem: 'cifar' (3x3 conv(64), stride 1: the paper's) or 'imagenet'
      (torchvision's: 7x7 conv(64), stride 2, then a 3x3 max-pool, stride 2).
    weight_init: 'default' or 'torch' (PyTorch's default initialisation, as the
      official code's model gets it; `layers.WEIGHT_INITS`).
  """

  num_classes: int = 10
  width: float = 1.0
  conv_impl: str = "auto"
  dtype: jax.typing.DTypeLike | None = None
  stem: str = "cifar"
  weight_init: str = "default"

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    layers.check_images(x)
    if self.stem not in STEMS:
      raise ValueError(f"Unknown stem {self.stem!r}; valid: {', '.join(map(repr, STEMS))}.")
    imagenet = self.stem == "imagenet"
    x = layers.conv(layers.scaled(64, self.width), 7 if imagenet else 3, 2 if imagenet else 1,
                    impl=self.conv_impl, dtype=self.dtype, name="stem_conv",
                    weight_init=self.weight_init)(x)
    x = nn.relu(layers.batch_norm(train, self.dtype, name="stem_bn")(x))
    if imagenet:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, channels in enumerate((64, 128, 256, 512)):
      for block in range(2):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(layers.scaled(channels, self.width), strides, self.conv_impl,
                       self.dtype, self.weight_init, name=f"layer{stage + 1}_{block}")(x, train)
    features = x.mean(axis=(1, 2))
    return layers.classify(features, self.num_classes, self.dtype, return_features,
                           self.weight_init)
