"""torchvision's AlexNet and VGG16 written out with its exact module layout (torchvision
itself may not import beside the CPU build of torch), and the deconvnet's ReLU in torch:
independent references for the imported networks and their projections."""
import torch
from torch import nn as tnn

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
             512, 512, 512, "M"]


class TorchAlexNet(tnn.Module):
  """torchvision.models.AlexNet, with a swappable ReLU (for the deconvnet reference)."""

  def __init__(self, num_classes=1000, relu=tnn.ReLU):
    super().__init__()
    self.features = tnn.Sequential(
        tnn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), relu(),
        tnn.MaxPool2d(kernel_size=3, stride=2),
        tnn.Conv2d(64, 192, kernel_size=5, padding=2), relu(),
        tnn.MaxPool2d(kernel_size=3, stride=2),
        tnn.Conv2d(192, 384, kernel_size=3, padding=1), relu(),
        tnn.Conv2d(384, 256, kernel_size=3, padding=1), relu(),
        tnn.Conv2d(256, 256, kernel_size=3, padding=1), relu(),
        tnn.MaxPool2d(kernel_size=3, stride=2))
    self.avgpool = tnn.AdaptiveAvgPool2d((6, 6))
    self.classifier = tnn.Sequential(
        tnn.Dropout(p=0.5), tnn.Linear(256 * 6 * 6, 4096), relu(),
        tnn.Dropout(p=0.5), tnn.Linear(4096, 4096), relu(),
        tnn.Linear(4096, num_classes))

  def forward(self, x):
    return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class TorchVGG(tnn.Module):
  """torchvision.models.VGG with make_layers(cfg "D") and no batch norm: vgg16()."""

  def __init__(self, num_classes=1000, relu=lambda: tnn.ReLU(inplace=True)):
    super().__init__()
    mods, c = [], 3
    for v in VGG16_CFG:
      if v == "M":
        mods.append(tnn.MaxPool2d(kernel_size=2, stride=2))
      else:
        mods += [tnn.Conv2d(c, v, kernel_size=3, padding=1), relu()]
        c = v
    self.features = tnn.Sequential(*mods)
    self.avgpool = tnn.AdaptiveAvgPool2d((7, 7))
    self.classifier = tnn.Sequential(
        tnn.Linear(512 * 7 * 7, 4096), tnn.ReLU(True), tnn.Dropout(p=0.5),
        tnn.Linear(4096, 4096), tnn.ReLU(True), tnn.Dropout(p=0.5),
        tnn.Linear(4096, num_classes))

  def forward(self, x):
    return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# Our layer name -> index of the torchvision module whose output it is.
ALEXNET_OUTPUTS = {"conv1": ("features", 1), "pool1": ("features", 2),
                   "conv2": ("features", 4), "pool2": ("features", 5),
                   "conv3": ("features", 7), "conv4": ("features", 9),
                   "conv5": ("features", 11), "pool5": ("features", 12),
                   "fc6": ("classifier", 2), "fc7": ("classifier", 5)}


def vgg16_outputs():
  out, block, conv, i = {}, 1, 0, 0
  for v in VGG16_CFG:
    if v == "M":
      out[f"pool{block}"] = ("features", i)
      block, conv, i = block + 1, 0, i + 1
    else:
      conv += 1
      out[f"conv{block}_{conv}"] = ("features", i + 1)   # after the ReLU
      i += 2
  out.update(fc6=("classifier", 1), fc7=("classifier", 4))
  return out


class DeconvReLU(torch.autograd.Function):
  """max(x, 0) whose backward is the deconvnet's: relu(R), whatever x was."""

  @staticmethod
  def forward(ctx, x):
    return x.clamp(min=0)

  @staticmethod
  def backward(ctx, r):
    return r.clamp(min=0)


class DeconvReLUModule(tnn.Module):
  def forward(self, x):
    return DeconvReLU.apply(x)
