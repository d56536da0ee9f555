"""ZFNet and AlexNet in Flax Linen, exact to the paper's layer table (Fig. 3).

One table (``layer_table``) drives both the forward pass and the receptive
fields, so the two cannot disagree.  Sizes follow cuda-convnet's rules, which
reproduce every size in the paper:

  conv output = 1 + ceil((2p + N - k) / s)   (nothing padded top/left beyond p;
                                              the last window may run past the
                                              bottom/right edge)
  pool output = ceil((N - size) / s) + 1     (windows start at 0; ceil mode)

For ZFNet at 224x224: conv1 110, pool1 55, conv2 26, pool2 13, conv3-5 13, pool5 6.

Inputs are NHWC floats (mean-subtracted pixels); conv kernels are HWIO, dense
kernels (in, out).  ``features`` returns every named activation.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from zfnet_jax import layers

CONV_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5")
FC_NAMES = ("fc6", "fc7")
REMOVABLE = ("conv3", "conv4", "fc6", "fc7")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One row of the layer table.

  kind: "conv", "pool", "norm", "fc".  For conv/pool: ``kernel``, ``stride``,
  ``pad`` = (top/left, bottom/right) padding in pixels, ``out`` = output side.
  """
  name: str
  kind: str
  features: int = 0
  kernel: int = 1
  stride: int = 1
  pad: tuple[int, int] = (0, 0)
  out: int = 0


