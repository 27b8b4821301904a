"""recompute_batch_stats against a numpy forward pass written out by hand."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mechconn import batchnorm

EPS = 1e-5


class TwoBN(nn.Module):
  """Dense -> BN -> ReLU -> Dense -> BN on [N, H, W, C] inputs (BN reduces N, H, W)."""

  momentum: float = 0.9

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(5, name="d0")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=self.momentum,
                             epsilon=EPS, name="bn0")(x))
    x = nn.Dense(3, use_bias=False, name="d1")(x)
    return nn.BatchNorm(use_running_average=not train, momentum=self.momentum, epsilon=EPS,
                        name="bn1")(x)


def numpy_stats(params, images_N, ddof=0):
  """Exact mean over batches of per-batch (mean, var), in float64: var biased (ddof 0) or
  unbiased (ddof 1, PyTorch's update_bn); each batch normalised by its biased variance."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  m0 = v0 = m1 = v1 = 0.0
  for x in np.asarray(images_N, np.float64):
    h0 = x @ p["d0"]["kernel"] + p["d0"]["bias"]
    mean0, var0 = h0.mean(axis=(0, 1, 2)), h0.var(axis=(0, 1, 2))
    a0 = np.maximum((h0 - mean0) / np.sqrt(var0 + EPS) * p["bn0"]["scale"] + p["bn0"]["bias"], 0)
    var0 = h0.var(axis=(0, 1, 2), ddof=ddof)
    h1 = a0 @ p["d1"]["kernel"]
    mean1, var1 = h1.mean(axis=(0, 1, 2)), h1.var(axis=(0, 1, 2), ddof=ddof)
    m0, v0, m1, v1 = m0 + mean0, v0 + var0, m1 + mean1, v1 + var1
  n = len(images_N)
  return {"bn0": {"mean": m0 / n, "var": v0 / n}, "bn1": {"mean": m1 / n, "var": v1 / n}}


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  # Batches with different means, so a running average would differ from the exact one.
  images_N = (rng.normal(size=(4, 6, 3, 3, 2)) + np.arange(4)[:, None, None, None, None]
              ).astype(np.float32)
  model = TwoBN()
  variables = model.init(jax.random.key(0), jnp.asarray(images_N[0]))
  params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(1), a.shape),
                        variables["params"])
  return model, params, images_N


def test_matches_numpy(setup):
  model, params, images_N = setup
  stats = jax.jit(lambda p, x: batchnorm.recompute_batch_stats(
      model.apply, {"params": p}, {"image": x}))(params, images_N)
  expected = numpy_stats(params, images_N)
  chex.assert_trees_all_close(stats, jax.tree.map(np.float32, expected), rtol=1e-4, atol=1e-5)


def test_unbiased_matches_numpy(setup):
  """unbiased=True: the same means, each batch's variance with ddof 1 (6 x 3 x 3 = 54
  elements per feature, so 54/53 larger than the biased one)."""
  model, params, images_N = setup
  stats = batchnorm.recompute_batch_stats(model.apply, {"params": params}, {"image": images_N},
                                          unbiased=True)
  expected = numpy_stats(params, images_N, ddof=1)
  chex.assert_trees_all_close(stats, jax.tree.map(np.float32, expected), rtol=1e-4, atol=1e-5)
  biased = batchnorm.recompute_batch_stats(model.apply, {"params": params}, {"image": images_N})
  np.testing.assert_allclose(stats["bn1"]["var"], biased["bn1"]["var"] * 54 / 53, rtol=1e-6)
  np.testing.assert_array_equal(stats["bn1"]["mean"], biased["bn1"]["mean"])


def test_unbiased_equals_pytorch_update_bn():
  """A BatchNorm2d with momentum=None in training mode over the same batches keeps the
  cumulative average of the unbiased batch variances (what torch's update_bn computes)."""
  torch = pytest.importorskip("torch")
  images_N = np.random.default_rng(3).normal(size=(5, 4, 3, 3, 6)).astype(np.float32)
  images_N += np.arange(5, dtype=np.float32)[:, None, None, None, None]
  model = nn.BatchNorm(epsilon=EPS)
  apply_fn = lambda v, x, train=True, **kw: model.apply(v, x, use_running_average=not train, **kw)
  variables = model.init(jax.random.key(0), jnp.asarray(images_N[0]), use_running_average=True)
  stats = batchnorm.recompute_batch_stats(apply_fn, {"params": variables["params"]},
                                          {"image": images_N}, unbiased=True)
  bn = torch.nn.BatchNorm2d(6, eps=EPS, momentum=None).train()
  with torch.no_grad():
    for x in images_N:
      bn(torch.from_numpy(x).permute(0, 3, 1, 2))
  np.testing.assert_allclose(stats["mean"], bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["var"], bn.running_var.numpy(), rtol=1e-5)


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.99])
def test_independent_of_momentum(setup, momentum):
  model, params, images_N = setup
  stats = batchnorm.recompute_batch_stats(TwoBN(momentum=momentum).apply, {"params": params},
                                          {"image": images_N})
  chex.assert_trees_all_close(stats, jax.tree.map(np.float32, numpy_stats(params, images_N)),
                              rtol=1e-4, atol=1e-5)


def test_ignores_existing_batch_stats(setup):
  model, params, images_N = setup
  stale = {"bn0": {"mean": jnp.full(5, 100.0), "var": jnp.full(5, 100.0)},
           "bn1": {"mean": jnp.full(3, -9.0), "var": jnp.full(3, 9.0)}}
  a = batchnorm.recompute_batch_stats(model.apply, {"params": params, "batch_stats": stale},
                                      {"image": images_N})
  b = batchnorm.recompute_batch_stats(model.apply, {"params": params}, {"image": images_N})
  chex.assert_trees_all_equal(a, b)


def test_stats_make_eval_mode_match_train_mode_on_one_batch(setup):
  model, params, images_N = setup
  x = images_N[:1]
  stats = batchnorm.recompute_batch_stats(model.apply, {"params": params}, {"image": x})
  eval_out = model.apply({"params": params, "batch_stats": stats}, x[0], train=False)
  train_out, _ = model.apply({"params": params}, x[0], train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(eval_out, train_out, rtol=1e-4, atol=1e-4)


def test_model_without_batchnorm_gives_empty_stats():
  model = nn.Dense(3)
  variables = model.init(jax.random.key(0), jnp.zeros((2, 4)))
  apply = lambda v, x, train, mutable=False: model.apply(v, x, mutable=mutable)
  assert batchnorm.recompute_batch_stats(apply, variables, {"image": jnp.ones((2, 2, 4))}) == {}
  assert not batchnorm.has_batchnorm(apply, variables, jnp.ones((2, 4)))
