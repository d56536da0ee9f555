"""torchvision's AlexNet and VGG16 in Flax, for ImageNet weights (``nn.convert``).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zfnet_jax.nn import layers
from zfnet_jax.nn.geometry import LayerSpec

# ----------------------------------------------------------------------------
# torchvision's AlexNet and VGG16, for ImageNet weights (``zfnet_jax.nn.convert``).
# ----------------------------------------------------------------------------

class TorchvisionNet(nn.Module):
  """torchvision's layout: convs (each with a ReLU) and floor-mode max-pools, an
  ``AdaptiveAvgPool2d`` to ``pool_size`` (so any input size large enough for the
  convs works), then fc6, fc7 (ReLU, dropout 0.5 in training) and the logits.

  Input: (N, H, W, 3) RGB images as torchvision's transforms give them (scaled to
  [0, 1], minus its mean, divided by its std), NHWC.  ``features`` names every
  conv (after its ReLU), pool, fc6/fc7 (after the ReLU, before dropout) and
  ``logits``.  Parameters: one per conv (HWIO kernels), fc6 (rows in the (H, W, C)
  order of the pooled map), fc7, fc8 (the logits).

  Attributes:
    num_classes: size of the logits.
    dropout_rate: dropout where torchvision has it, in training only.
    rule: backward rule of every ReLU ("backprop", "deconvnet", "guided").
    dtype: compute dtype (parameters stay float32).
  """
  num_classes: int = 1000
  dropout_rate: float = 0.5
  rule: str = "backprop"
  dtype: Any = jnp.float32

  # (name, kind, maps, kernel, stride, pad) of the conv stack; class constants.
  arch = ()
  pool_size = 6
  fc_features = 4096
  dropout_before_fc6 = True   # AlexNet: dropout before fc6 and fc7; VGG: before fc7 and fc8
  adaptive_pool = True        # fc6's input size does not depend on the input size

  def layer_table(self, input_size: int) -> list[LayerSpec]:
    """Every named layer in order with its geometry for a square input of this side."""
    table, n, maps = [], input_size, 0
    for name, kind, feats, k, s, p in self.arch:
      n = (n + 2 * p - k) // s + 1
      if n < 1:
        raise ValueError(f"input size {input_size} is too small: {name} has no output")
      maps = feats or maps
      table.append(LayerSpec(name, kind, maps, k, s, (p, p), n))
    table += [LayerSpec("fc6", "fc", self.fc_features), LayerSpec("fc7", "fc", self.fc_features),
              LayerSpec("logits", "fc", self.num_classes)]
    return table

  @nn.compact
  def features(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """(N, S, S, 3) normalised images -> {layer name: activation}."""
    if x.ndim != 4 or x.shape[1] != x.shape[2]:
      raise ValueError(f"expected square NHWC images (N, S, S, C), got shape {x.shape}")
    out = {}
    x = x.astype(self.dtype)
    for spec in self.layer_table(x.shape[1]):
      k, s = spec.kernel, spec.stride
      if spec.kind == "conv":
        x = layers.relu(nn.Conv(spec.features, (k, k), (s, s), padding=(spec.pad, spec.pad),
                                dtype=self.dtype, name=spec.name)(x), self.rule)
      elif spec.kind == "pool":
        x = layers.general_max_pool(x, (1, k, k, 1), (1, s, s, 1), ((0, 0),) * 4)
      else:
        break
      out[spec.name] = x
    drop = lambda h: nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    x = layers.adaptive_avg_pool(x, (self.pool_size, self.pool_size)).reshape(x.shape[0], -1)
    if self.dropout_before_fc6:
      x = drop(x)
    for name in ("fc6", "fc7"):
      x = layers.relu(nn.Dense(self.fc_features, dtype=self.dtype, name=name)(x), self.rule)
      out[name] = x
      if name == "fc6" or not self.dropout_before_fc6:
        x = drop(x)
    out["logits"] = nn.Dense(self.num_classes, dtype=self.dtype, name="fc8")(x)
    return out

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """(N, S, S, 3) normalised images -> (N, num_classes) logits."""
    return self.features(x, train)["logits"]


def _conv(name, maps, kernel=3, stride=1, pad=1):
  return (name, "conv", maps, kernel, stride, pad)


def _pool(name, kernel, stride):
  return (name, "pool", 0, kernel, stride, 0)


class TorchvisionAlexNet(TorchvisionNet):
  """torchvision's ``alexnet()`` (the one-tower variant of Krizhevsky et al. 2014):
  conv1 11x11/4 pad 2 (64 maps), pool1 3x3/2, conv2 5x5 pad 2 (192), pool2,
  conv3-5 3x3 pad 1 (384, 256, 256), pool5, adaptive average pool to 6x6.

  Sizes at 224x224: conv1 55, pool1 27, conv2 27, pool2 13, conv3-5 13, pool5 6.
  """
  arch = (_conv("conv1", 64, 11, 4, 2), _pool("pool1", 3, 2), _conv("conv2", 192, 5, 1, 2),
          _pool("pool2", 3, 2), _conv("conv3", 384), _conv("conv4", 256), _conv("conv5", 256),
          _pool("pool5", 3, 2))
  pool_size = 6
  dropout_before_fc6 = True


def _vgg_arch(blocks):
  arch = []
  for b, (maps, convs) in enumerate(blocks, 1):
    arch += [_conv(f"conv{b}_{i}", maps) for i in range(1, convs + 1)]
    arch.append(_pool(f"pool{b}", 2, 2))
  return tuple(arch)


class VGG16(TorchvisionNet):
  """torchvision's ``vgg16()`` (configuration D of Simonyan & Zisserman, no batch
  norm): conv1_1 .. conv5_3 (3x3 pad 1; 64, 128, 256, 512, 512 maps), pool1 ..
  pool5 (2x2/2), adaptive average pool to 7x7.  Sizes at 224: pool1 112 .. pool5 7.
  """
  arch = _vgg_arch(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)))
  pool_size = 7
  dropout_before_fc6 = False


# config.model.name of the models that take imported weights (``zfnet_jax.nn.convert``).

IMPORTED: dict[str, type[TorchvisionNet]] = {"TorchvisionAlexNet": TorchvisionAlexNet,
                                             "VGG16": VGG16}

