"""ZFNet and AlexNet in Flax Linen, exact to the paper's layer table (Fig. 3).

One table (``layer_table``, see ``nn.geometry``) drives both the forward pass and the
receptive fields, so the two cannot disagree.  Sizes follow cuda-convnet's rules, which
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

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from zfnet_jax.nn import layers
from zfnet_jax.nn.geometry import CONV_NAMES, FC_NAMES, REMOVABLE, LayerSpec, conv_out
from zfnet_jax.nn.torchvision import IMPORTED


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

