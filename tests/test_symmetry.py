"""Permutation specs derived by tracing: the built-in models' hand-written specs, and models
mechconn has never seen (residual CNN with a flatten, LayerNorm MLP, ViT with heads)."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mechconn import align
from mechconn import matching
from mechconn import models
from mechconn import symmetry


def _partition(spec):
  """The spec up to group names: which (leaf, axis) pairs share a permutation."""
  groups = {}
  for path, perms in spec.axes.items():
    for axis, p in enumerate(perms):
      if p is not None:
        groups.setdefault(p, set()).add((path, axis))
  return sorted(sorted(g) for g in groups.values()), sorted(spec.axes), spec.shapes


@pytest.mark.parametrize("name,kwargs", [("mlp", {}), ("small_cnn", {"width": 4}),
                                         ("vgg13", {"width": 0.125}),
                                         ("resnet18", {"width": 0.125})])
def test_derived_spec_equals_the_hand_written_one(name, kwargs):
  model = models.get_model(name, 10, **kwargs)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)  # shapes are all it reads
  derived = symmetry.derive_spec(model.apply, variables, x)
  assert _partition(derived) == _partition(align.permutation_spec(name, variables["params"]))
  # Activation matching reads the derived sites: every group has one.
  assert set(derived.sites) == set(derived.names)


class ResidualCNN(nn.Module):
  """Stem, a residual block, max-pool to 2x2, flatten into an MLP: not a built-in."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(6, (3, 3))(x)))
    y = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(5, (3, 3))(x)))
    y = nn.BatchNorm(use_running_average=not train)(nn.Conv(6, (3, 3))(y))
    x = nn.relu(x + y)
    x = nn.max_pool(x, (4, 4), strides=(4, 4))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)  # [B, 2 * 2 * 6]
    x = nn.relu(nn.Dense(7)(x))
    return nn.Dense(3)(x)


