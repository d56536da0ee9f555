"""The way down, stage by stage (paper Fig. 1): every intermediate signal of a
projection, and the switches as data.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from zfnet_jax import xla
from zfnet_jax.deconv import rewrite
from zfnet_jax.deconv.checks import (
  _check_channel,
  _check_layer,
  _check_position,
  check_images,
)
from zfnet_jax.deconv.networks import Network
from zfnet_jax.deconv.projection import AVGPOOL, _broadcast_position, _plan, _select
from zfnet_jax.nn import geometry, layers, models, rules, torchvision

# ----------------------------------------------------------------------------
# The way down, stage by stage (Fig. 1).
# ----------------------------------------------------------------------------

class Stage(NamedTuple):
  """One stage of a walk-through.

  name: "<layer>: <step>", e.g. "conv3: rectify".
  layer: the layer whose step it undoes; step: "unit" (the one non-zero activation),
    "rectify", "filter", "unpool" or "normalise" (contrast normalisation's VJP).
  signal: float32 (H, W, C) after the step (fc layers: (1, 1, units)); the last
    stage's signal is the pixel projection (S, S, C).
  switches: unpool stages only: int32 (Ho, Wo, C, 2), the input (row, col) of each
    pool window's maximum, recorded on the way up; else None.
  position: the "unit" stage only: the unit's (row, col); else None.
  """
  name: str
  layer: str
  step: str
  signal: np.ndarray
  switches: np.ndarray | None = None
  position: tuple[int, int] | None = None


def walkthrough(model, variables, image, *, layer: str, channel: int,
                position: tuple[int, int] | None = None,
                rule: str = "deconvnet") -> list[Stage]:
  """Every intermediate signal of ``project`` for one unit of one image (paper Sec. 2.1).

  From the unit's own activation (all others of ``layer`` zeroed), each layer below
  is undone in turn: a conv or fc layer by "rectify" (its ReLU's backward ``rule``)
  then "filter" (transposed filters, no bias); a max-pool by "unpool" through its
  switches; contrast normalisation by "normalise" (the model's ``norm_rule`` VJP).
  Any other Network (``from_features``): the signal arriving at each of its named
  layers below (step "signal"), then the pixels (step "projection").

  Args:
    model: one of our models (a ``PaperNet``), torchvision's AlexNet or VGG16 as
      ``convert.from_torchvision`` gives them, or any ``Network``.
    image: (S, S, C) or (1, S, S, C) float, mean-subtracted.
    layer, channel, position, rule: as ``project`` (position None: the strongest
      activation of the map).
  Returns:
    [Stage], top to bottom; the last stage's signal equals ``project(...)[0]``.
  """
  rules.get(rule)
  module = model.module if isinstance(model, Network) else model
  if isinstance(model, Network) and not isinstance(
      module, (models.PaperNet, torchvision.TorchvisionNet)):
    return _walk_network(model, variables, image, layer, channel, position, rule)
  if not isinstance(module, (models.PaperNet, torchvision.TorchvisionNet)):
    raise ValueError(f"walkthrough needs one of our models, torchvision's AlexNet or VGG16 "
                     f"from convert, or a Network; got {type(module).__name__}")
  x = image[None] if np.ndim(image) == 3 else image
  if getattr(x, "ndim", np.ndim(x)) != 4 or np.shape(x)[0] != 1:
    raise ValueError(f"image must be (S, S, C) or (1, S, S, C), got shape {np.shape(image)}")
  x = jnp.asarray(x)
  check_images(module, variables, x, "image")
  shape = _check_layer(module, x.shape[1], layer)
  _check_channel(layer, shape, channel)
  _check_position(layer, shape, position)
  model = module.clone(rule=rule)
  positions, strongest_ = _broadcast_position(position, 1)
  signals, pos, switch_pos = jax.device_get(_walk(
      model, variables, x, jnp.asarray([channel], jnp.int32), positions, strongest_,
      layer=layer))
  out = lambda a: np.asarray(a, np.float32).reshape((1, 1, -1) if a.ndim == 2 else a.shape[1:])
  stages = [Stage(f"{layer}: unit", layer, "unit", out(signals[0]),
                  position=tuple(int(v) for v in pos[0]))]
  for (spec, step), r in zip(_plan(model, x.shape[1], layer), signals[1:]):
    sw = np.asarray(switch_pos[spec.name], np.int32) if step == "unpool" else None
    stages.append(Stage(f"{spec.name}: {step}", spec.name, step, out(r), sw))
  return stages


def _walk_network(net: Network, variables, image, layer, channel, position, rule):
  """``walkthrough`` of any Network: the unit, then the signal arriving at each named layer
  below it (step "signal", in the order the forward pass makes them, reversed), then the
  pixels (step "projection"); ReLUs and max-pools as ``rewrite.deconvnet_transform``
  finds them (ValueError naming a construct it cannot rewrite)."""
  x = image[None] if np.ndim(image) == 3 else image
  if np.ndim(x) != 4 or np.shape(x)[0] != 1:
    raise ValueError(f"image must be (S, S, C) or (1, S, S, C), got shape {np.shape(image)}")
  x = jnp.asarray(x, jnp.float32)
  shape = _check_layer(net, x.shape[1], layer)
  _check_channel(layer, shape, channel)
  _check_position(layer, shape, position)
  probed, order, feats = rewrite.with_probes(lambda z: net.features(variables, z), x)
  below = order[:order.index(layer)] if layer in order else []
  eps = {n: jnp.zeros(feats[n].shape, feats[n].dtype) for n in below}
  try:
    g = rewrite.deconvnet_transform(lambda z, e: probed(z, e)[layer], rule)
    act, vjp = jax.vjp(g, x, eps)
  except rewrite.UnsupportedConstructError as e:
    raise ValueError(f"no walk-through of {net.name}: {e}") from None
  act4 = act.reshape(1, 1, 1, -1) if act.ndim == 2 else act
  positions, strongest_ = _broadcast_position(position, 1)
  r, pos, _ = _select(act4, jnp.asarray([channel], jnp.int32), positions, strongest_)
  pixels, arriving = vjp(r.reshape(act.shape).astype(act.dtype))
  out = lambda a: np.asarray(a, np.float32).reshape((1, 1, -1) if a.ndim == 2 else a.shape[1:])
  return ([Stage(f"{layer}: unit", layer, "unit", out(r),
                 position=tuple(int(v) for v in np.asarray(pos)[0]))] +
          [Stage(f"{n}: signal", n, "signal", out(arriving[n])) for n in reversed(below)] +
          [Stage("input: projection", "input", "projection", out(pixels))])


def _pool_args(model, spec: geometry.LayerSpec):
  """(window, strides, padding) of a pool of ``model`` in NHWC: ceil mode for ours,
  floor mode (no padding) for torchvision's."""
  if isinstance(model, torchvision.TorchvisionNet):
    k, s = spec.kernel, spec.stride
    return (1, k, k, 1), (1, s, s, 1), ((0, 0),) * 4
  return None


@functools.partial(xla.jit, static_argnames=("model", "layer"))
def _walk(model, variables, x, channels, positions, strongest_, layer):
  """([signal after each step], (1, 2) unit position, {pool: (Ho, Wo, C, 2) switches})."""
  feats, state = model.apply(variables, x, method="features", mutable=["switches"])
  names = list(feats)
  act = feats[layer]
  act4 = act.reshape(1, 1, 1, -1) if act.ndim == 2 else act
  r, pos, _ = _select(act4, channels, positions, strongest_)
  signals, switch_pos, r = [r], {}, r.reshape(act.shape)
  vjp = lambda fn, at, z: jax.vjp(fn, at)[1](z)[0]
  pooled = lambda z: layers.adaptive_avg_pool(z, (model.pool_size,) * 2)
  for spec, step in _plan(model, x.shape[1], layer):
    if spec.name == AVGPOOL:
      below = feats[names[names.index("fc6") - 1]]
    else:
      below = feats[names[names.index(spec.name) - 1]] if spec.name != names[0] else x
    if spec.name == "fc6" and isinstance(model, torchvision.TorchvisionNet):
      below = pooled(below)   # fc6 reads the adaptive average pool of the last map
    if step == "rectify":    # feats[name] > 0 exactly where the ReLU's input is
      r = vjp(functools.partial(layers.relu, rule=model.rule), feats[spec.name], r)
    elif step == "filter":
      r = vjp(_layer_fn(spec, variables["params"], model.dtype), below.astype(model.dtype), r)
    elif step == "average":
      r = vjp(pooled, below, r)
    elif step == "unpool" and _pool_args(model, spec):
      args = _pool_args(model, spec)
      sw = layers.general_switches(below, *args)
      r = layers.general_unpool(r, sw, below.shape, *args)
      switch_pos[spec.name] = layers.switch_positions(sw, spec.kernel, spec.stride)[0]
    elif step == "unpool":
      sw = state["switches"][spec.name]
      r = layers.unpool(r, sw, below.shape)
      switch_pos[spec.name] = layers.switch_positions(sw)[0]
    else:
      r = vjp(models.contrast_norm_fn(model), below, r)
    signals.append(r)
  return signals, pos, switch_pos


def _layer_fn(spec: geometry.LayerSpec, params, dtype) -> Callable:
  """The linear part (no bias) of a conv or fc layer: its VJP is the "filter" step."""
  kernel = params["fc8" if spec.name == "logits" else spec.name]["kernel"].astype(dtype)
  if spec.kind == "fc":
    return lambda z: z.reshape(z.shape[0], -1) @ kernel
  return lambda z: lax.conv_general_dilated(z, kernel, (spec.stride, spec.stride),
                                            (spec.pad, spec.pad),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))


# ----------------------------------------------------------------------------
# Switches as data.
# ----------------------------------------------------------------------------

def switches(model: models.PaperNet, variables, images: jax.Array) -> dict[str, jax.Array]:
  """{pool name: int32 (N, Ho, Wo, C, 2)}: input (row, col) of each window's max.

  Ties go to the first maximum in row-major order within the window; padded
  positions (ceil-mode windows past the bottom/right edge) are never chosen.
  """
  check_images(model, variables, images)
  return _switches(model, variables, images)


@functools.partial(xla.jit, static_argnames=("model",))
def _switches(model, variables, images):
  _, state = model.apply(variables, images, method="features", mutable=["switches"])
  return {name: layers.switch_positions(s, 3, 2)
          for name, s in state["switches"].items()}

