"""PyTorch checkpoints into mechconn: logits equal PyTorch's.

Stored references (tests/data, written by make_torch_references.py with torch
2.13.0) need no torch; the live comparisons at full width, through
`torch.load(..., weights_only=True)`, run where torch is installed.
"""

import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mechconn import align
from mechconn import symmetry
from mechconn import torch_import
from test_symmetry import _partition

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def _relative_error(ours, theirs):
  return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


@pytest.mark.parametrize("layout", [
    "mmc_resnet18", pytest.param("mmc_vgg13", marks=pytest.mark.slow),
    pytest.param("torchvision_resnet18", marks=pytest.mark.slow)])
def test_stored_pytorch_checkpoints_give_pytorchs_logits(layout):
  model, variables = torch_import.load(os.path.join(DATA, f"{layout}.safetensors"), layout)
  reference = load_file(os.path.join(DATA, f"{layout}_reference.safetensors"))
  logits = model.apply(variables, reference["images"], train=False)
  assert _relative_error(logits, reference["logits"]) < 1e-4
  # An imported model is an ordinary mechconn model: its derived spec is the written one.
  x = jax.ShapeDtypeStruct(reference["images"].shape, np.float32)
  written = align.permutation_spec(layout.rsplit("_", 1)[1], variables["params"])
  assert _partition(symmetry.derive_spec(model.apply, variables, x)) == _partition(written)


def test_a_state_dict_of_another_layout_is_refused_naming_the_keys():
  state = load_file(os.path.join(DATA, "mmc_resnet18.safetensors"))
  with pytest.raises(ValueError, match="no 'fc.weight': not a torchvision_resnet18"):
    torch_import.import_state_dict("torchvision_resnet18", state)
  with pytest.raises(ValueError, match="Unknown layout 'resnet18'"):
    torch_import.import_state_dict("resnet18", state)
  extra = dict(state, **{"linear2.weight": np.zeros((2, 2), np.float32)})
  with pytest.raises(ValueError, match=r"unused \['linear2.weight'\]"):
    torch_import.import_state_dict("mmc_resnet18", extra)
  missing = {k: v for k, v in state.items() if k != "layer2.0.bn1.running_var"}
  with pytest.raises(ValueError, match=r"missing \['layer2.0.bn1.running_var'\]"):
    torch_import.import_state_dict("mmc_resnet18", missing)
  wrong = dict(state, **{"layer1.0.conv2.weight": np.zeros((4, 4, 1, 1), np.float32)})
  with pytest.raises(ValueError, match="'layer1.0.conv2.weight' .* does not fit "
                                       "params/layer1_0/Conv_1/kernel"):
    torch_import.import_state_dict("mmc_resnet18", wrong)


def test_missing_files_and_pickles_without_torch_are_named(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="No checkpoint at"):
    torch_import.load_state_dict(str(tmp_path / "absent.safetensors"))
  path = tmp_path / "model.pt"
  path.write_bytes(b"not read")
  monkeypatch.setitem(__import__("sys").modules, "torch", None)  # as if torch were absent
  with pytest.raises(ImportError, match="needs torch"):
    torch_import.load_state_dict(str(path))


def test_a_garbage_or_truncated_safetensors_file_is_named(tmp_path):
  garbage, truncated = tmp_path / "garbage.safetensors", tmp_path / "truncated.safetensors"
  garbage.write_bytes(b"not a safetensors file at all")
  with open(os.path.join(DATA, "mmc_resnet18.safetensors"), "rb") as f:
    truncated.write_bytes(f.read()[:5000])
  for path in (garbage, truncated):
    with pytest.raises(ValueError, match=f"'{path}' is not a readable safetensors file "
                                         r"\(truncated or corrupt\?"):
      torch_import.load(str(path), "mmc_resnet18")


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_])
def test_an_integer_weight_is_refused_not_cast(dtype):
  state = load_file(os.path.join(DATA, "mmc_resnet18.safetensors"))
  state["layer1.0.conv1.weight"] = state["layer1.0.conv1.weight"].astype(dtype)
  with pytest.raises(ValueError, match=f"'layer1.0.conv1.weight' has dtype {np.dtype(dtype)} "
                                       r"where the model has a float weight \(float32"):
    torch_import.import_state_dict("mmc_resnet18", state)
  # BatchNorm's step counter is an integer in PyTorch: still dropped, not refused.
  state = load_file(os.path.join(DATA, "mmc_resnet18.safetensors"))
  state["bn1.num_batches_tracked"] = np.asarray(100, np.int64)
  torch_import.import_state_dict("mmc_resnet18", state)


