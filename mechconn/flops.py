"""FLOPs of a model from its layer shapes, not from a compiler's cost model.

XLA's cost analysis does not count convolutions that it hands to cuDNN, so on
GPU it reports a small fraction of the work done. Here every `nn.Conv` and
`nn.Dense` call of a forward pass is seen by a method interceptor (under
`jax.eval_shape`: nothing is computed) and counted from its shapes:

  conv:  2 x (output elements) x (kernel height x width) x (input features / groups)
  dense: 2 x (output elements) x (input features)

(a multiply and an add per multiply-accumulate). Normalisation, activations,
pooling and additions are left out: they are memory-bound and a few percent of
the FLOPs. The count does not depend on how a convolution is computed
(`models.layers` conv_impl), so it is the same on every backend.

  >>> forward_flops(model.apply, variables, (1, 32, 32, 3))  # per image

`matmul_peak_flops` measures what the device's matmuls reach, the yardstick for
those counts (a fraction of peak) and for a job's wall time on another machine.
"""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mechconn.types import ApplyFn, Variables


def _layer_flops(module: nn.Module, inputs: jax.Array, outputs: jax.Array) -> int:
  if isinstance(module, nn.Conv):
    kernel_size = int(np.prod(module.kernel_size))
    in_features = inputs.shape[-1] // module.feature_group_count
    return 2 * int(np.prod(outputs.shape)) * kernel_size * in_features
  return 2 * int(np.prod(outputs.shape)) * inputs.shape[-1]  # nn.Dense


def layer_flops(apply_fn: ApplyFn, variables: Variables, input_shape: tuple[int, ...],
                dtype=jax.numpy.float32) -> dict[str, int]:
  """{layer path: FLOPs of its call} for one inference forward pass on `input_shape`.

  Layers are the `nn.Conv` and `nn.Dense` modules (paths '/'-joined, e.g.
  'layer2_0/shortcut_conv'); a module called twice is counted twice under one
  path.
  """
  counts: dict[str, int] = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == "__call__" and isinstance(module, (nn.Conv, nn.Dense)):
      name = "/".join(module.scope.path)
      x = args[0] if args else kwargs["inputs"]
      counts[name] = counts.get(name, 0) + _layer_flops(module, x, out)
    return out

  def forward(v, x):
    with nn.intercept_methods(record):
      return apply_fn(v, x, train=False)

  jax.eval_shape(forward, variables, jax.ShapeDtypeStruct(input_shape, dtype))
  return counts


def forward_flops(apply_fn: ApplyFn, variables: Variables, input_shape: tuple[int, ...],
                  dtype=jax.numpy.float32) -> int:
  """FLOPs of one inference forward pass on a batch of `input_shape` (see `layer_flops`)."""
  return sum(layer_flops(apply_fn, variables, input_shape, dtype).values())


# A training step's work in forward passes: the forward, then the backward's two
# products per layer (gradients with respect to the layer's input and its weights),
# each as many FLOPs as the forward's.
TRAIN_STEP_FORWARDS = 3


# Matmul sizes that saturate a device: 2048 is enough for a CPU; a GPU's peak needs
# more (an H200's float32 figure swung from 25 to 98 TFLOP/s at 2048 between two calls).
PEAK_N = {"cpu": 2048}
DEFAULT_PEAK_N = 8192


def matmul_peak_flops(n: int | None = None, repeats: int = 7, dtype=jnp.float32) -> float:
  """FLOP/s of an n x n matmul in `dtype` (default n: `PEAK_N` for the backend): the median
  over `repeats` calls after a warm-up (compiling) call."""
  n = n or PEAK_N.get(jax.default_backend(), DEFAULT_PEAK_N)
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  matmul = jax.jit(lambda a: a @ a)
  jax.block_until_ready(matmul(a))
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a))
    seconds.append(time.perf_counter() - start)
  return 2 * n**3 / float(np.median(seconds))
