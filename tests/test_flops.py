"""mechconn.flops: counts from layer shapes equal hand counts of the architectures."""

import jax
import jax.numpy as jnp
import pytest

from mechconn import flops
from mechconn.models import get_model


def _variables(model, shape=(1, 32, 32, 3)):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))


def conv(out_hw, cout, cin, k=3):
  """2 x output elements x kernel area x input channels, for one 32x32-sized image."""
  return 2 * out_hw * out_hw * cout * k * k * cin


def test_vgg13_is_its_hand_count():
  # The paper's VGG-13: ten 3x3 convs (every second one stride 2), then a 512 -> 10 head.
  expected = (conv(32, 64, 3) + conv(16, 64, 64) + conv(16, 128, 64) + conv(8, 128, 128)
              + conv(8, 256, 128) + conv(4, 256, 256) + conv(4, 512, 256) + conv(2, 512, 512)
              + conv(2, 512, 512) + conv(2, 512, 512) + 2 * 512 * 10)
  model = get_model("vgg13", 10)
  assert flops.forward_flops(model.apply, _variables(model), (1, 32, 32, 3)) == expected
  assert expected == 230_041_600  # about 0.23 GFLOP per 32x32 image


def test_resnet18_is_its_hand_count():
  expected = conv(32, 64, 3)  # stem
  expected += 4 * conv(32, 64, 64)  # layer1: two blocks of two convs
  for hw, c in ((16, 128), (8, 256), (4, 512)):  # layers 2-4: the first block downsamples
    expected += conv(hw, c, c // 2) + conv(hw, c, c) + conv(hw, c, c // 2, k=1)  # + shortcut
    expected += 2 * conv(hw, c, c)
  expected += 2 * 512 * 10
  model = get_model("resnet18", 10)
  counts = flops.layer_flops(model.apply, _variables(model), (1, 32, 32, 3))
  assert sum(counts.values()) == expected
  assert counts["layer2_0/shortcut_conv"] == conv(16, 128, 64, k=1)
  assert len(counts) == 1 + 16 + 3 + 1  # stem, 16 block convs, 3 shortcuts, head


@pytest.mark.parametrize("conv_impl", ["xla", "patches"])
def test_the_count_scales_with_batch_and_width_and_ignores_the_conv_impl(conv_impl):
  model = get_model("small_cnn", 10, width=8, conv_impl=conv_impl)
  one = flops.forward_flops(model.apply, _variables(model), (1, 32, 32, 3))
  assert flops.forward_flops(model.apply, _variables(model), (4, 32, 32, 3)) == 4 * one
  wide = get_model("small_cnn", 10, width=16)
  reference = get_model("small_cnn", 10, width=8)
  assert one == flops.forward_flops(reference.apply, _variables(reference), (1, 32, 32, 3))
  assert flops.forward_flops(wide.apply, _variables(wide), (1, 32, 32, 3)) > 3 * one


def test_mlp_counts_its_dense_layers():
  model = get_model("mlp", 10, hidden=(16,))
  variables = _variables(model, (1, 8, 8, 3))
  assert flops.forward_flops(model.apply, variables, (2, 8, 8, 3)) == 2 * 2 * (192 * 16 + 16 * 10)
