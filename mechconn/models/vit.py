"""A small Vision Transformer (Dosovitskiy et al. 2021) for CPU-sized runs.

Patches (a strided conv) -> [class token] + learned position embeddings ->
pre-LayerNorm blocks (multi-head self-attention, then a GELU MLP, each added to
the residual stream) -> LayerNorm -> the class token or the mean of the tokens
-> the head. No BatchNorm (path evaluation renormalises it with REPAIR or not
at all) and no dropout (`train` changes nothing).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mechconn.models import layers


class Block(nn.Module):
  """x + attention(LN(x)), then x + MLP(LN(x))."""

  num_heads: int
  mlp_ratio: int
  dtype: jax.typing.DTypeLike | None = None

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    y = nn.LayerNorm(dtype=self.dtype, name="LayerNorm_0")(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype,
                                        name="attention")(y, y)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype, name="LayerNorm_1")(x)
    y = nn.gelu(nn.Dense(width * self.mlp_ratio, dtype=self.dtype, name="mlp_in")(y))
    return x + nn.Dense(width, dtype=self.dtype, name="mlp_out")(y)


class ViT(nn.Module):
  """A ViT over `patch_size` patches.

  Attributes:
    num_classes: number of logits.
    width: the residual stream's dimension (divisible by num_heads).
    depth: number of blocks.
    num_heads: attention heads per block.
    patch_size: side of a square patch (divides the image side).
    mlp_ratio: hidden units of each MLP, per stream dimension.
    pool: 'cls' (a learned class token) or 'mean' (the mean of the tokens).
  """

  num_classes: int = 10
  width: int = 64
  depth: int = 4
  num_heads: int = 4
  patch_size: int = 4
  mlp_ratio: int = 2
  pool: str = "cls"
  dtype: jax.typing.DTypeLike | None = None

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    del train  # no dropout, no BatchNorm
    layers.check_images(x)
    if self.pool not in ("cls", "mean"):
      raise ValueError(f"Unknown pool {self.pool!r}; valid: 'cls', 'mean'.")
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}.")
    if x.shape[1] % self.patch_size or x.shape[2] % self.patch_size:
      raise ValueError(f"Images of {x.shape[1]}x{x.shape[2]} do not split into "
                       f"{self.patch_size}x{self.patch_size} patches.")
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                name="patches")(x)
    x = x.reshape(x.shape[0], -1, self.width)
    if self.pool == "cls":
      token = self.param("cls_token", nn.initializers.zeros, (1, 1, self.width))
      x = jnp.concatenate([jnp.broadcast_to(token, (x.shape[0], 1, self.width)).astype(x.dtype),
                           x], axis=1)
    position = self.param("position", nn.initializers.normal(0.02), (1,) + x.shape[1:])
    x = x + position.astype(x.dtype)
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_ratio, self.dtype, name=f"Block_{i}")(x)
    x = nn.LayerNorm(dtype=self.dtype, name="LayerNorm")(x)
    features = x[:, 0] if self.pool == "cls" else x.mean(axis=1)
    return layers.classify(features, self.num_classes, self.dtype, return_features)
