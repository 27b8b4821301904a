"""The CIFAR ResNet-20-style model: shapes, parameter count, permutation symmetry, matching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mechconn import align
from mechconn import matching
from mechconn import symmetry
from mechconn.models import MODELS, get_model
from mechconn.models.resnet20 import ResNet20

NORMS = ("batch", "layer")


def images(n=4, size=8, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, size, size, 3)), jnp.float32)


def randomised(variables, seed=1):
  """Every leaf replaced by noise (variances positive), so no symmetry holds by accident."""
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree.flatten_with_path(variables)
  out = []
  for path, leaf in leaves:
    noise = rng.normal(size=leaf.shape).astype(np.float32)
    is_var = jax.tree_util.keystr(path).endswith("['var']")
    out.append(jnp.asarray(1.0 + np.abs(noise) if is_var else np.asarray(leaf) + 0.5 * noise))
  return jax.tree.unflatten(treedef, out)


def model_and_variables(norm, width=1.0, blocks=1, base=4):
  model = get_model("resnet20", 10, width=width, blocks_per_stage=blocks, norm=norm,
                    base_channels=base)
  return model, randomised(model.init(jax.random.key(0), images()))


def test_registered():
  assert MODELS["resnet20"] is ResNet20


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("width,blocks", [(0.5, 1), (1, 3), (2, 2)])
def test_shapes_for_both_norms_and_several_widths(norm, width, blocks):
  model = get_model("resnet20", 7, width=width, blocks_per_stage=blocks, norm=norm,
                    base_channels=8)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images()))
  logits, features = jax.eval_shape(
      lambda v: model.apply(v, images(), return_features=True), variables)
  assert logits.shape == (4, 7) and features.shape == (4, round(32 * width))
  params = variables["params"]
  assert params["stem_conv"]["kernel"].shape == (3, 3, 3, round(8 * width))
  assert sorted(k for k in params if k.startswith("layer")) == sorted(
      f"layer{s}_{b}" for s in (1, 2, 3) for b in range(blocks))
  assert "shortcut_norm" in params["layer2_0"] and "shortcut_norm" not in params["layer1_0"]
  assert ("batch_stats" in variables) == (norm == "batch")


def test_resnet20_parameter_count():
  def conv_norm(c_in, c_out, k=3):
    return k * k * c_in * c_out + 2 * c_out  # conv without bias, norm scale and bias
  def block(c_in, c_out):
    return conv_norm(c_in, c_out) + conv_norm(c_out, c_out) + (
        conv_norm(c_in, c_out, k=1) if c_in != c_out else 0)
  widths = [16] * 4 + [32] * 3 + [64] * 3
  expected = conv_norm(3, 16) + sum(block(a, b) for a, b in zip(widths[:-1], widths[1:]))
  expected += 64 * 10 + 10
  for norm in NORMS:
    variables = jax.eval_shape(lambda m=get_model("resnet20", 10, norm=norm): m.init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"])) == expected


@pytest.mark.parametrize("norm", NORMS + ("layer_channels",))
def test_derived_spec_random_permutation_leaves_logits_unchanged(norm):
  model, variables = model_and_variables(norm)
  spec = symmetry.derive_spec(model.apply, variables, images())
  # The stem and residual stream of each stage share one group; each block's inner
  # conv has its own: 3 stream groups + 1 per stage.
  assert len(spec.names) == 3 + 3
  perm = align.random_permutation(spec, variables["params"], seed=3)
  assert any(not np.array_equal(p, np.arange(len(p))) for p in perm.values())
  permuted = align.apply_permutation(spec, perm, variables)
  assert not np.allclose(permuted["params"]["stem_conv"]["kernel"],
                         variables["params"]["stem_conv"]["kernel"])
  x = images(seed=5)
  np.testing.assert_allclose(model.apply(permuted, x), model.apply(variables, x),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm", NORMS)
def test_weight_matching_recovers_a_planted_permutation(norm):
  model, variables = model_and_variables(norm)
  spec = symmetry.derive_spec(model.apply, variables, images())
  permuted = align.apply_permutation(spec, align.random_permutation(spec, variables["params"],
                                                                    seed=7), variables)
  perm = matching.weight_matching(spec, variables, permuted)
  recovered = align.apply_permutation(spec, perm, permuted)
  jax.tree.map(np.testing.assert_array_equal, recovered, variables)


@pytest.mark.parametrize("kwargs,match", [({"norm": "group"}, "Unknown norm"),
                                          ({"width": 0}, "width > 0"),
                                          ({"blocks_per_stage": 0}, "blocks_per_stage")])
def test_bad_attributes_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    get_model("resnet20", 10, **kwargs).init(jax.random.key(0), images())
