"""PyTorch networks with the parameter names of the checkpoints `mechconn.torch_import` reads.

Written for the tests from the architectures (not copied): the official MMC
code's VGG-13 and ResNet-18 (CIFAR stems, `shortcut_conv`/`shortcut_bn`,
`linear`) and torchvision's ResNet-18 (ImageNet stem, `downsample`, `fc`),
each with a width multiplier so that test checkpoints stay small.
"""

import torch
from torch import nn
import torch.nn.functional as F

VGG13_CFG = ((64, 1), (64, 2), (128, 1), (128, 2), (256, 1), (256, 2), (512, 1), (512, 2),
             (512, 1), (512, 1))


def _scaled(c, width):
  return max(1, int(round(c * width)))


class VGGBlock(nn.Module):
  def __init__(self, c_in, c_out, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(c_out)

  def forward(self, x):
    return F.relu(self.bn1(self.conv1(x)))


class MMCVGG13(nn.Module):
  def __init__(self, num_classes=10, width=1.0):
    super().__init__()
    blocks, c_in = [], 3
    for c, stride in VGG13_CFG:
      blocks.append(VGGBlock(c_in, _scaled(c, width), stride))
      c_in = _scaled(c, width)
    self.layers = nn.Sequential(*blocks)
    self.linear = nn.Linear(c_in, num_classes)

  def forward(self, x):
    return self.linear(self.layers(x).mean(dim=(2, 3)))


class Block(nn.Module):
  def __init__(self, c_in, c_out, stride, torchvision):
    super().__init__()
    self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(c_out)
    self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(c_out)
    self.projects = stride != 1 or c_in != c_out
    self.torchvision = torchvision
    if self.projects:
      conv, bn = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
      if torchvision:
        self.downsample = nn.Sequential(conv, bn)
      else:
        self.shortcut_conv, self.shortcut_bn = conv, bn

  def shortcut(self, x):
    if not self.projects:
      return x
    if self.torchvision:
      return self.downsample(x)
    return self.shortcut_bn(self.shortcut_conv(x))

  def forward(self, x):
    out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
  def __init__(self, num_classes=10, width=1.0, torchvision=False):
    super().__init__()
    c = _scaled(64, width)
    self.torchvision = torchvision
    self.conv1 = (nn.Conv2d(3, c, 7, stride=2, padding=3, bias=False) if torchvision
                  else nn.Conv2d(3, c, 3, padding=1, bias=False))
    self.bn1 = nn.BatchNorm2d(c)
    c_in = c
    for stage, channels in enumerate((64, 128, 256, 512)):
      blocks = []
      for block in range(2):
        stride = 2 if stage > 0 and block == 0 else 1
        blocks.append(Block(c_in, _scaled(channels, width), stride, torchvision))
        c_in = _scaled(channels, width)
      setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
    head = nn.Linear(c_in, num_classes)
    if torchvision:
      self.fc = head
    else:
      self.linear = head

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    if self.torchvision:
      x = F.max_pool2d(x, 3, stride=2, padding=1)
    for stage in range(1, 5):
      x = getattr(self, f"layer{stage}")(x)
    x = x.mean(dim=(2, 3))
    return self.fc(x) if self.torchvision else self.linear(x)


def build(layout, width, num_classes=10, seed=0):
  """A network of `layout` with random weights and non-trivial BatchNorm statistics."""
  torch.manual_seed(seed)
  net = (MMCVGG13(num_classes, width) if layout == "mmc_vgg13"
         else ResNet18(num_classes, width, torchvision=layout == "torchvision_resnet18"))
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.1)
        m.running_mean.normal_(0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
  return net.eval()


def logits(net, images_nhwc):
  """PyTorch's eval logits for NHWC float32 images (as numpy)."""
  with torch.no_grad():
    return net(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous()).numpy()