class LayerNormMLP(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    x = nn.gelu(nn.LayerNorm()(nn.Dense(9)(x)))
    x = x + nn.Dense(9)(nn.tanh(nn.Dense(5)(x)))
    return nn.Dense(4)(nn.LayerNorm()(x))


class HeadsByReshape(nn.Module):
  """Attention written by hand: one Dense for q, k, v, split into heads by reshape."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    b, h, w, c = x.shape
    x = nn.Dense(8)(x.reshape(b, h * w, c))
    qkv = nn.Dense(3 * 8)(x).reshape(b, h * w, 3, 2, 4)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0, axis=-1)
    y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, h * w, 8)
    x = x + nn.Dense(8)(y)
    return nn.Dense(3)(x.mean(axis=1))


UNSEEN = {
    "residual_cnn": (ResidualCNN, (2, 16, 16, 3)),
    "layernorm_mlp": (LayerNormMLP, (3, 4, 4, 2)),
    "heads_by_reshape": (HeadsByReshape, (2, 4, 4, 3)),
    "vit_cls": (lambda: models.ViT(num_classes=5, width=8, depth=2, num_heads=2,
                                   patch_size=4), (2, 16, 16, 3)),
    "vit_mean": (lambda: models.ViT(num_classes=5, width=8, depth=1, num_heads=4,
                                    patch_size=8, pool="mean"), (2, 16, 16, 3)),
}


def _unseen(name, seed=0):
  make, shape = UNSEEN[name]
  model = make()
  x = jax.random.normal(jax.random.key(100 + seed), shape)
  variables = model.init(jax.random.key(seed), x)
  if "batch_stats" in variables:  # non-trivial statistics, so that they are tested too
    leaves, tree = jax.tree.flatten(variables["batch_stats"])
    keys = jax.random.split(jax.random.key(7), len(leaves))
    variables["batch_stats"] = jax.tree.unflatten(
        tree, [jnp.abs(jax.random.normal(k, l.shape)) + 0.5 for k, l in zip(keys, leaves)])
  return model, variables, x


@pytest.fixture(scope="module", params=sorted(UNSEEN))
def unseen(request):
  model, variables, x = _unseen(request.param)
  return request.param, model, variables, x, symmetry.derive_spec(model.apply, variables, x)


def test_a_random_permutation_of_the_derived_groups_leaves_the_function_unchanged(unseen):
  name, model, variables, x, spec = unseen
  assert len(spec.names) >= 2, spec.names
  for seed in range(3):
    perm = align.random_permutation(spec, variables["params"], seed)
    permuted = align.apply_permutation(spec, perm, variables)
    assert not all(np.array_equal(a, b) for a, b in
                   zip(jax.tree.leaves(permuted), jax.tree.leaves(variables)))
    np.testing.assert_allclose(model.apply(permuted, x), model.apply(variables, x),
                               atol=2e-5, rtol=2e-5)


def test_the_flatten_into_a_dense_layer_is_a_view_with_the_channels_permuted():
  model, variables, x = _unseen("residual_cnn")
  spec = symmetry.derive_spec(model.apply, variables, x)
  # [2 * 2 * 6, 7] seen as [2, 2, 6, 7]: the spatial factors are fixed, the channels carry
  # the residual stream's permutation.
  assert spec.shapes == {"params/Dense_0/kernel": (2, 2, 6, 7)}
  entry = spec.axes["params/Dense_0/kernel"]
  assert entry[:2] == (None, None) and entry[2] == spec.axes["params/Conv_0/kernel"][3]
  assert entry[3] == spec.axes["params/Dense_0/bias"][0] is not None


def test_heads_split_by_a_reshape_are_permuted_as_whole_heads():
  model, variables, x = _unseen("heads_by_reshape")
  spec = symmetry.derive_spec(model.apply, variables, x)
  # The fused q, k, v kernel [8, 24] is viewed as [8, 3, 2, 4]: (q|k|v, head, unit in head).
  assert spec.shapes["params/Dense_1/kernel"] == (8, 3, 2, 4)
  stream, block, heads, units = spec.axes["params/Dense_1/kernel"]
  assert block is None and None not in (stream, heads, units)
  # The output projection reads [8 = (head, unit), 8] as [2, 4, 8].
  assert spec.shapes["params/Dense_2/kernel"] == (2, 4, 8)
  assert spec.axes["params/Dense_2/kernel"] == (heads, units, stream)
  assert heads not in spec.sites and units not in spec.sites  # no output has them last alone


@pytest.mark.slow  # compiles every model's activations: the fast loop keeps the invariance test
@pytest.mark.parametrize("method", ["weight", "activation"])
def test_matching_recovers_a_planted_permutation_exactly(unseen, method):
  name, model, variables, x, spec = unseen
  planted = align.random_permutation(spec, variables["params"], seed=1)
  other = align.apply_permutation(spec, planted, variables)
  if method == "weight":
    perm = matching.weight_matching(spec, variables["params"], other["params"])
  else:
    batches = [jax.random.normal(jax.random.key(i), (16,) + x.shape[1:]) for i in range(2)]
    perm = matching.activation_matching(model.apply, spec, variables, other, batches)
  aligned = align.apply_permutation(spec, perm, other)
  for a, b in zip(jax.tree.leaves(aligned), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)


class SortsItsFeatures(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(6, name="features")(x.reshape(x.shape[0], -1))
    x = jnp.sort(x, axis=-1)  # depends on every unit's value: no rule
    return nn.Dense(2, name="head")(nn.Dense(6, name="mixer")(x))


class JoinsTwoGroups(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    a, b = nn.relu(nn.Dense(3)(x)), nn.relu(nn.Dense(4)(x))
    return nn.Dense(2, name="head")(jnp.concatenate([a, b], axis=-1))


@pytest.mark.parametrize("module,operation,layer", [
    (SortsItsFeatures, "'sort'", "SortsItsFeatures"),
    (JoinsTwoGroups, "'concatenate'", "JoinsTwoGroups")])
def test_an_operation_it_cannot_follow_is_named_with_its_layer(module, operation, layer):
  model = module()
  x = jnp.ones((2, 4, 4, 3))
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(symmetry.UnsupportedOperation, match=f"{operation} in {layer}"):
    symmetry.derive_spec(model.apply, variables, x)


def test_a_position_dependent_operation_fixes_its_axis_without_error():
  class Cumulative(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.relu(nn.Dense(5, name="a")(x.reshape(x.shape[0], -1)))
      y = nn.relu(nn.Dense(6, name="b")(jnp.cumsum(x, axis=-1)))  # order of a's units matters
      return nn.Dense(2, name="head")(y)

  model = Cumulative()
  x = jnp.ones((2, 2, 2, 1))
  variables = model.init(jax.random.key(0), x)
  spec = symmetry.derive_spec(model.apply, variables, x)
  assert spec.axes["params/a/kernel"] == (None, None)  # cumsum: a's units keep their order
  assert spec.axes["params/b/kernel"][1] == "P_b"


class ReturnsItsFeatures(nn.Module):
  """(logits, features): the features are the hidden units the head reads."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    features = nn.relu(nn.Dense(5, name="hidden")(x.reshape(x.shape[0], -1)))
    return nn.Dense(2, name="head")(features), features


def test_a_model_returning_its_hidden_units_is_refused_with_how_to_derive_through_the_logits():
  model = ReturnsItsFeatures()
  x = jnp.ones((2, 3))
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=re.escape(
      "the model returns 2 arrays ([0], [1]), and [1] holds hidden units that its layers read "
      "(1 group(s) of parameter axes, e.g. params/hidden/kernel axis 1)") + ".*" + re.escape(
          "derive_spec(lambda v, x, **kw: model.apply(v, x, **kw)[0], variables, x)")):
    symmetry.derive_spec(model.apply, variables, x)
  # The advice works: through the logits, the hidden units are a group.
  spec = symmetry.derive_spec(lambda v, x, **kw: model.apply(v, x, **kw)[0], variables, x)
  assert spec.axes["params/hidden/kernel"] == (None, "P_hidden")
  assert spec.axes["params/head/kernel"] == ("P_hidden", None)


def test_outputs_that_hold_no_hidden_units_leave_the_groups_alone():
  class TwoHeadsAndAnAuxiliaryLoss(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      h = nn.relu(nn.Dense(5, name="hidden")(x))
      return {"a": nn.Dense(2, name="a")(h), "b": nn.Dense(3, name="b")(h),
              "aux": jnp.mean(h ** 2)}

  model = TwoHeadsAndAnAuxiliaryLoss()
  x = jnp.ones((2, 3))
  spec = symmetry.derive_spec(model.apply, model.init(jax.random.key(0), x), x)
  assert spec.names == ["P_hidden"] and spec.axes["params/b/kernel"] == ("P_hidden", None)


def test_a_spec_without_groups_warns_and_says_why():
  model = nn.Dense(3)  # no hidden units: nothing to permute
  x = jnp.ones((2, 4))
  variables = model.init(jax.random.key(0), x)
  with pytest.warns(symmetry.NoPermutationGroupWarning, match=re.escape(
      "the derived spec has no permutation group (every axis shared by two parameters is fixed "
      "by the model's output), so aligning with it would permute nothing")):
    spec = symmetry.derive_spec(lambda v, x, train=False: model.apply(v, x), variables, x)
  assert spec.names == []
  with pytest.raises(ValueError, match="nothing to permute"):
    matching.weight_matching(spec, variables, variables)
