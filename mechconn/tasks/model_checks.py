"""Settings checked against the network they apply to, before any work (shapes only: the
model is traced abstractly, nothing is computed)."""

import flax.linen as nn
import jax
import jax.extend.core as jax_core
import jax.numpy as jnp

from mechconn import batchnorm
from mechconn.tasks import specs


def check_bn_variance(path: specs.PathSpec, model: nn.Module, input_shape: tuple[int, ...]) -> None:
  """Refuses path.bn_variance='unbiased' for a model without BatchNorm, before any work
  (the model is traced abstractly)."""
  if path.renormalize != specs.BN_VARIANCES["unbiased"]:
    return
  x = jnp.zeros((1, *input_shape), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  if not batchnorm.has_batchnorm(model.apply, variables, x):
    raise ValueError(f"config.path.bn_variance='unbiased' but {type(model).__name__} has no "
                     "BatchNorm layer (nothing to recompute); use 'biased'.")


def _calls_relu(jaxpr) -> bool:
  """Whether a traced program calls `jax.nn.relu` (flax's `nn.relu`). A bare max(x, 0)
  is not counted: LayerNorm clamps its variance that way."""
  for eqn in jaxpr.eqns:
    if eqn.params.get("name") == "relu":
      return True
    values = [x for v in eqn.params.values() for x in (v if isinstance(v, tuple) else (v,))]
    if any(_calls_relu(getattr(v, "jaxpr", v)) for v in values
           if isinstance(v, (jax_core.Jaxpr, jax_core.ClosedJaxpr))):
      return True
  return False


def check_activation_sites(sites: str, model: nn.Module, input_shape: tuple[int, ...]) -> None:
  """Refuses activation_sites='post_relu' for a network that applies no ReLU (a GELU
  ViT, say): matching would correlate ReLUs the network never computes (shapes only)."""
  if sites != "post_relu":
    return
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  program = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
  if not _calls_relu(program.jaxpr):
    raise ValueError(f"config.activation_sites='post_relu' applies a ReLU to every site, but "
                     f"{type(model).__name__} calls no jax.nn.relu (its nonlinearity is another, "
                     "e.g. GELU); use activation_sites='module_outputs'.")
