"""NNX models through the adapter: the same curves, specs and alignments as their Linen twins."""

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mechconn import adapters, align, barriers, batchnorm, matching, nnx_adapter, symmetry
from mechconn.data.batching import stack_batches

TS = np.linspace(0, 1, 5)


class NNXCNN(nnx.Module):
  """conv-BN-relu twice, a hidden list of dense layers, a head (NNX)."""

  def __init__(self, rngs: nnx.Rngs, batchnorm_layers: bool = True):
    self.conv0 = nnx.Conv(3, 6, (3, 3), rngs=rngs)
    self.bn0 = nnx.BatchNorm(6, rngs=rngs) if batchnorm_layers else None
    self.conv1 = nnx.Conv(6, 8, (3, 3), strides=2, rngs=rngs)
    self.bn1 = nnx.BatchNorm(8, rngs=rngs) if batchnorm_layers else None
    self.hidden = nnx.List([nnx.Linear(8, 8, rngs=rngs)])
    self.head = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    x = self.conv0(x)
    x = nnx.relu(self.bn0(x) if self.bn0 is not None else x)
    x = self.conv1(x)
    x = nnx.relu(self.bn1(x) if self.bn1 is not None else x)
    x = x.mean(axis=(1, 2))
    x = nnx.relu(self.hidden[0](x))
    return self.head(x)


class LinenCNN(nn.Module):
  """The Linen twin of NNXCNN: the same layers under the same names."""

  batchnorm_layers: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    def norm(name):
      if not self.batchnorm_layers:
        return lambda h: h
      return nn.BatchNorm(use_running_average=not train, name=name)
    x = nn.relu(norm("bn0")(nn.Conv(6, (3, 3), name="conv0")(x)))
    x = nn.relu(norm("bn1")(nn.Conv(8, (3, 3), strides=2, name="conv1")(x)))
    x = x.mean(axis=(1, 2))
    x = nn.relu(Hidden(name="hidden")(x))
    return nn.Dense(4, name="head")(x)


class Hidden(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(8, name="0")(x)


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(48, 8, 8, 3)).astype(np.float32)
  y = rng.integers(0, 4, size=48).astype(np.int32)
  return x, stack_batches(x, y, 16), stack_batches(x[:32], y[:32], 16, drop_remainder=True)


def nnx_pair(batchnorm_layers=True):
  models = [NNXCNN(nnx.Rngs(seed), batchnorm_layers) for seed in (0, 1)]
  (apply_fn, va), (_, vb) = (adapters.from_nnx(m) for m in models)
  return models, apply_fn, va, vb


def test_variables_are_the_linen_twins_layout(data):
  x, _, _ = data
  _, _, va, _ = nnx_pair()
  twin = LinenCNN().init(jax.random.key(0), x[:2])
  shapes = lambda tree: jax.tree.map(jnp.shape, tree)
  assert shapes(va) == shapes(twin)


def test_path_curves_equal_the_linen_twins_with_batchnorm_recomputed(data):
  _, eval_batches, bn_batches = data
  _, apply_fn, va, vb = nnx_pair()
  nnx_result = barriers.evaluate_path(apply_fn, (va["params"], vb["params"]), TS, eval_batches,
                                      bn_batches=bn_batches)
  linen_result = barriers.evaluate_path(LinenCNN().apply, (va["params"], vb["params"]), TS,
                                        eval_batches, bn_batches=bn_batches)
  np.testing.assert_allclose(nnx_result.loss, linen_result.loss, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(nnx_result.accuracy, linen_result.accuracy, atol=1e-7)
  # The statistics really are recomputed: they equal Linen's, and differ from the stored ones.
  stats_nnx = batchnorm.recompute_batch_stats(apply_fn, {"params": va["params"]}, bn_batches)
  stats_linen = batchnorm.recompute_batch_stats(LinenCNN().apply, {"params": va["params"]},
                                                bn_batches)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               stats_nnx, stats_linen)
  assert not np.allclose(stats_nnx["bn0"]["var"], va["batch_stats"]["bn0"]["var"])


def test_repair_curves_equal_the_linen_twins(data):
  _, eval_batches, bn_batches = data
  _, apply_fn, va, vb = nnx_pair(batchnorm_layers=False)
  points = (va["params"], vb["params"])
  nnx_result = barriers.evaluate_path(apply_fn, points, TS, eval_batches, bn_batches=bn_batches,
                                      renormalize="repair")
  linen_result = barriers.evaluate_path(LinenCNN(batchnorm_layers=False).apply, points, TS,
                                        eval_batches, bn_batches=bn_batches,
                                        renormalize="repair")
  plain = barriers.evaluate_path(apply_fn, points, TS, eval_batches, renormalize=None)
  np.testing.assert_allclose(nnx_result.loss, linen_result.loss, atol=1e-6, rtol=1e-6)
  repaired, unrepaired = np.asarray(nnx_result.loss), np.asarray(plain.loss)
  assert not np.allclose(repaired[1:-1], unrepaired[1:-1])  # REPAIR changed the middle
  # At the ends REPAIR only rescales by sqrt(var + eps) where std was: nearly no change.
  np.testing.assert_allclose(repaired[[0, -1]], unrepaired[[0, -1]], rtol=1e-3)