def conv_out(n: int, kernel: int, stride: int, pad: int) -> tuple[int, tuple[int, int]]:
  """cuda-convnet convolution: (output size, (pad_lo, pad_hi))."""
  out = 1 + -(-(2 * pad + n - kernel) // stride)
  hi = (out - 1) * stride + kernel - n - pad
  return out, (pad, max(hi, 0))


def _init(std):
  if std is None:
    return nn.initializers.he_normal()
  return nn.initializers.normal(stddev=std)


class PaperNet(nn.Module):
  """The family of Fig. 3: 5 conv (+pool/norm) layers and 3 fc layers.

  Attributes:
    num_classes: size of fc8.
    conv_features: maps of conv1..conv5.
    conv1_kernel, conv1_stride, conv1_pad, conv2_kernel, conv2_stride, conv2_pad:
      the first two layers' geometry (ZFNet 7/2/0 and 5/2/0; AlexNet 11/4/0, 5/1/2).
    fc_features: width of fc6 and fc7.
    removed: layers left out (Table 3), any of "conv3", "conv4", "fc6", "fc7".
    contrast_norm: apply contrast normalisation to layers 1 and 2.
    norm_before_pool: its place: False (ZFNet, Fig. 3: ReLU, max-pool, then
      normalisation), True (AlexNet, Krizhevsky et al. 2012, Sec. 3.5: ReLU,
      normalisation, then max-pool, so the switches are taken on normalised maps).
    lrn_k, lrn_n, lrn_alpha, lrn_beta, lrn_alpha_over_n: its constants
      (``layers.contrast_norm``; default AlexNet's k=2, n=5, alpha=1e-4, beta=0.75 with
      alpha not divided by n).
    dropout_rate: dropout after fc6 and fc7 in training.
    kernel_init_std: weights ~ N(0, std^2) (paper: 1e-2); None = He normal.
    conv1_init_std: conv1's weights ~ N(0, std^2) instead (None: as the others).
    rule: backward rule of every ReLU ("backprop", "deconvnet", "guided").
    norm_rule: backward rule of contrast normalisation ("exact", "identity").
    dtype: compute dtype (parameters stay float32).
  """
  num_classes: int = 1000
  conv_features: Sequence[int] = (96, 256, 384, 384, 256)
  conv1_kernel: int = 7
  conv1_stride: int = 2
  conv1_pad: int = 0
  conv2_kernel: int = 5
  conv2_stride: int = 2
  conv2_pad: int = 0
  fc_features: int = 4096
  removed: Sequence[str] = ()
  contrast_norm: bool = True
  norm_before_pool: bool = False
  lrn_k: float = 2.0
  lrn_n: int = 5
  lrn_alpha: float = 1e-4
  lrn_beta: float = 0.75
  lrn_alpha_over_n: bool = False
  dropout_rate: float = 0.5
  kernel_init_std: float | None = 1e-2
  conv1_init_std: float | None = None
  rule: str = "backprop"
  norm_rule: str = "exact"
  dtype: Any = jnp.float32

  # -- the layer table ------------------------------------------------------
  def layer_table(self, input_size: int) -> list[LayerSpec]:
    """Every layer in order with its geometry for a square input of this side."""
    bad = [r for r in self.removed if r not in REMOVABLE]
    if bad:
      raise ValueError(f"cannot remove {bad}; removable layers: {', '.join(REMOVABLE)}")
    geo = {"conv1": (self.conv1_kernel, self.conv1_stride, self.conv1_pad),
           "conv2": (self.conv2_kernel, self.conv2_stride, self.conv2_pad),
           "conv3": (3, 1, 1), "conv4": (3, 1, 1), "conv5": (3, 1, 1)}
    table, n = [], input_size
    for name, feats in zip(CONV_NAMES, self.conv_features):
      if name in self.removed:
        continue
      k, s, p = geo[name]
      n, pad = conv_out(n, k, s, p)
      if n < 1:
        raise ValueError(f"input size {input_size} is too small: {name} has no output")
      table.append(LayerSpec(name, "conv", feats, k, s, pad, n))
      if name in ("conv1", "conv2", "conv5"):
        idx = name[-1]
        norm = self.contrast_norm and name != "conv5"
        if norm and self.norm_before_pool:
          table.append(LayerSpec(f"norm{idx}", "norm", feats, 1, 1, (0, 0), n))
        hi = layers.ceil_pool_padding(n, 3, 2)
        n = -(-(n - 3) // 2) + 1 if n >= 3 else 1
        table.append(LayerSpec(f"pool{idx}", "pool", feats, 3, 2, (0, hi), n))
        if norm and not self.norm_before_pool:
          table.append(LayerSpec(f"norm{idx}", "norm", feats, 1, 1, (0, 0), n))
    for name in FC_NAMES:
      if name not in self.removed:
        table.append(LayerSpec(name, "fc", self.fc_features))
    table.append(LayerSpec("logits", "fc", self.num_classes))
    return table

  # -- forward ----------------------------------------------------------------
  @nn.compact
  def features(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """(N, H, W, C) images -> {layer name: activation}.

    conv*, fc6, fc7 are after their ReLU (fc before dropout); pool*, norm* as
    named; ``logits`` is fc8's output.  Pool switches are sown into the
    "switches" collection when it is mutable.
    """
    if x.ndim != 4 or x.shape[1] != x.shape[2]:
      raise ValueError(f"expected square NHWC images (N, S, S, C), got shape {x.shape}")
    out = {}
    x = x.astype(self.dtype)
    for spec in self.layer_table(x.shape[1]):
      if spec.kind == "conv":
        pad = (spec.pad, spec.pad)
        std = self.kernel_init_std
        if spec.name == "conv1" and self.conv1_init_std is not None:
          std = self.conv1_init_std
        x = nn.Conv(spec.features, (spec.kernel, spec.kernel), (spec.stride, spec.stride),
                    padding=pad, dtype=self.dtype, kernel_init=_init(std),
                    bias_init=nn.initializers.zeros, name=spec.name)(x)
        x = layers.relu(x, self.rule)
      elif spec.kind == "pool":
        if self.is_mutable_collection("switches"):
          x, switches = layers.max_pool_and_switches(x, 3, 2)
          self.sow("switches", spec.name, switches, reduce_fn=lambda _, b: b,
                   init_fn=lambda: None)
        else:
          x = layers.max_pool(x, 3, 2)
      elif spec.kind == "norm":
        x = contrast_norm_fn(self)(x)
      elif spec.name == "logits":
        x = nn.Dense(spec.features, dtype=self.dtype, kernel_init=_init(self.kernel_init_std),
                     bias_init=nn.initializers.zeros, name="fc8")(x.reshape(x.shape[0], -1))
      else:
        x = nn.Dense(spec.features, dtype=self.dtype, kernel_init=_init(self.kernel_init_std),
                     bias_init=nn.initializers.zeros, name=spec.name)(x.reshape(x.shape[0], -1))
        x = layers.relu(x, self.rule)
        out[spec.name] = x
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        continue
      out[spec.name] = x
    return out

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """(N, H, W, C) images -> (N, num_classes) logits."""
    return self.features(x, train)["logits"]


def contrast_norm_fn(model: PaperNet) -> Callable[[jax.Array], jax.Array]:
  """The model's contrast normalisation (its constants and ``norm_rule``) as a function."""
  return functools.partial(layers.contrast_norm, k=model.lrn_k, n=model.lrn_n,
                           alpha=model.lrn_alpha, beta=model.lrn_beta,
                           norm_rule=model.norm_rule, alpha_over_n=model.lrn_alpha_over_n)


class ZFNet(PaperNet):
  """ZFNet (Fig. 3): conv1 7x7/2, conv2 5x5/2, dense conv3-5."""


class AlexNet(PaperNet):
  """Single-tower AlexNet as the paper compares: conv1 11x11/4, conv2 5x5/1 pad 2, and
  Krizhevsky's order: response normalisation before max-pooling in layers 1 and 2."""
  norm_before_pool: bool = True
  conv1_kernel: int = 11
  conv1_stride: int = 4
  conv2_kernel: int = 5
  conv2_stride: int = 1
  conv2_pad: int = 2


class ZFNetLowRes(ZFNet):
  """ZFNet's topology with smaller widths for low-resolution inputs (the quickstart).

  Sizes at 64x64 (and at 32x32 with conv1 7x7/1 pad 2, as the quickstart runs it):
  conv1 30, pool1 15, conv2 6, pool2 3, conv3-5 3, pool5 1.
  """
  conv_features: Sequence[int] = (32, 64, 96, 96, 64)
  fc_features: int = 256
  kernel_init_std: float | None = None


class AlexNetLowRes(AlexNet):
  """AlexNet's topology at the quickstart's size (for Fig. 6 comparisons)."""
  conv_features: Sequence[int] = (32, 64, 96, 96, 64)
  fc_features: int = 256
  kernel_init_std: float | None = None


MODELS: dict[str, Callable[..., PaperNet]] = {
    "ZFNet": ZFNet, "AlexNet": AlexNet,
    "ZFNetLowRes": ZFNetLowRes, "AlexNetLowRes": AlexNetLowRes,
}


def create_model(name: str, **kwargs) -> PaperNet:
  """Build a model by name (``MODELS``) with constructor overrides."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")
  return MODELS[name](**kwargs)


def summary(model: PaperNet, input_size: int, channels: int = 3) -> str:
  """A text table: layer, output shape, parameters."""
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                jnp.zeros((1, input_size, input_size, channels))))
  params = variables["params"]
  feats = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, input_size, input_size, channels)),
                                              method="features"), variables)
  rows = [f"{'layer':<8} {'output':>18} {'params':>12}"]
  total = 0
  for spec in model.layer_table(input_size):
    pname = "fc8" if spec.name == "logits" else spec.name
    n = count_params(params.get(pname, {}))
    total += n
    rows.append(f"{spec.name:<8} {str(tuple(feats[spec.name].shape[1:])):>18} {n:>12,}")
  rows.append(f"{'total':<8} {'':>18} {total:>12,}")
  return "\n".join(rows)


@dataclasses.dataclass(frozen=True)
class ReceptiveField:
  """Input-space window of a unit: unit (i, j) sees rows
  [offset + i * stride, offset + i * stride + size) (and the same for columns),
  clipped to the image.  ``offset`` is negative where padding lies top/left."""
  size: int
  stride: int
  offset: int

  def window(self, i: int, j: int, input_size: int) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1) of unit (i, j), clipped to the image."""
    r0, c0 = self.offset + i * self.stride, self.offset + j * self.stride
    clip = lambda v: min(max(v, 0), input_size)
    return clip(r0), clip(r0 + self.size), clip(c0), clip(c0 + self.size)


def receptive_fields(model: PaperNet, input_size: int) -> dict[str, ReceptiveField]:
  """Receptive field of every spatial layer, from the layer table.

  Composition rule per layer (kernel k, stride s, top/left pad p):
  size += (k - 1) * jump; offset -= p * jump; jump *= s.
  """
  size, jump, offset, out = 1, 1, 0, {}
  for spec in model.layer_table(input_size):
    if spec.kind == "fc":
      break
    if spec.kind in ("conv", "pool"):
      size += (spec.kernel - 1) * jump
      offset -= spec.pad[0] * jump
      jump *= spec.stride
    out[spec.name] = ReceptiveField(size, jump, offset)
  return out


# ----------------------------------------------------------------------------
# Layer introspection: for anything with ``layer_table(input_size)`` (our
# models, and ``deconv.Network`` for any other CNN).
# ----------------------------------------------------------------------------

def layer_shapes(model, input_size: int) -> dict[str, tuple[int, int, int]]:
  """{layer name: (rows, cols, channels)} of every activation; fc layers are (1, 1, units)."""
  return {s.name: (1, 1, s.features) if s.kind == "fc" else (s.out, s.out, s.features)
          for s in model.layer_table(input_size)}


def layer_names(model, input_size: int) -> list[str]:
  """Every named activation of ``features``, in order."""
  return [s.name for s in model.layer_table(input_size)]


def spatial_layers(model, input_size: int) -> dict[str, int]:
  """{name: maps} of every conv/pool/norm layer (not fc) at this input size."""
  return {s.name: s.features for s in model.layer_table(input_size) if s.kind != "fc"}


def check_layer(model, input_size: int, layer: str, what: str = "layer", *,
                spatial: bool = False) -> str:
  """ValueError unless ``layer`` is an activation of the model (a spatial one if asked)."""
  names = list(spatial_layers(model, input_size)) if spatial else layer_names(model, input_size)
  if not isinstance(layer, str) or layer not in names:
    raise ValueError(f"unknown {what} {layer!r}; allowed: {', '.join(names)}")
  return layer


def check_channels(model, input_size: int, layer: str, channels: Sequence[int],
                   what: str = "channel") -> list[int]:
  """ValueError unless every channel is in [0, maps (or units) of ``layer``)."""
  n = layer_shapes(model, input_size)[check_layer(model, input_size, layer)][2]
  bad = [c for c in channels if isinstance(c, bool) or int(c) != c or not 0 <= int(c) < n]
  if bad:
    raise ValueError(f"{what} {list(bad)} out of range for {layer}: allowed 0..{n - 1}")
  return [int(c) for c in channels]


def count_params(tree) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))


def validate(model_config) -> None:
  """ValueError naming the first impossible ``config.model`` value and what is allowed."""
  m = model_config
  if m.name in IMPORTED:
    if not 0.0 <= m.dropout_rate < 1.0:
      raise ValueError(f"model.dropout_rate={m.dropout_rate!r}; allowed: 0 <= x < 1")
    return
  if m.name not in MODELS:
    raise ValueError(f"model.name={m.name!r}; allowed: {', '.join(MODELS)}, or for imported "
                     f"weights {', '.join(IMPORTED)}")
  if len(m.conv_features) != 5 or not all(isinstance(f, int) and f > 0 for f in m.conv_features):
    raise ValueError(f"model.conv_features={tuple(m.conv_features)!r}; allowed: 5 positive ints")
  if not (isinstance(m.fc_features, int) and not isinstance(m.fc_features, bool)
          and m.fc_features > 0):
    raise ValueError(f"model.fc_features={m.fc_features!r}; allowed: a positive number")
  bad = [r for r in m.removed if r not in REMOVABLE]
  if bad:
    raise ValueError(f"model.removed has {bad}; allowed: {', '.join(REMOVABLE)}")
  if not 0.0 <= m.dropout_rate < 1.0:
    raise ValueError(f"model.dropout_rate={m.dropout_rate!r}; allowed: 0 <= x < 1")
  for key, low in (("conv1_kernel", 1), ("conv1_stride", 1), ("conv1_pad", 0)):
    v = m.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
      raise ValueError(f"model.{key}={v!r}; allowed: an int >= {low} (or None: the model's own)")
  geo = MODELS[m.name]
  kernel = m.get("conv1_kernel") or geo.conv1_kernel
  pad = m.get("conv1_pad") if m.get("conv1_pad") is not None else geo.conv1_pad
  if pad >= kernel:
    raise ValueError(f"model.conv1_pad={pad!r} with conv1_kernel={kernel}; allowed: "
                     f"0 <= pad < kernel")
  if not (isinstance(m.lrn_n, int) and not isinstance(m.lrn_n, bool) and m.lrn_n >= 1):
    raise ValueError(f"model.lrn_n={m.lrn_n!r}; allowed: a positive int (maps in the window)")
  for name, low in (("lrn_k", "> 0"), ("lrn_alpha", ">= 0"), ("lrn_beta", ">= 0")):
    v = m[name]
    ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and
          (v > 0 if low == "> 0" else v >= 0))
    if not ok:
      raise ValueError(f"model.{name}={v!r}; allowed: a finite number {low}")


