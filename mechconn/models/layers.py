"""Shared layers: convolution implementations chosen by measurement.

XLA:CPU convolutions are slow on tiny feature maps (a 3x3, 512 -> 512 conv on
a 2x2 map) and with very few input channels (an RGB stem), where the same
product as patches + one matmul is several times faster; on other layers XLA's
own convolution is the faster one (measured in benchmarks/conv_impl.py).
`conv_general_dilated_auto` picks per layer, from static shapes, at trace time;
it is passed to `nn.Conv` so the parameter tree is the same whichever
implementation runs.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

# On CPU, patches + matmul for output maps of at most this many pixels, or
# inputs of at most this many channels.
PATCHES_MAX_OUTPUT_PIXELS = 4
PATCHES_MAX_INPUT_CHANNELS = 4
CONV_IMPLS = ("auto", "xla", "patches")


def prefers_patches(output_height: int, output_width: int, input_channels: int) -> bool:
  """The 'auto' rule on CPU: patches + matmul for output maps of <= 4 pixels or <= 4 inputs."""
  return (output_height * output_width <= PATCHES_MAX_OUTPUT_PIXELS
          or input_channels <= PATCHES_MAX_INPUT_CHANNELS)


def _nhwc(dimension_numbers) -> bool:
  dn = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), dimension_numbers) \
      if not isinstance(dimension_numbers, lax.ConvDimensionNumbers) else dimension_numbers
  return tuple(dn.lhs_spec) == (0, 3, 1, 2) and tuple(dn.rhs_spec) == (3, 2, 0, 1) \
      and tuple(dn.out_spec) == (0, 3, 1, 2)


def conv_as_matmul(lhs, rhs, window_strides, padding):
  """A 2-D NHWC/HWIO convolution as explicit patches and one matmul.

  Patches are strided slices of the padded input (pure data movement, cheap to
  differentiate), concatenated in (kh, kw, c) order to match
  `rhs.reshape(kh * kw * c, o)`.
  """
  kh, kw, c, o = rhs.shape
  n, h, w, _ = lhs.shape
  if isinstance(padding, str):
    padding = lax.padtype_to_pads((h, w), (kh, kw), window_strides, padding)
  (pt, pb), (pl, pr) = padding
  sh, sw = window_strides
  x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  ho = (h + pt + pb - kh) // sh + 1
  wo = (w + pl + pr - kw) // sw + 1
  cols = [x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
          for i in range(kh) for j in range(kw)]
  patches = jnp.concatenate(cols, axis=-1) if len(cols) > 1 else cols[0]
  out = jnp.dot(patches.reshape(n * ho * wo, kh * kw * c), rhs.reshape(kh * kw * c, o),
                preferred_element_type=jnp.result_type(lhs, rhs))
  return out.reshape(n, ho, wo, o)


def conv_general_dilated_auto(lhs, rhs, window_strides, padding, lhs_dilation=None,
                              rhs_dilation=None, dimension_numbers=None,
                              feature_group_count=1, batch_group_count=1,
                              precision=None, preferred_element_type=None,
                              *, impl: str = "auto"):
  """Drop-in for `lax.conv_general_dilated` choosing XLA's conv or patches + matmul."""
  plain = (lhs.ndim == 4 and feature_group_count == 1 and batch_group_count == 1
           and all(d == 1 for d in (lhs_dilation or (1, 1)))
           and all(d == 1 for d in (rhs_dilation or (1, 1)))
           and dimension_numbers is not None and _nhwc(dimension_numbers))
  use_patches = False
  if plain and impl == "patches":
    use_patches = True
  elif plain and impl == "auto" and jax.default_backend() == "cpu":
    out_shape = jax.eval_shape(
        lambda a, b: lax.conv_general_dilated(a, b, window_strides, padding,
                                              dimension_numbers=dimension_numbers),
        lhs, rhs).shape
    use_patches = prefers_patches(out_shape[1], out_shape[2], lhs.shape[3])
  if use_patches:
    return conv_as_matmul(lhs, rhs, tuple(window_strides), padding)
  if plain and impl == "auto" and jax.default_backend() == "cpu":
    return _xla_conv_patches_grad(lhs, rhs, tuple(window_strides),
                                  tuple(map(tuple, padding)) if not isinstance(padding, str)
                                  else padding)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _xla_conv_patches_grad(lhs, rhs, window_strides, padding):
  """XLA's convolution, differentiated as patches + matmul (for 'auto' on CPU).

  The primal (inference, path evaluation) runs XLA's conv, the faster one on
  maps larger than 2x2. The tangent is written as patches + matmul, so its
  transpose, the backward pass, is two matmuls and a patch scatter instead of
  XLA:CPU's convolution gradients, the slow part of a training step (faster
  this way: benchmarks/conv_impl.py). A custom JVP (not VJP) keeps forward-mode AD (jvp, Hessians) working.
  """
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


