"""Model definitions: parameter counts from the architectures, features, conv impls."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mechconn.models import get_model, layers
from mechconn.models.vgg import VGG13_CFG


def param_count(model, image_shape=(32, 32, 3)):
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2,) + image_shape)))
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))


def conv_bn(c_in, c_out, k=3):
  return k * k * c_in * c_out + 2 * c_out  # conv without bias, BN scale and bias


def test_vgg13_count_from_paper_definition():
  # Ten 3x3 convs without bias (64, 64s2, 128, 128s2, 256, 256s2, 512, 512s2, 512, 512)
  # each with BN (scale, bias); a 512 -> 10 linear head with bias.
  channels = [3, 64, 64, 128, 128, 256, 256, 512, 512, 512, 512]
  expected = sum(conv_bn(a, b) for a, b in zip(channels[:-1], channels[1:])) + 512 * 10 + 10
  assert expected == 9_413_066
  assert param_count(get_model("vgg13", 10)) == expected
  assert [c for c, _ in VGG13_CFG] == channels[1:]


def test_resnet18_count():
  def block(c_in, c_out):
    shortcut = conv_bn(c_in, c_out, k=1) if c_in != c_out else 0
    return conv_bn(c_in, c_out) + conv_bn(c_out, c_out) + shortcut
  widths = [64, 64, 64, 128, 128, 256, 256, 512, 512]
  expected = conv_bn(3, 64) + sum(block(a, b) for a, b in zip(widths[:-1], widths[1:]))
  expected += 512 * 10 + 10
  assert expected == 11_173_962  # the standard CIFAR ResNet-18 figure
  assert param_count(get_model("resnet18", 10)) == expected


def test_small_cnn_and_mlp_counts():
  w = 8
  expected = conv_bn(3, w) + conv_bn(w, 2 * w) + conv_bn(2 * w, 4 * w) + 4 * w * 5 + 5
  assert param_count(get_model("small_cnn", 5, width=w)) == expected
  mlp = get_model("mlp", 10, hidden=(32, 16))
  assert param_count(mlp, (4, 4, 3)) == (48 * 32 + 32) + (32 * 16 + 16) + (16 * 10 + 10)


def test_width_multiplier_scales_channels():
  v = jax.eval_shape(lambda: get_model("vgg13", 10, width=0.25).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  assert v["params"]["Conv_0"]["kernel"].shape == (3, 3, 3, 16)
  assert v["params"]["head"]["kernel"].shape == (128, 10)


@pytest.mark.parametrize("name,kw", [("mlp", {"hidden": (16,)}), ("small_cnn", {"width": 4}),
                                     ("vgg13", {"width": 1 / 16}),
                                     ("resnet18", {"width": 1 / 16})])
def test_features_and_logits(name, kw):
  model = get_model(name, 7, **kw)
  x = jnp.ones((3, 32, 32, 3))
  variables = model.init(jax.random.key(0), x)
  logits, features = model.apply(variables, x, return_features=True)
  assert logits.shape == (3, 7) and features.ndim == 2 and features.shape[0] == 3
  head = variables["params"]["head"]
  np.testing.assert_allclose(features @ head["kernel"] + head["bias"][None, :], logits,
                             rtol=1e-5, atol=1e-5)


def test_unknown_model_lists_valid_ones():
  with pytest.raises(ValueError, match=r"valid models: \['mlp', 'resnet18', 'resnet20', 'small_cnn', 'vgg13', 'vit'\]"):
    get_model("vgg16", 10)


@pytest.mark.parametrize("size,c_in,stride", [(2, 8, 1), (4, 8, 2), (5, 3, 2), (6, 4, 1)])
def test_conv_as_matmul_matches_xla(size, c_in, stride):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, size, size, c_in)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, c_in, 5)), jnp.float32)
  pads = ((1, 1), (1, 1))
  ref = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  ours = lambda x, w: layers.conv_as_matmul(x, w, (stride, stride), pads)
  np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  for g_ours, g_ref in zip(jax.grad(loss(ours), (0, 1))(x, w), jax.grad(loss(ref), (0, 1))(x, w)):
    np.testing.assert_allclose(g_ours, g_ref, rtol=1e-4, atol=1e-4)


def test_auto_conv_differentiates_like_xla_in_both_modes():
  # 'auto' runs XLA's conv forward with a patches + matmul tangent (custom JVP).
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 6, 5)), jnp.float32)
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
  conv = lambda impl: lambda x, w: layers.conv_general_dilated_auto(
      x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=dn, impl=impl)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  auto, xla = conv("auto"), conv("xla")
  np.testing.assert_allclose(auto(x, w), xla(x, w), rtol=1e-5, atol=1e-5)
  for g_auto, g_xla in zip(jax.grad(loss(auto), (0, 1))(x, w), jax.grad(loss(xla), (0, 1))(x, w)):
    np.testing.assert_allclose(g_auto, g_xla, rtol=1e-4, atol=1e-4)
  hvp = lambda f: jax.jvp(jax.grad(loss(f), 1), (x, w), (x, w))[1]  # forward-over-reverse
  np.testing.assert_allclose(hvp(auto), hvp(xla), rtol=1e-4, atol=1e-4)


def test_conv_impls_give_the_same_network():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16, 16, 3)), jnp.float32)
  make = functools.partial(get_model, "vgg13", 10, width=1 / 16)
  variables = make(conv_impl="xla").init(jax.random.key(0), x)
  outs = [make(conv_impl=impl).apply(variables, x) for impl in layers.CONV_IMPLS]
  for out in outs[1:]:
    np.testing.assert_allclose(out, outs[0], rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="valid"):
    make(conv_impl="winograd").init(jax.random.key(0), x)


@pytest.mark.parametrize("impl,expected_convs", [("xla", 10), ("patches", 0), ("auto", 6)])
def test_auto_routes_tiny_maps_and_rgb_inputs_to_matmul_on_cpu(impl, expected_convs):
  # VGG13 on 32x32: Conv_0 reads 3 channels; Conv_7 (stride 2 on 4x4) and
  # Conv_8, Conv_9 output 2x2 maps.
  model = get_model("vgg13", 10, width=1 / 8, conv_impl=impl)
  x = jnp.zeros((2, 32, 32, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x))(variables)
  num_convs = str(jaxpr).count("conv_general_dilated[")
  assert jax.default_backend() == "cpu"
  assert num_convs == expected_convs


def test_vit_pools_by_class_token_or_mean_and_checks_its_shapes():
  x = jnp.ones((2, 16, 16, 3))
  for pool in ("cls", "mean"):
    model = get_model("vit", 7, width=8, depth=1, num_heads=2, patch_size=4, pool=pool)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)  # shapes only
    logits, features = jax.eval_shape(
        lambda v, x: model.apply(v, x, return_features=True), variables, x)
    assert logits.shape == (2, 7) and features.shape == (2, 8)
    assert ("cls_token" in variables["params"]) == (pool == "cls")
    assert variables["params"]["position"].shape == (1, 16 + (pool == "cls"), 8)
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    get_model("vit", 7, width=6, num_heads=4).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="do not split into 5x5 patches"):
    get_model("vit", 7, width=8, patch_size=5).init(jax.random.key(0), x)


def test_resnet18_imagenet_stem_quarters_the_map_before_the_blocks():
  model = get_model("resnet18", 5, width=0.125, stem="imagenet")
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)  # shapes only: nothing compiles
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert variables["params"]["stem_conv"]["kernel"].shape == (7, 7, 3, 8)
  captured = jax.eval_shape(lambda v, x: model.apply(v, x, capture_intermediates=True)[1],
                            variables, x)["intermediates"]
  assert captured["layer1_0"]["__call__"][0].shape == (1, 16, 16, 8)  # 64 / 2 (conv) / 2 (pool)
  x = jnp.ones((1, 64, 64, 3))
  with pytest.raises(ValueError, match="Unknown stem 'vit'"):
    get_model("resnet18", 5, stem="vit").init(jax.random.key(0), x)