def from_config(model_config, num_classes: int) -> PaperNet:
  """Build the model a ``config.model`` section describes."""
  kwargs = dict(model_config)
  name = kwargs.pop("name")
  if name in IMPORTED:     # torchvision's layout: only these options apply
    return IMPORTED[name](num_classes=num_classes, dropout_rate=kwargs["dropout_rate"],
                          dtype=jnp.dtype(kwargs.get("dtype", "float32")))
  kwargs["dtype"] = jnp.dtype(kwargs.get("dtype", "float32"))
  for key in ("conv1_kernel", "conv1_stride", "conv1_pad"):
    if kwargs.get(key) is None:     # the model's own first layer
      kwargs.pop(key, None)
  kwargs["conv_features"] = tuple(kwargs["conv_features"])
  kwargs["removed"] = tuple(kwargs["removed"])
  return create_model(name, num_classes=num_classes, **kwargs)


# ----------------------------------------------------------------------------
# torchvision's AlexNet and VGG16, for ImageNet weights (``zfnet_jax.convert``).
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


# config.model.name of the models that take imported weights (``zfnet_jax.convert``).
IMPORTED: dict[str, type[TorchvisionNet]] = {"TorchvisionAlexNet": TorchvisionAlexNet,
                                             "VGG16": VGG16}
