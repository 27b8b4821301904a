"""PyTorch checkpoints into mechconn's variables: the paper's models and torchvision's ResNet-18.

Reads a state dict from safetensors (`safetensors.numpy`, no torch needed) or
from a `.pt`/`.pth` file with `torch.load(..., weights_only=True)` (torch
installed; never unpickling arbitrary objects), and maps it onto a mechconn
model of the same architecture:

  - the official Mechanistic Mode Connectivity code's VGG-13
    (`layers.{i}.conv1`, `layers.{i}.bn1`, `linear`) -> `models.VGG13`;
  - its ResNet-18 (`conv1`, `bn1`, `layer{s}.{b}.conv1/bn1/conv2/bn2`,
    `shortcut_conv`, `shortcut_bn`, `linear`) -> `models.ResNet18`;
  - torchvision's ResNet-18 (`downsample.0/1`, `fc`) -> `models.ResNet18(stem='imagenet')`.

Convolution weights [O, I, kh, kw] become HWIO kernels, linear weights are
transposed, BatchNorm `weight`/`bias`/`running_mean`/`running_var` become
`scale`/`bias`/`mean`/`var` (`num_batches_tracked` is dropped). Note the
variance convention: PyTorch's `running_var` holds the *unbiased* batch
variance (mechconn's recomputed statistics hold the biased one, a factor
n / (n - 1)); imported as is, the model computes exactly PyTorch's eval logits.
Every key must be used, every shape must match the model, every weight must
be floating point (an integer or bool tensor is refused, not cast; only
`num_batches_tracked` is an integer, and dropped) and BatchNorm statistics
must be valid (a finite running_mean, a finite running_var >= 0), or the
error names the key. A file safetensors cannot read is named as such.
"""

from collections.abc import Callable
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mechconn import models

