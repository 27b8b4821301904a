"""A CIFAR ResNet-20-style network of any width and depth, with BatchNorm or LayerNorm.

He et al.'s CIFAR ResNet (3x3 stem, three stages of BasicBlocks at 16/32/64
channels, global mean pool, linear head), the family of the REPAIR paper's
width study (Jordan et al., ICLR 2023), whose widths are multiples of 16/32/64.
`blocks_per_stage=3` is ResNet-20 (6n + 2 layers with n = 3); 1 is ResNet-8.

The norm modules are named by role, the same for either norm: 'stem_norm',
and in each block 'Norm_0', 'Norm_1' and 'shortcut_norm', so the two variants
have the same parameter tree but for the BatchNorm statistics.
"""

import flax.linen as nn
import jax

from mechconn.models import layers

NORMS = ("batch", "layer", "layer_channels")
STAGE_CHANNELS = (16, 32, 64)


def norm_layer(norm: str, train: bool, dtype=None, name: str | None = None) -> nn.Module:
  """A norm module by kind (see `ResNet20.norm`); scale and bias per channel for each."""
  if norm == "batch":
    return layers.batch_norm(train, dtype, name=name)
  if norm == "layer":
    return nn.LayerNorm(epsilon=1e-5, reduction_axes=(-3, -2, -1), feature_axes=-1,
                        dtype=dtype, name=name)
  if norm == "layer_channels":
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, name=name)
  raise ValueError(f"Unknown norm {norm!r}; valid: {', '.join(map(repr, NORMS))}.")


class BasicBlock20(nn.Module):
  """conv-norm-ReLU-conv-norm plus a shortcut (1x1 conv + norm when the shape changes), ReLU."""

  features: int
  strides: int = 1
  norm: str = "batch"
  conv_impl: str = "auto"
  dtype: jax.typing.DTypeLike | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    y = layers.conv(self.features, 3, self.strides, impl=self.conv_impl, dtype=self.dtype,
                    name="Conv_0")(x)
    y = nn.relu(norm_layer(self.norm, train, self.dtype, name="Norm_0")(y))
    y = layers.conv(self.features, 3, 1, impl=self.conv_impl, dtype=self.dtype,
                    name="Conv_1")(y)
    y = norm_layer(self.norm, train, self.dtype, name="Norm_1")(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = layers.conv(self.features, 1, self.strides, impl=self.conv_impl,
                             dtype=self.dtype, name="shortcut_conv")(x)
      shortcut = norm_layer(self.norm, train, self.dtype, name="shortcut_norm")(shortcut)
    return nn.relu(y + shortcut)


class ResNet20(nn.Module):
  """CIFAR ResNet: 3x3 stem, 3 stages of BasicBlocks at (16, 32, 64) x width, mean pool, head.

  Stages 2 and 3 start with a stride-2 block whose shortcut is a 1x1 conv + norm.

  Attributes:
    num_classes: number of logits.
    width: multiplier of the base widths 16/32/64 (`layers.scaled`); 1 is ResNet-20's.
    blocks_per_stage: BasicBlocks per stage (3: ResNet-20; 1: ResNet-8; 2: ResNet-14).
    norm: 'batch' (BatchNorm), 'layer' (LayerNorm of each example's whole feature
      map, [H, W, C], as PyTorch's GroupNorm(1, C)) or 'layer_channels' (LayerNorm
      over the channels at each position, as a transformer's). Each has a scale and
      a bias per channel, and each commutes with a permutation of the channels.
    base_channels: the first stage's channels at width 1 (the next two have 2x, 4x);
      16 is ResNet-20's.
    conv_impl: 'auto' | 'xla' | 'patches' (see `layers.conv_general_dilated_auto`).
  """

  num_classes: int = 10
  width: float = 1.0
  blocks_per_stage: int = 3
  norm: str = "batch"
  base_channels: int = STAGE_CHANNELS[0]
  conv_impl: str = "auto"
  dtype: jax.typing.DTypeLike | None = None

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    layers.check_images(x)
    if self.norm not in NORMS:
      raise ValueError(f"Unknown norm {self.norm!r}; valid: {', '.join(map(repr, NORMS))}.")
    if not self.width > 0 or self.blocks_per_stage < 1 or self.base_channels < 1:
      raise ValueError(f"ResNet20 needs width > 0, blocks_per_stage >= 1 and base_channels >= 1;"
                       f" got {self.width}, {self.blocks_per_stage}, {self.base_channels}.")
    stage_channels = [layers.scaled(self.base_channels * m, self.width) for m in (1, 2, 4)]
    x = layers.conv(stage_channels[0], 3, 1, impl=self.conv_impl, dtype=self.dtype,
                    name="stem_conv")(x)
    x = nn.relu(norm_layer(self.norm, train, self.dtype, name="stem_norm")(x))
    for stage, channels in enumerate(stage_channels):
      for block in range(self.blocks_per_stage):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock20(channels, strides, self.norm, self.conv_impl, self.dtype,
                         name=f"layer{stage + 1}_{block}")(x, train)
    features = x.mean(axis=(1, 2))
    return layers.classify(features, self.num_classes, self.dtype, return_features)
