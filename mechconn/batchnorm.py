"""Exact recomputation of BatchNorm statistics for a network at a new point.

The running statistics of an interpolated network are meaningless: for every
point of a path they must be recomputed from data. `recompute_batch_stats`
runs the network in training mode over a set of batches and returns, for every
`flax.linen.BatchNorm` layer, the plain average over the batches of that
layer's per-batch mean and biased variance (what the layer normalises by in
training), in the `batch_stats` layout that `use_running_average=True` reads.
It is *not* an exponential moving average started from an endpoint's
statistics, and it does not depend on the layers' `momentum`. PyTorch's
`update_bn` (`momentum=None`) averages the same means but the *unbiased*
per-batch variances, larger by n / (n - 1) with n = batch x spatial positions
(0.4% on VGG13's 2x2 maps at batch 64); `unbiased=True` computes that, for
parity with PyTorch-computed numbers.

How: `mechconn.intercept` sees the input of every BatchNorm call in training
mode and records that batch's moments (float32), so any Linen model (and any
NNX model, through `mechconn.nnx_adapter`) works unchanged, with no
per-layer code.
"""

from collections.abc import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from mechconn import finite
from mechconn import intercept
from mechconn.types import ApplyFn, StackedBatches, Variables


def _is_batchnorm_in_training(call: intercept.LayerCall, args, kwargs) -> bool:
  """A BatchNorm layer's __call__ that normalises by its batch's moments."""
  module = call.module
  if call.method != "__call__" or intercept.kind(module) != "batchnorm":
    return False
  if isinstance(module, nn.Module):
    if module.is_initializing():
      return False
    flag = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
    return not nn.merge_param("use_running_average", module.use_running_average, flag)
  flag = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
  return not (module.use_running_average if flag is None else flag)


def _moments(module, x: jax.Array, unbiased: bool) -> dict[str, jax.Array]:
  """{'mean', 'var'} of a BatchNorm layer's input over every axis but its feature axes."""
  feature_axes = {a % x.ndim for a in ((module.axis,) if isinstance(module.axis, int)
                                       else module.axis)}
  reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
  x32 = jnp.asarray(x, jnp.float32)
  mean = jnp.mean(x32, axis=reduction_axes)
  centred = x32 - jnp.expand_dims(mean, reduction_axes)
  var = jnp.mean(jnp.square(centred), axis=reduction_axes)
  if unbiased:
    n = x32.size // mean.size  # elements per feature in this batch
    var = var * (n / max(n - 1, 1))
  return {"mean": mean, "var": var}


def batch_moments(apply_fn: ApplyFn, variables: Variables, images: jax.Array,
                  unbiased: bool = False) -> Variables:
  """Per-layer (mean, var) of one batch in training mode, laid out as batch_stats (var biased,
  or unbiased with `unbiased`). Returns an empty dict for a model without BatchNorm.
  """
  params_only = {k: v for k, v in variables.items() if k != "batch_stats"}
  recorded: dict[tuple[str, ...], dict[str, jax.Array]] = {}

  def record(call, next_fun, args, kwargs):
    if _is_batchnorm_in_training(call, args, kwargs):
      if kwargs.get("mask") is not None:
        raise NotImplementedError("recompute_batch_stats does not support masked BatchNorm.")
      x = args[0] if args else kwargs["x"]
      recorded[call.path] = _moments(call.module, x, unbiased)
    return next_fun(*args, **kwargs)

  with intercept.intercept(record):
    apply_fn(params_only, images, train=True, mutable=["batch_stats"])
  return flax.traverse_util.unflatten_dict(
      {(*path, name): value for path, m in recorded.items() for name, value in m.items()})


def has_batchnorm(apply_fn: ApplyFn, variables: Variables, images: jax.Array) -> bool:
  """Whether the model records BatchNorm moments (checked abstractly, no compute)."""
  moments = jax.eval_shape(lambda v, x: batch_moments(apply_fn, v, x), variables, images)
  return bool(jax.tree_util.tree_leaves(moments))


def recompute_batch_stats(apply_fn: ApplyFn, variables: Variables,
                          batches: StackedBatches, unbiased: bool = False, *,
                          inputs: str | Callable = "image") -> Variables:
  """Exact BatchNorm statistics of `variables['params']` over a set of batches.

  For every BatchNorm layer l:
    mean_l = (1 / N) sum_n mean(h_l(x_n)),  var_l = (1 / N) sum_n var(h_l(x_n)),
  where h_l(x_n) is the layer's input on batch n with every BatchNorm in
  training mode (normalising by its batch's moments, as during training) and
  var is the biased variance over the batch and spatial axes (`unbiased`: the
  unbiased one, as PyTorch's `update_bn`; see the module docstring).

  Args:
    apply_fn: `model.apply` of a Flax model taking `train=`.
    variables: must hold 'params'; any 'batch_stats' are ignored.
    batches: stacked batches (a dict of arrays [N, B, ...]); every batch must
      be full (no padding), since padded rows would bias the moments.
    unbiased: average the unbiased per-batch variances (PyTorch's `update_bn`).
    inputs: the key of the model's input in a batch ('image'), or
      inputs(batch) -> the model's input (an `Objective`'s `inputs`).

  Returns:
    A 'batch_stats' pytree ({} for a model without BatchNorm), float32.

  Raises:
    ValueError: integer images (unnormalised) under the 'image' key.
    finite.NonFiniteError: (when called outside jit) the statistics are not
      finite; the message names the inputs, the parameters or the first
      non-finite layer. Under jit, check the result with `finite.all_finite`
      (as `barriers.evaluate_path` does at every t).

  Example:
    >>> stats = recompute_batch_stats(model.apply, {'params': params}, bn_batches)
    >>> logits = model.apply({'params': params, 'batch_stats': stats}, x, train=False)
  """
  select = inputs if callable(inputs) else (lambda batch: batch[inputs])
  if inputs == "image" and not jnp.issubdtype(batches["image"].dtype, jnp.floating):
    raise ValueError(f"recompute_batch_stats: batches['image'] has dtype "
                     f"{batches['image'].dtype}; expected floating-point images, normalised "
                     "(convert uint8 images with x / 255 and the dataset's mean and std).")
  num_batches = jax.tree.leaves(batches)[0].shape[0]
  if num_batches == 0:
    raise ValueError("recompute_batch_stats needs at least one batch, got 0.")

  def moments(batch):
    return batch_moments(apply_fn, variables, select(batch), unbiased)

  def accumulate(total, batch):
    return jax.tree.map(jnp.add, total, moments(batch)), None

  first = jax.tree.map(lambda x: x[0], batches)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(moments, first))
  total, _ = jax.lax.scan(accumulate, zeros, batches)
  stats = jax.tree.map(lambda s: s / num_batches, total)
  if not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((stats, variables))):
    _check_finite(stats, variables, batches)  # called eagerly: name what is not finite
  return stats


def _check_finite(stats: Variables, variables: Variables, batches: StackedBatches) -> None:
  """Raises NonFiniteError naming the inputs, the parameters or the statistics' first bad leaf."""
  if bool(finite.all_finite_jit(stats)):
    return
  finite.raise_if_any({
      "the BatchNorm images": finite.all_finite_jit(batches),
      "the parameters": finite.all_finite_jit(variables.get("params", {})),
      f"the recomputed statistics (first at {finite.first_nonfinite_leaf(stats)})": False,
  }, "recompute_batch_stats")