@pytest.mark.parametrize("key,value,need", [
    ("layer2.0.bn1.running_var", -0.5, r"finite and >= 0"),
    ("layer2.0.bn1.running_var", np.nan, r"finite and >= 0"),
    ("bn1.running_var", np.inf, r"finite and >= 0"),
    ("bn1.running_mean", np.nan, r"finite \(")])
def test_invalid_batchnorm_statistics_are_refused_at_import(key, value, need):
  state = load_file(os.path.join(DATA, "mmc_resnet18.safetensors"))
  state[key] = state[key].copy()
  state[key][3] = value
  with pytest.raises(ValueError, match=f"'{key}' holds {value} at index 3 .*must be {need}"):
    torch_import.import_state_dict("mmc_resnet18", state)


def test_safetensors_written_by_numpy_read_back(tmp_path):
  state = load_file(os.path.join(DATA, "mmc_vgg13.safetensors"))
  save_file(state, str(tmp_path / "copy.safetensors"))
  model, variables = torch_import.load(str(tmp_path / "copy.safetensors"), "mmc_vgg13")
  assert model.num_classes == 10 and model.width == 1 / 16


@pytest.mark.slow  # full-width networks in both frameworks
@pytest.mark.parametrize("layout,width,size", [("mmc_vgg13", 1.0, 32),
                                               ("mmc_resnet18", 1.0, 32),
                                               ("torchvision_resnet18", 0.5, 64)])
def test_full_width_pytorch_models_through_torch_load(layout, width, size, tmp_path):
  torch = pytest.importorskip("torch")
  import torch_models  # pylint: disable=g-import-not-at-top
  net = torch_models.build(layout, width=width, num_classes=100, seed=1)
  path = str(tmp_path / "checkpoint.pt")
  torch.save({"state_dict": net.state_dict()}, path)
  model, variables = torch_import.load(path, layout)
  images = np.random.default_rng(1).normal(size=(3, size, size, 3)).astype(np.float32)
  logits = model.apply(variables, images, train=False)
  assert logits.shape == (3, 100)
  assert _relative_error(logits, torch_models.logits(net, images)) < 1e-4
  torch.save([1, 2], path)
  with pytest.raises(ValueError, match="holds a list, not a state dict"):
    torch_import.load_state_dict(path)


@pytest.mark.parametrize("layout", ["mmc_vgg13", "mmc_resnet18", "torchvision_resnet18"])
@pytest.mark.parametrize("width", [0.1, 0.3, 1 / 16])
def test_the_width_is_the_one_that_gives_every_layer_its_channels(layout, width):
  """Channel counts are rounded (`layers.scaled`): 0.1 gives 6 of 64 channels and 13 of 128,
  which the first layer alone (6 / 64 = 0.094) would not reproduce."""
  from mechconn.models import layers, vgg  # pylint: disable=import-outside-toplevel
  if layout == "mmc_vgg13":
    bases = {f"layers.{i}.conv1.weight": c for i, (c, _) in enumerate(vgg.VGG13_CFG)}
  else:
    bases = {"conv1.weight": 64, **{f"layer{s}.0.conv1.weight": 64 * 2**(s - 1)
                                    for s in range(1, 5)}}
  head = "fc" if layout == "torchvision_resnet18" else "linear"
  state = {k: np.zeros((layers.scaled(c, width), 3, 3, 3), np.float32) for k, c in bases.items()}
  state[f"{head}.weight"] = np.zeros((7, 4), np.float32)
  model = torch_import.model_of(layout, state)
  assert model.num_classes == 7
  for key, c in bases.items():
    assert layers.scaled(c, model.width) == state[key].shape[0], key