LAYOUTS = ("mmc_vgg13", "mmc_resnet18", "torchvision_resnet18")


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """{name: array} from a .safetensors file or a .pt/.pth state dict (weights only)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"No checkpoint at {path!r}.")
  if not os.path.isfile(path):
    raise ValueError(f"{path!r} is a directory, not a checkpoint file (.safetensors, or a "
                     "PyTorch .pt/.pth).")
  if path.endswith(".safetensors"):
    import safetensors  # pylint: disable=g-import-not-at-top
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      return dict(load_file(path))
    except safetensors.SafetensorError as e:
      raise ValueError(f"{path!r} is not a readable safetensors file (truncated or corrupt? "
                       f"{os.path.getsize(path)} bytes; safetensors says: {e}).") from None
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f"Reading {path!r} needs torch (pip install torch), or save the state "
                      "dict as .safetensors (safetensors.torch.save_file) to read it "
                      "without torch.") from None
  state = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
    state = state["state_dict"]
  if not isinstance(state, dict):
    raise ValueError(f"{path!r} holds a {type(state).__name__}, not a state dict.")
  return {k.removeprefix("module."): v.detach().cpu().numpy() for k, v in state.items()
          if hasattr(v, "detach")}


def _conv(w):
  return np.transpose(w, (2, 3, 1, 0))


def _mapping_vgg13(sd) -> list[tuple[tuple[str, ...], str, Callable]]:
  """(mechconn path, torch key, transform) for every tensor."""
  out = []
  for i in range(len(models.vgg.VGG13_CFG)):
    out.append((("params", f"Conv_{i}", "kernel"), f"layers.{i}.conv1.weight", _conv))
    out += _bn_entries(f"BatchNorm_{i}", f"layers.{i}.bn1")
  return out + _linear_entries("head", "linear")


def _bn_entries(name, prefix, outer=()):
  return [(("params", *outer, name, "scale"), f"{prefix}.weight", None),
          (("params", *outer, name, "bias"), f"{prefix}.bias", None),
          (("batch_stats", *outer, name, "mean"), f"{prefix}.running_mean", None),
          (("batch_stats", *outer, name, "var"), f"{prefix}.running_var", None)]


def _linear_entries(name, prefix):
  return [(("params", name, "kernel"), f"{prefix}.weight", np.transpose),
          (("params", name, "bias"), f"{prefix}.bias", None)]


def _mapping_resnet18(sd, torchvision: bool):
  out = [(("params", "stem_conv", "kernel"), "conv1.weight", _conv)] + _bn_entries("stem_bn",
                                                                                    "bn1")
  for stage in range(1, 5):
    for block in range(2):
      torch_block, ours = f"layer{stage}.{block}", (f"layer{stage}_{block}",)
      for i in range(2):
        out.append((("params", *ours, f"Conv_{i}", "kernel"), f"{torch_block}.conv{i + 1}.weight",
                    _conv))
        out += _bn_entries(f"BatchNorm_{i}", f"{torch_block}.bn{i + 1}", ours)
      conv, bn = ((f"{torch_block}.downsample.0", f"{torch_block}.downsample.1") if torchvision
                  else (f"{torch_block}.shortcut_conv", f"{torch_block}.shortcut_bn"))
      if f"{conv}.weight" in sd:
        out.append((("params", *ours, "shortcut_conv", "kernel"), f"{conv}.weight", _conv))
        out += _bn_entries("shortcut_bn", bn, ours)
  return out + _linear_entries("head", "fc" if torchvision else "linear")


def _check_tensor(key: str, value: np.ndarray, leaf) -> None:
  """Raises ValueError for a weight that is not floating point, or BatchNorm statistics that
  are not finite (a variance must also be >= 0)."""
  if not jnp.issubdtype(value.dtype, jnp.floating):
    want = f"{leaf.dtype} in the model" if leaf is not None else "a float dtype"
    raise ValueError(f"{key!r} has dtype {value.dtype} where the model has a float weight "
                     f"({want}): it is not cast (integer or bool weights are not a trained "
                     "model's; save the state dict with float tensors).")
  if key.endswith((".running_var", ".running_mean")):
    values = np.asarray(value, np.float64).ravel()
    bad = ~np.isfinite(values) | (values < 0 if key.endswith(".running_var") else False)
    if bad.any():
      i = int(np.flatnonzero(bad)[0])
      need = "finite and >= 0" if key.endswith(".running_var") else "finite"
      raise ValueError(f"{key!r} holds {values[i]} at index {i} ({int(bad.sum())} of "
                       f"{bad.size} entries bad): BatchNorm statistics must be {need} (a "
                       "corrupt checkpoint, or one of a diverged run). Nothing was imported.")


def model_of(layout: str, state_dict: dict[str, np.ndarray]):
  """The mechconn model for a state dict of `layout` (classes and width from its shapes)."""
  if layout not in LAYOUTS:
    raise ValueError(f"Unknown layout {layout!r}; valid: {LAYOUTS}.")
  head = "fc" if layout == "torchvision_resnet18" else "linear"
  for key in (f"{head}.weight", "layers.0.conv1.weight" if layout == "mmc_vgg13"
              else "conv1.weight"):
    if key not in state_dict:
      raise ValueError(f"The state dict has no {key!r}: not a {layout} checkpoint (its first "
                       f"keys: {sorted(state_dict)[:5]}).")
  num_classes = int(state_dict[f"{head}.weight"].shape[0])
  width = _width_of(layout, state_dict)
  if layout == "mmc_vgg13":
    return models.VGG13(num_classes=num_classes, width=width)
  return models.ResNet18(num_classes=num_classes, width=width,
                         stem="imagenet" if layout == "torchvision_resnet18" else "cifar")


def _width_of(layout: str, state_dict: dict[str, np.ndarray]) -> float:
  """The width multiplier that gives every layer its channel count (`layers.scaled` rounds,
  so the first layer alone is ambiguous, e.g. width 0.1: 6 of 64 channels, 13 of 128)."""
  if layout == "mmc_vgg13":
    bases = {f"layers.{i}.conv1.weight": c for i, (c, _) in enumerate(models.vgg.VGG13_CFG)}
  else:
    bases = {"conv1.weight": 64, **{f"layer{s}.0.conv1.weight": 64 * 2**(s - 1)
                                    for s in range(1, 5)}}
  channels = {k: int(np.shape(state_dict[k])[0]) for k in bases if k in state_dict}
  for key, c in sorted(channels.items(), key=lambda kc: -bases[kc[0]]):  # widest first
    width = c / bases[key]
    if all(models.layers.scaled(bases[k], width) == n for k, n in channels.items()):
      return width
  first = "layers.0.conv1.weight" if layout == "mmc_vgg13" else "conv1.weight"
  return channels[first] / 64  # no width fits: the import names the layer that differs


def import_state_dict(layout: str, state_dict: dict[str, np.ndarray]):
  """(model, variables) of a PyTorch state dict of `layout` (see the module docstring).

  Raises:
    ValueError: a key the layout needs is missing, a key is left unused, a
      tensor's shape does not fit the model, a weight is not floating point
      (never cast silently), or a BatchNorm `running_var` is negative or not
      finite (a `running_mean` not finite); each named.
  """
  model = model_of(layout, state_dict)
  state_dict = {k: np.asarray(v) for k, v in state_dict.items()
                if not k.endswith("num_batches_tracked")}
  mapping = (_mapping_vgg13(state_dict) if layout == "mmc_vgg13"
             else _mapping_resnet18(state_dict, layout == "torchvision_resnet18"))
  missing = [key for _, key, _ in mapping if key not in state_dict]
  unused = sorted(set(state_dict) - {key for _, key, _ in mapping})
  if missing or unused:
    raise ValueError(f"The state dict does not fit a {layout} model: missing {missing[:5]}, "
                     f"unused {unused[:5]}.")
  shape = 224 if layout == "torchvision_resnet18" else 32
  expected = flax.traverse_util.flatten_dict(jax.eval_shape(
      model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, shape, shape, 3), jnp.float32)))
  flat = {}
  for path, key, transform in mapping:
    _check_tensor(key, state_dict[key], expected.get(path))
    value = np.asarray(transform(state_dict[key]) if transform else state_dict[key], np.float32)
    if path not in expected or expected[path].shape != value.shape:
      want = expected[path].shape if path in expected else "no such leaf"
      raise ValueError(f"{key!r} {state_dict[key].shape} does not fit {'/'.join(path)} "
                       f"({want}).")
    flat[path] = jnp.asarray(value)
  if set(flat) != set(expected):
    raise ValueError(f"Leaves of the model left unset: {sorted(set(expected) - set(flat))[:5]}.")
  return model, flax.traverse_util.unflatten_dict(flat)


def load(path: str, layout: str):
  """(model, variables) from a PyTorch checkpoint file of `layout`."""
  return import_state_dict(layout, load_state_dict(path))
