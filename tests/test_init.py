"""weight_init='torch': the paper models initialised as PyTorch initialises the official ones.

PyTorch's defaults (nn.Conv2d / nn.Linear reset_parameters): weights kaiming-uniform with
a = sqrt(5), i.e. U(-b, b) with b = gain * sqrt(3 / fan_in), gain = sqrt(2 / (1 + a^2)),
so b = 1 / sqrt(fan_in); biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)); BatchNorm weight 1, bias 0.
"""

import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mechconn.models import get_model


def torch_bound(fan_in: int) -> float:
  a = math.sqrt(5)
  gain = math.sqrt(2.0 / (1 + a * a))
  return gain * math.sqrt(3.0 / fan_in)


@functools.lru_cache(maxsize=None)
def _init(name, weight_init, kwargs):
  model = get_model(name, 10, weight_init=weight_init, **dict(kwargs))
  return flax.traverse_util.flatten_dict(
      jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"], sep="/")


def init(name, weight_init, **kwargs):
  return _init(name, weight_init, tuple(sorted(kwargs.items())))


@pytest.mark.parametrize("name, kwargs", [("vgg13", {"width": 0.5}),
                                          ("resnet18", {"width": 0.25})])
def test_torch_init_follows_pytorch_formulas(name, kwargs):
  params = init(name, "torch", **kwargs)
  kernels = {k: v for k, v in params.items() if k.endswith("kernel")}
  assert len(kernels) == {"vgg13": 11, "resnet18": 21}[name]  # convs (+ shortcuts) + head
  for key, w in kernels.items():
    w = np.asarray(w)
    fan_in = int(np.prod(w.shape[:-1]))  # HWI of HWIO, or the head's inputs
    bound = torch_bound(fan_in)
    assert np.abs(w).max() <= bound, key
    if w.size >= 4096:  # enough draws to test the uniform's moments
      assert abs(np.abs(w).max() / bound - 1) < 0.01, key
      assert abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.05, key
      assert abs(w.mean()) < 0.05 * bound, key
  head_bias = np.asarray(params["head/bias"])
  assert np.abs(head_bias).max() <= torch_bound(params["head/kernel"].shape[0])
  assert np.abs(head_bias).min() > 0  # drawn, not zeros
  for key, v in params.items():
    if "BatchNorm" in key or "_bn/" in key:
      np.testing.assert_array_equal(v, np.ones_like(v) if key.endswith("scale") else 0 * v)


def test_default_conv_kernels_are_about_2_5x_torch_s():
  """The issue's observation: kaiming-normal std sqrt(2 / fan_in) against PyTorch's
  1 / sqrt(3 fan_in), a ratio of sqrt(6) = 2.45."""
  torch_params, default = init("vgg13", "torch", width=0.5), init("vgg13", "default", width=0.5)
  ratio = np.std(default["Conv_4/kernel"]) / np.std(torch_params["Conv_4/kernel"])
  assert abs(ratio - math.sqrt(6)) < 0.05


def test_torch_init_matches_pytorch_itself():
  torch = pytest.importorskip("torch")
  conv = torch.nn.Conv2d(64, 128, 3, bias=False)
  linear = torch.nn.Linear(256, 10)
  ours = init("vgg13", "torch", width=0.5)
  for theirs, mine, fan_in in ((conv.weight, ours["Conv_3/kernel"], 64 * 9),  # width 0.5
                               (linear.weight, ours["head/kernel"], 256),
                               (linear.bias, ours["head/bias"], 256)):
    theirs, mine = theirs.detach().numpy(), np.asarray(mine)
    assert max(np.abs(theirs).max(), np.abs(mine).max()) <= torch_bound(fan_in)
    if theirs.size > 1000:  # the same distribution: extremes and spread agree
      np.testing.assert_allclose(np.abs(mine).max(), np.abs(theirs).max(), rtol=0.02)
      np.testing.assert_allclose(mine.std(), theirs.std(), rtol=0.05)


def test_unknown_weight_init_is_named():
  with pytest.raises(ValueError, match=r"Unknown weight_init 'xavier'.*'default', 'torch'"):
    init("vgg13", "xavier", width=0.25)
