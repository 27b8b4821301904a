"""Regenerates the PyTorch checkpoints and logits that tests/test_torch_import.py checks.

  python tests/data/make_torch_references.py   # needs torch (pip install torch)

For each layout: `<layout>.safetensors` (the state dict of a 1/16-width
network with random weights and BatchNorm statistics) and
`<layout>_reference.safetensors` (`images`, NHWC, and PyTorch's eval `logits`
for them). Written with torch 2.13.0 (CPU).
"""

import os
import sys

import numpy as np
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import torch_models  # noqa: E402

SIZES = {"mmc_vgg13": 32, "mmc_resnet18": 32, "torchvision_resnet18": 64}

if __name__ == "__main__":
  for layout, size in SIZES.items():
    net = torch_models.build(layout, width=1 / 16, num_classes=10, seed=0)
    save_torch({k: v.contiguous() for k, v in net.state_dict().items()},
               os.path.join(HERE, f"{layout}.safetensors"))
    images = np.random.default_rng(0).normal(size=(4, size, size, 3)).astype(np.float32)
    save_file({"images": images, "logits": torch_models.logits(net, images)},
              os.path.join(HERE, f"{layout}_reference.safetensors"))
    print(layout, "written")
