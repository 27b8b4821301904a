"""The diagnostics take an NNX model through `adapters.from_nnx`: the same numbers as its
Linen twin (the NNX twin is loaded with the Linen network's weights)."""

import flax.linen as nn
from flax import nnx
import jax
import numpy as np
import pytest

from mechconn import adapters
from mechconn.data.batching import stack_batches
from mechconn.diagnostics import calibration, curvature, features, layerwise

TS = np.linspace(0, 1, 3)


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(6, name="hidden")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="norm")(x))
    return nn.Dense(3, name="out")(x)


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(4, 6, rngs=rngs)
    self.norm = nnx.BatchNorm(6, rngs=rngs)
    self.out = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.norm(self.hidden(x))))


@pytest.fixture(scope="module")
def twins():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(48, 4)).astype(np.float32)
  y = rng.integers(0, 3, 48).astype(np.int32)
  linen = LinenNet()
  ends = [linen.init(jax.random.key(s), x[:2]) for s in (0, 1)]
  nnx_ends = [adapters.from_nnx(adapters.update_nnx(NNXNet(nnx.Rngs(0)), v)) for v in ends]
  sets = {"eval": stack_batches(x[:32], y[:32], 16), "held": stack_batches(x[32:], y[32:], 16)}
  bn = {"image": stack_batches(x, y, 16)["image"]}
  return (linen.apply, [v["params"] for v in ends]), (
      nnx_ends[0][0], [v["params"] for _, v in nnx_ends]), sets, bn


def _both(twins, fn):
  (linen_apply, linen_points), (nnx_apply, nnx_points), sets, bn = twins
  return fn(linen_apply, linen_points, sets, bn), fn(nnx_apply, nnx_points, sets, bn)


def test_layerwise(twins):
  a, b = _both(twins, lambda f, p, s, bn: layerwise.layerwise_barriers(
      f, p, TS, {"eval": s["eval"]}, bn))
  assert a.groups == b.groups == ("hidden", "norm", "out")
  np.testing.assert_allclose(a.metrics["eval"]["loss"], b.metrics["eval"]["loss"], rtol=1e-5)


def test_features_curvature_calibration(twins):
  fa, fb = _both(twins, lambda f, p, s, bn: features.feature_connectivity(
      f, p, TS, {"eval": s["eval"]}, bn))
  assert fa.sites == fb.sites and "norm" in fa.sites
  for site in fa.sites:
    np.testing.assert_allclose(fa.cosine["eval"][site], fb.cosine["eval"][site], rtol=1e-5)
  ca, cb = _both(twins, lambda f, p, s, bn: curvature.path_curvature(
      f, p, TS, s["eval"], bn, num_matvecs=8, num_probes=2))
  np.testing.assert_allclose(ca.top_eigenvalues, cb.top_eigenvalues, rtol=1e-4)
  ka, kb = _both(twins, lambda f, p, s, bn: calibration.calibrated_path(
      f, p, TS, {"eval": s["eval"]}, s["held"], bn))
  np.testing.assert_allclose(ka.temperature, kb.temperature, rtol=1e-4)