def test_derived_spec_equals_the_linen_twins_and_a_planted_permutation_is_recovered(data):
  x, eval_batches, bn_batches = data
  models, apply_fn, va, _ = nnx_pair()
  spec = symmetry.derive_spec(apply_fn, va, x[:2])
  twin_spec = symmetry.derive_spec(LinenCNN().apply, va, x[:2])
  assert spec.axes == twin_spec.axes and spec.shapes == twin_spec.shapes
  assert sorted(spec.names) == ["P_conv0", "P_conv1", "P_hidden/0"]
  assert spec.sites["P_conv0"] == (("conv0",), ("bn0",)) == twin_spec.sites["P_conv0"]
  # The twin has one site more: its wrapper module 'hidden' (an nnx.List is never called).
  assert spec.sites["P_hidden/0"] == (("hidden", "0"),)
  assert set(twin_spec.sites["P_hidden/0"]) == {("hidden", "0"), ("hidden",)}

  perm = align.random_permutation(spec, va["params"], seed=3)
  permuted = align.apply_permutation(spec, perm, va)
  # The permuted NNX model computes the same function ...
  x_eval = eval_batches["image"][0]
  np.testing.assert_allclose(apply_fn(permuted, x_eval), apply_fn(va, x_eval), atol=1e-5)
  # ... and weight matching and activation matching recover the permutation exactly.
  found = matching.weight_matching(spec, va["params"], permuted["params"])
  inverse = {k: np.argsort(v) for k, v in perm.items()}
  assert all(np.array_equal(found[k], inverse[k]) for k in spec.names)
  found = matching.activation_matching(apply_fn, spec, va, permuted, list(eval_batches["image"]))
  assert all(np.array_equal(found[k], inverse[k]) for k in spec.names)
  # Written back into an NNX module, the aligned variables are the module's state.
  nnx_adapter.update(models[1], permuted)
  _, back = adapters.from_nnx(models[1])
  jax.tree.map(np.testing.assert_array_equal, back, permuted)


class NNXAttention(nnx.Module):
  """A token classifier with nnx.LayerNorm and nnx.MultiHeadAttention."""

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Linear(3, 8, rngs=rngs)
    self.norm = nnx.LayerNorm(8, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8,
                                            decode=False, rngs=rngs)
    self.mlp = nnx.Linear(8, 16, rngs=rngs)
    self.out = nnx.Linear(16, 8, rngs=rngs)
    self.head = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    h = self.embed(x.reshape(x.shape[0], -1, 3))
    h = h + self.attention(self.norm(h))
    h = h + self.out(nnx.gelu(self.mlp(h)))
    return self.head(h.mean(axis=1))


def test_an_attention_model_with_layernorm_aligns_and_evaluates(data):
  x, eval_batches, bn_batches = data
  apply_fn, va = adapters.from_nnx(NNXAttention(nnx.Rngs(0)))
  _, vb = adapters.from_nnx(NNXAttention(nnx.Rngs(1)))
  spec = symmetry.derive_spec(apply_fn, va, x[:2])
  head_groups = [n for n in spec.names if n.startswith("P_attention")]
  assert len(head_groups) >= 2  # the heads as units, and the units within a head
  perm = align.random_permutation(spec, va["params"], seed=0)
  permuted = align.apply_permutation(spec, perm, va)
  np.testing.assert_allclose(apply_fn(permuted, x[:4]), apply_fn(va, x[:4]), atol=1e-5)
  found = matching.weight_matching(spec, va["params"], permuted["params"])
  inverse = {k: np.argsort(v) for k, v in perm.items()}
  assert all(np.array_equal(found[k], inverse[k]) for k in spec.names)
  result = barriers.evaluate_path(apply_fn, (va["params"], vb["params"]), TS, eval_batches,
                                  bn_batches=bn_batches, renormalize="repair")
  assert np.all(np.isfinite(result.loss))


def test_bad_nnx_inputs_are_named():
  with pytest.raises(TypeError, match="from_nnx takes an nnx.Module"):
    adapters.from_nnx(LinenCNN())

  class WithDropout(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(2, 2, rngs=rngs)
      self.dropout = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
      return self.dropout(self.dense(x))

  with pytest.raises(ValueError, match="state other than nnx.Param and nnx.BatchStat"):
    adapters.from_nnx(WithDropout(nnx.Rngs(0)))
