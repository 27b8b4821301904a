"""Flax Linen models; every one in `MODELS` maps NHWC images to logits and can return
features.

`model.apply(variables, x, train=False, return_features=True)` returns
(logits, penultimate_features). `CausalLM` (not in `MODELS`: it is a language
model, not an image classifier) maps tokens [B, L] to next-token logits
[B, L, vocab] and takes no `train` argument.
"""

import flax.linen as nn

from mechconn.models.mlp import MLP
from mechconn.models.resnet import ResNet18
from mechconn.models.resnet20 import ResNet20
from mechconn.models.small_cnn import SmallCNN
from mechconn.models.transformer import CausalLM
from mechconn.models.vgg import VGG13
from mechconn.models.vit import ViT

MODELS: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "small_cnn": SmallCNN,
    "vgg13": VGG13,
    "resnet18": ResNet18,
    "resnet20": ResNet20,
    "vit": ViT,
}


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
  """Builds a model by name ('mlp', 'small_cnn', 'vgg13', 'resnet18', 'resnet20', 'vit').

  Extra keyword arguments are the model's attributes (e.g. width=0.25).
  """
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; valid models: {sorted(MODELS)}.")
  return MODELS[name](num_classes=num_classes, **kwargs)


__all__ = ["CausalLM", "MLP", "MODELS", "ResNet18", "ResNet20", "SmallCNN", "VGG13", "ViT",
           "get_model"]
