"""A small causal transformer language model for CPU-sized runs.

Tokens -> embedding + learned position embeddings -> pre-LayerNorm blocks
(causal multi-head self-attention, then a GELU MLP, each added to the residual
stream) -> LayerNorm -> a Dense head to next-token logits. No dropout and no
BatchNorm, so `__call__` takes no `train` argument: apply it as
`model.apply(variables, tokens)`.

The embedding is a bias-free Dense layer on one-hot tokens rather than
`nn.Embed`: the same function and the same [vocab, width] table, but written as a
matrix product, which `mechconn.symmetry.derive_spec` follows (a gather has no
rule there and would fix the residual stream, leaving no permutation group).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


class Block(nn.Module):
  """x + causal attention(LN(x)), then x + MLP(LN(x))."""

  num_heads: int
  mlp_ratio: int
  dtype: jax.typing.DTypeLike | None = None

  @nn.compact
  def __call__(self, x, mask):
    width = x.shape[-1]
    y = nn.LayerNorm(dtype=self.dtype, name="LayerNorm_0")(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype,
                                        name="attention")(y, y, mask=mask)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype, name="LayerNorm_1")(x)
    y = nn.gelu(nn.Dense(width * self.mlp_ratio, dtype=self.dtype, name="mlp_in")(y))
    return x + nn.Dense(width, dtype=self.dtype, name="mlp_out")(y)


class CausalLM(nn.Module):
  """A decoder-only transformer: tokens [B, L] -> next-token logits [B, L, vocab_size].

  The logits at position j depend only on tokens[:, :j + 1].

  Attributes:
    vocab_size: number of token ids (tokens lie in [0, vocab_size)).
    max_len: longest sequence (the number of learned positions).
    width: the residual stream's dimension (divisible by num_heads).
    depth: number of blocks.
    num_heads: attention heads per block.
    mlp_ratio: hidden units of each MLP, per stream dimension.
  """

  vocab_size: int
  max_len: int
  width: int = 32
  depth: int = 2
  num_heads: int = 2
  mlp_ratio: int = 2
  dtype: jax.typing.DTypeLike | None = None

  @nn.compact
  def __call__(self, tokens):
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"CausalLM takes integer tokens [batch, length], got {tokens.dtype} "
                       f"{tokens.shape}.")
    if tokens.shape[1] > self.max_len:
      raise ValueError(f"Sequences of length {tokens.shape[1]} exceed max_len {self.max_len}.")
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}.")
    one_hot = jax.nn.one_hot(tokens, self.vocab_size, dtype=self.dtype or jnp.float32)
    x = nn.Dense(self.width, use_bias=False, dtype=self.dtype, name="embed")(one_hot)
    position = self.param("position", nn.initializers.normal(0.02), (self.max_len, self.width))
    x = x + position[None, :tokens.shape[1]].astype(x.dtype)
    mask = nn.make_causal_mask(tokens)
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_ratio, self.dtype, name=f"Block_{i}")(x, mask)
    x = nn.LayerNorm(dtype=self.dtype, name="LayerNorm")(x)
    return nn.Dense(self.vocab_size, dtype=self.dtype, name="head")(x)