@_xla_conv_patches_grad.defjvp
def _xla_conv_patches_grad_jvp(window_strides, padding, primals, tangents):
  lhs, rhs = primals
  d_lhs, d_rhs = tangents
  out = _xla_conv_patches_grad(lhs, rhs, window_strides, padding)
  d_out = (conv_as_matmul(d_lhs, rhs, window_strides, padding)
           + conv_as_matmul(lhs, d_rhs, window_strides, padding))
  return out, d_out


# Weight initialisations of the paper models (`weight_init`): 'default' (kaiming-normal
# conv kernels, LeCun-normal head, zero biases) or 'torch' (PyTorch's defaults, as the
# official code's models get them: conv and linear weights kaiming-uniform with
# a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), biases U(-1/sqrt(fan_in),
# 1/sqrt(fan_in)); fan_in = in_channels x kernel area; BatchNorm scale 1, bias 0 either way).
WEIGHT_INITS = ("default", "torch")
TORCH_KERNEL_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def check_weight_init(weight_init: str) -> None:
  if weight_init not in WEIGHT_INITS:
    raise ValueError(f"Unknown weight_init {weight_init!r}; valid: {WEIGHT_INITS}.")


def torch_bias_init(fan_in: int):
  """PyTorch's default bias initialiser for a layer with `fan_in` inputs."""
  bound = 1 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                   bound)


def conv(features: int, kernel_size: int = 3, strides: int = 1, *, impl: str = "auto",
         use_bias: bool = False, dtype=None, name: str | None = None,
         weight_init: str = "default") -> nn.Conv:
  """A 'SAME'-padded (symmetric, as PyTorch's padding = k // 2) `nn.Conv`."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"Unknown conv impl {impl!r}; valid: {CONV_IMPLS}.")
  check_weight_init(weight_init)
  if use_bias and weight_init == "torch":
    raise NotImplementedError("weight_init='torch' for a conv with bias (none in the paper "
                              "models): its bias initialiser needs the input channels.")
  pad = kernel_size // 2
  return nn.Conv(features, (kernel_size, kernel_size), strides=(strides, strides),
                 padding=((pad, pad), (pad, pad)), use_bias=use_bias, dtype=dtype,
                 kernel_init=(TORCH_KERNEL_INIT if weight_init == "torch"
                              else nn.initializers.kaiming_normal()),
                 conv_general_dilated=functools.partial(conv_general_dilated_auto, impl=impl),
                 name=name)


def batch_norm(train: bool, dtype=None, name: str | None = None) -> nn.BatchNorm:
  """BatchNorm with PyTorch's defaults (momentum 0.1 there = 0.9 here, eps 1e-5)."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      dtype=dtype, name=name)


def scaled(channels: int, width: float) -> int:
  """Channel count times a width multiplier, at least 1."""
  return max(1, int(round(channels * width)))


def check_images(x: jax.Array, expected_ndim: int = 4) -> None:
  if x.ndim != expected_ndim:
    raise ValueError(f"Expected images of rank {expected_ndim} (NHWC), got shape {x.shape}.")




def classify(features, num_classes: int, dtype=None, return_features: bool = False,
             weight_init: str = "default"):
  """The linear head shared by every model: logits, or (logits, features)."""
  check_weight_init(weight_init)
  inits = ({"kernel_init": TORCH_KERNEL_INIT, "bias_init": torch_bias_init(features.shape[-1])}
           if weight_init == "torch" else {})
  logits = nn.Dense(num_classes, dtype=dtype, name="head", **inits)(features)
  return (logits, features) if return_features else logits
