"""PyTorch references for the benchmarks (never imported by the package).

``TorchPaperNet(model, input_size)`` builds the PyTorch twin of one of our
``PaperNet``s from its layer table (the same convs, paddings, ceil-mode pools,
LRN with alpha not divided by n, fc6 reading the NHWC-flattened map) with one
``nn.ReLU`` module per ReLU (Captum's deconvnet and guided backprop hook them);
``load_params`` copies our float32 parameters in, so both compute the same
function.  ``train_step_fn`` is a straightforward PyTorch training step with the
optimiser of a config (SGD momentum or Adam; weight decay on kernels; cosine
learning rate; feature scale clipping), for the train-step comparisons.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class TorchPaperNet(nn.Module):
  """One of our PaperNets in PyTorch (NCHW), built from ``model.layer_table``."""

  def __init__(self, model, input_size: int, channels: int = 3):
    super().__init__()
    self.specs = model.layer_table(input_size)
    self.dropout_rate = float(model.dropout_rate)
    self.layers = nn.ModuleDict()
    self.relus = nn.ModuleDict()
    c, n = channels, input_size
    for s in self.specs:
      if s.kind == "conv":   # symmetric padding inside the conv, as one would write it
        lo, hi = s.pad
        self.layers[s.name] = nn.Conv2d(c, s.features, s.kernel, s.stride,
                                        padding=lo if lo == hi else 0)
        self.relus[s.name] = nn.ReLU()
        c, n = s.features, s.out
      elif s.kind == "pool":
        n = s.out
      elif s.kind == "norm":   # ours: alpha not divided by n; torch divides it by size
        self.layers[s.name] = nn.LocalResponseNorm(5, alpha=5 * 1e-4, beta=0.75, k=2.0)
      else:
        name = "fc8" if s.name == "logits" else s.name
        self.layers[name] = nn.Linear(c * n * n, s.features)
        if s.name != "logits":
          self.relus[s.name] = nn.ReLU()
        c, n = s.features, 1

  def forward(self, x):
    flat = False
    for s in self.specs:
      if s.kind == "conv":
        lo, hi = s.pad
        if lo != hi:
          x = F.pad(x, (lo, hi, lo, hi))
        x = self.relus[s.name](self.layers[s.name](x))
      elif s.kind == "pool":   # torch's ceil mode gives cuda-convnet's sizes here
        n = x.shape[-1]
        if -(-(n - 3) // 2) + 1 == s.out and (s.out - 1) * 2 < n:
          x = F.max_pool2d(x, 3, 2, ceil_mode=True)
        else:
          x = F.max_pool2d(F.pad(x, (0, s.pad[1], 0, s.pad[1]), value=-math.inf), 3, 2)
      elif s.kind == "norm":
        x = self.layers[s.name](x)
      else:
        if not flat:
          x, flat = x.permute(0, 2, 3, 1).flatten(1), True   # our NHWC flattening
        if s.name == "logits":
          return self.layers["fc8"](x)
        x = self.relus[s.name](self.layers[s.name](x))
        x = F.dropout(x, self.dropout_rate, self.training)
    return x

  def load_params(self, params) -> "TorchPaperNet":
    """Copy our parameters in (HWIO -> OIHW kernels, (in, out) -> (out, in))."""
    with torch.no_grad():
      for name, layer in self.layers.items():
        if name not in params:
          continue
        k = np.asarray(params[name]["kernel"], np.float32)
        k = np.transpose(k, (3, 2, 0, 1)) if k.ndim == 4 else k.T
        layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(k)))
        layer.bias.copy_(torch.from_numpy(np.asarray(params[name]["bias"], np.float32)))
    return self

  def relu_of(self, layer: str) -> nn.Module:
    """The ReLU module whose output is our activation ``layer`` (a conv or fc6/fc7)."""
    return self.relus[layer]


def train_step_fn(net: nn.Module, config, batch: int, input_size: int, num_classes: int,
                  total_steps: int = 100, channels: int = 3):
  """() -> None: one training step of ``net`` on a fixed random batch with the
  optimiser of ``config`` (sgd: momentum; adam), weight decay on kernels only
  (coupled, as optax.add_decayed_weights before the update), the config's
  learning rate (cosine decay when ``config.schedule == "cosine"``), and feature
  scale clipping of conv filters when ``config.clip_filters``."""
  torch.manual_seed(0)
  kernels = [p for p in net.parameters() if p.ndim > 1]
  others = [p for p in net.parameters() if p.ndim <= 1]
  groups = [{"params": kernels, "weight_decay": config.weight_decay},
            {"params": others, "weight_decay": 0.0}]
  if config.optimizer == "adam":
    opt = torch.optim.Adam(groups, lr=config.learning_rate)
  else:
    opt = torch.optim.SGD(groups, lr=config.learning_rate, momentum=config.momentum)
  convs = [m.weight for m in net.modules() if isinstance(m, nn.Conv2d)]
  radius = float(config.clip_radius) if config.clip_filters else 0.0
  x = torch.randn(batch, channels, input_size, input_size) * 50
  y = torch.randint(0, num_classes, (batch,))
  state = {"step": 0}

  def step():
    net.train()
    if config.schedule == "cosine":
      lr = config.learning_rate * 0.5 * (1 + math.cos(math.pi * min(state["step"], total_steps)
                                                      / total_steps))
      for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad()
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    if radius:
      with torch.no_grad():
        for w in convs:
          rms = w.square().mean(dim=(1, 2, 3), keepdim=True).sqrt()
          w.mul_(torch.clamp(radius / rms.clamp_min(1e-30), max=1.0))
    state["step"] += 1
    return None
  return step


def forward_fn(net: nn.Module, batch: int, input_size: int):
  """() -> None: one inference forward pass of ``net`` on a fixed random batch."""
  x = torch.randn(batch, 3, input_size, input_size) * 50

  def forward():
    net.eval()
    with torch.no_grad():
      net(x)
  return forward
