"""The deconvnet of Zeiler & Fergus (Sec. 2.1) as VJPs with custom rules.

To project one activation back to pixels: run the image forward, zero every
other activation of that layer, and go down starting from the activation's own
value (as the paper does, not from 1).  Going down is the VJP of the forward
pass with the rule versions of the layers (``zfnet_jax.layers``):

* max-pool unpools through the switches recorded on the way up (ties: first
  maximum in row-major order within the window);
* ReLU passes relu(R) ("deconvnet"), R * 1[X > 0] ("backprop", the gradient)
  or R * 1[X > 0] * 1[R > 0] ("guided");
* convolution goes down with its transposed (flipped) filters and no bias,
  which is exactly its VJP;
* contrast normalisation goes down with its exact VJP (``norm_rule="exact"``).

Our models switch rule by ``model.clone(rule=...)``;
``rewrite.deconvnet_transform`` does the same for any JAX function (Flax Linen,
NNX, pure JAX) by rewriting its jaxpr.  ``Network`` is how the analyses see a
CNN, ours (``network(model)``) or any other (``from_features``).

Layer names are those of ``PaperNet.features``; fc layers (fc6, fc7, logits)
count as 1x1 maps, so for them ``channel`` is the unit and the only position is
(0, 0).  ``position=None`` takes the strongest activation of the map in each
image (ties: first in row-major order).  All arrays are NHWC.
"""
from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from zfnet_jax import console
from zfnet_jax import conv
from zfnet_jax import layers
from zfnet_jax import models
from zfnet_jax import rewrite

RULES = layers.RULES


# ----------------------------------------------------------------------------
# Validation (before any computation).
# ----------------------------------------------------------------------------

def _check_images(images, what="images"):
  shape = getattr(images, "shape", None)
  if shape is None or len(shape) != 4 or shape[1] != shape[2]:
    raise ValueError(f"{what} must be square NHWC (N, S, S, C), got shape {shape}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"{what} must be floating point (mean-subtracted pixels), "
                     f"got dtype {images.dtype}")


MAX_ABS_PIXEL = 255.0  # mean-subtracted 0..255 pixels lie in [-255, 255]


def check_images(model: models.PaperNet, variables, images, what="images"):
  """ValueError unless ``images`` fit the model: (N, S, S, C) float, C the model's
  input channels, S the size its fc layers were built for (any size that fits the
  convs for a model with an adaptive pool before fc6), and (when not traced)
  finite mean-subtracted pixels in [-255, 255]."""
  _check_images(images, what)
  params = variables.get("params", {}) if hasattr(variables, "get") else {}
  kernel = params.get("conv1", {}).get("kernel") if hasattr(params, "get") else None
  size, channels = images.shape[1], images.shape[3]
  if kernel is not None and kernel.shape[2] != channels:
    raise ValueError(f"{what} have {channels} channels; the model takes {kernel.shape[2]} "
                     f"(shape {tuple(images.shape)})")
  fc = next((params[n]["kernel"] for n in ("fc6", "fc7", "fc8") if n in params), None)
  if fc is not None and not getattr(model, "adaptive_pool", False):
    try:
      h, w, c = models.layer_shapes(model, size)["pool5"]
      ok = h * w * c == fc.shape[0]
    except Exception:  # pylint: disable=broad-except  (too small for the layer table)
      ok = False
    if not ok:
      raise ValueError(f"{what} are {size}x{size}, not the input size the model's "
                       f"parameters were trained for (fc input {fc.shape[0]} features)")
  if not isinstance(images, jax.core.Tracer):
    x = np.asarray(images)
    if not np.isfinite(x).all():
      raise ValueError(f"{what} contain NaN or infinite values")
    top = float(np.abs(x).max()) if x.size else 0.0
    if top > MAX_ABS_PIXEL * 1.01:
      raise ValueError(f"{what} have values up to {top:.4g}; allowed: mean-subtracted "
                       f"pixels (0..255 minus the pixel mean), within +-{MAX_ABS_PIXEL:g}")


def _check_layer(model, input_size, layer):
  shapes = models.layer_shapes(model, input_size)
  if not isinstance(layer, str) or layer not in shapes:
    raise ValueError(f"unknown layer {layer!r}; allowed: {', '.join(shapes)}")
  return shapes[layer]


def _check_channel(layer, shape, channel):
  c = shape[2]
  if isinstance(channel, (bool, np.bool_)) or not isinstance(channel, (int, np.integer)):
    raise ValueError(f"channel must be an int, got {channel!r}")
  if not 0 <= channel < c:
    raise ValueError(f"channel {channel} out of range for layer {layer!r}: "
                     f"allowed 0..{c - 1}")


def _check_position(layer, shape, position):
  if position is None:
    return
  try:
    row, col = (int(v) for v in position)
    ok = all(float(v) == int(v) for v in position)
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f"position must be None or (row, col) ints, got {position!r}")
  if not (0 <= row < shape[0] and 0 <= col < shape[1]):
    raise ValueError(f"position {(row, col)} outside the {shape[0]}x{shape[1]} map of "
                     f"layer {layer!r}: allowed rows 0..{shape[0] - 1}, "
                     f"cols 0..{shape[1] - 1}")


# ----------------------------------------------------------------------------
# The projection core: one forward per image, one VJP with one-hot cotangents.
# ----------------------------------------------------------------------------

def _select(act, channels, positions, strongest):
  """One-hot cotangent holding each image's selected activation.

  act: (N, H, W, C); channels (N,); positions (N, 2); strongest (N,) bool.
  Returns (cotangent like act, positions used (N, 2), values (N,)).
  """
  n, h, w, c = act.shape
  maps = jnp.take_along_axis(act, channels[:, None, None, None], axis=3)[..., 0]
  flat = jnp.where(strongest, jnp.argmax(maps.reshape(n, h * w), axis=1),
                   positions[:, 0] * w + positions[:, 1])
  spatial = jax.nn.one_hot(flat, h * w, dtype=act.dtype).reshape(n, h, w, 1)
  ct = spatial * jax.nn.one_hot(channels, c, dtype=act.dtype)[:, None, None, :] * act
  values = jnp.take_along_axis(maps.reshape(n, h * w), flat[:, None], axis=1)[:, 0]
  return ct, jnp.stack([flat // w, flat % w], axis=1), values


def _project_core(fn, images, channels, positions, strongest):
  """Projection through ``fn`` (images -> activation (N,H,W,C) or (N,U))."""
  act, vjp_fn = jax.vjp(fn, images)
  act4 = act.reshape(act.shape[0], 1, 1, -1) if act.ndim == 2 else act
  ct, pos, values = _select(act4, channels, positions, strongest)
  (proj,) = vjp_fn(ct.reshape(act.shape))
  return proj, pos, values


@functools.partial(conv.jit, static_argnames=("model", "layer"))
def _project_batch(model, variables, images, channels, positions, strongest, layer,
                   filters=None):
  """(projections (N, S, S, C), positions (N, 2), values (N,)) of one unit per image.

  ``filters``: ``transposed_filters(variables)`` if at hand (else made here)."""
  kinds = {spec.name: spec.kind for spec in model.layer_table(images.shape[1])}
  if isinstance(model, models.PaperNet) and kinds[layer] != "fc":
    if filters is None:
      filters = _transposed_filters(variables["params"], model.dtype)
    return _project_in_field(model, variables, filters, images, channels, positions,
                             strongest, layer)
  fn = lambda x: model.apply(variables, x, method="features")[layer]
  return _project_core(fn, images, channels, positions, strongest)


def _transposed_filters(params, dtype) -> dict[str, jax.Array]:
  """{conv name: (k, k, C_out, C_in)}: each conv's filters flipped and with the maps
  swapped, the filters of its "filter" step (a convolution going down)."""
  return {name: p["kernel"][::-1, ::-1].swapaxes(2, 3).astype(dtype)
          for name, p in params.items() if name.startswith("conv")}


_transposed_filters_jit = conv.jit(_transposed_filters, static_argnums=1)
_FILTER_CACHE: dict = {}


def transposed_filters(model: models.PaperNet, variables) -> dict[str, jax.Array] | None:
  """``_transposed_filters`` of ``variables``, made once per set of parameters (they
  are immutable ``jax.Array`` s; the cache holds them weakly).  None for other
  parameters (NumPy, traced), which ``_project_batch`` then flips itself."""
  params = variables.get("params", {}) if hasattr(variables, "get") else {}
  kernels = [p["kernel"] for name, p in sorted(params.items()) if name.startswith("conv")]
  if not kernels or not all(isinstance(k, jax.Array) and not isinstance(k, jax.core.Tracer)
                            for k in kernels):
    return None
  key = (tuple(id(k) for k in kernels), jnp.dtype(model.dtype).name)
  hit = _FILTER_CACHE.get(key)
  if hit is not None and all(ref() is k for ref, k in zip(hit[0], kernels)):
    return hit[1]
  filters = _transposed_filters_jit(params, jnp.dtype(model.dtype))
  if len(_FILTER_CACHE) >= 8:
    _FILTER_CACHE.clear()
  _FILTER_CACHE[key] = ([weakref.ref(k) for k in kernels], filters)
  return filters


# ----------------------------------------------------------------------------
# Going down inside the unit's receptive field.
# ----------------------------------------------------------------------------

def _project_in_field(model, variables, filters, images, channels, positions, strongest,
                      layer):
  """``_project_batch`` for a map layer of a ``PaperNet``, computing the way down only
  inside each unit's receptive field (the rest of every map below gets no signal).

  Each step works on a window of its map: the unit itself (1x1) at the top; below a
  conv or pool (kernel k, stride s, padding lo) a window of h rows at row c feeds
  rows c*s - lo ... c*s - lo + (h - 1) * s + k - 1 of its input, clipped to the map.
  Rectify, normalise (across maps only) and unpool need only the same window of
  the features and switches recorded on the way up, so every step equals the full
  VJP's restricted to the window.  Window sizes are static; their corners follow
  each image's unit.
  """
  feats, state = model.apply(variables, images, method="features", mutable=["switches"])
  act = feats[layer]
  _, pos, values = _select(act, channels, positions, strongest)
  names = [s.name for s in model.layer_table(images.shape[1])]
  feats = {name: feats[name] for name in names[:names.index(layer) + 1]}
  switches = {name: sw for name, sw in state["switches"].items() if name in feats}
  walk = functools.partial(_walk_in_field, model, filters, layer)
  proj = jax.vmap(walk)(feats, switches, images, channels, pos, values)
  return proj, pos, values


def _slide(a, start, size: int, span: int):
  """a[start[0]:start[0] + size, start[1]:start[1] + size] for a start in [0, span]^2,
  chosen among the span + 1 static slices of each axis (elementwise; no gather)."""
  for axis in (0, 1):
    parts = [lax.slice_in_dim(a, j, j + size, axis=axis) for j in range(span + 1)]
    a = functools.reduce(lambda acc, j: jnp.where(start[axis] == j, parts[j], acc),
                         range(1, span + 1), parts[0])
  return a


def _walk_in_field(model, filters, layer, feats, switches, image, channel, pos, value):
  """One image: feats {name: (H, W, C)}, switches {pool: (Ho, Wo, C)}, image (S, S, C),
  channel and value of the unit at ``pos`` (2,) -> its projection (S, S, C)."""
  names = [s.name for s in model.layer_table(image.shape[0])]   # (a vmapped dict is sorted)
  c, h = pos, 1                                            # window corner (row, col), side
  r = (jax.nn.one_hot(channel, feats[layer].shape[-1], dtype=value.dtype) * value)[None, None]
  window = lambda a: lax.dynamic_slice(a, (c[0], c[1], 0), (h, h, a.shape[-1]))
  vjp = lambda fn, at, z: jax.vjp(fn, at)[1](z)[0]
  for spec, step in _plan(model, image.shape[0], layer):
    below = feats[names[names.index(spec.name) - 1]] if spec.name != names[0] else image
    if step == "rectify":
      r = vjp(functools.partial(layers.relu, rule=model.rule), window(feats[spec.name]), r)
    elif step == "normalise":
      r = vjp(models.contrast_norm_fn(model), window(below), r)
    else:                                                  # filter or unpool: the field grows
      k, s, (lo, hi) = spec.kernel, spec.stride, spec.pad
      e = (h - 1) * s + k                                  # input rows under the window
      if step == "filter":   # the VJP of a VALID conv: stride-dilate, pad k - 1, flipped filters
        below_r = lax.conv_general_dilated(
            r[None], filters[spec.name], (1, 1), [(k - 1, k - 1)] * 2, lhs_dilation=(s, s),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))[0]
      else:
        below_r = layers.general_unpool(r[None], window(switches[spec.name])[None],
                                        (1, e, e, r.shape[-1]), (1, k, k, 1), (1, s, s, 1),
                                        ((0, 0),) * 4)[0]
      n = below.shape[0]
      corner = c * s - lo                                  # may lie in the padding
      h_below = min(e, n)
      c_below = jnp.clip(corner, 0, n - h_below)
      # Re-frame to the clipped window; rows landing on padding drop out.
      padded = jnp.pad(below_r, ((hi, max(0, lo + h_below - e)),) * 2 + ((0, 0),))
      r = _slide(padded, c_below - corner + hi, h_below, lo + hi)
      c, h = c_below, h_below
  out = lax.dynamic_update_slice(jnp.zeros(image.shape, r.dtype), r, (c[0], c[1], 0))
  return out.astype(image.dtype)


def _broadcast_position(position, n):
  if position is None:
    return jnp.zeros((n, 2), jnp.int32), jnp.ones((n,), bool)
  return (jnp.broadcast_to(jnp.asarray(position, jnp.int32), (n, 2)),
          jnp.zeros((n,), bool))


def project(model: models.PaperNet, variables, images: jax.Array, *, layer: str,
            channel: int, position: tuple[int, int] | None = None,
            rule: str = "deconvnet") -> jax.Array:
  """Projection of one activation per image down to pixel space.

  Args:
    model: a ``PaperNet`` (its own ``rule`` is replaced by ``rule``).
    variables: {"params": ...}.
    images: (N, S, S, C) float, mean-subtracted.
    layer: a name from ``features`` ("conv1".."conv5", "pool1", "norm1", ...,
      "fc6", "fc7", "logits").
    channel: feature map (conv/pool/norm) or unit (fc) to project.
    position: (row, col) in the map, (N, 2) one per image, or None for the
      strongest activation of the map in each image (first in row-major order
      on ties).
    rule: "deconvnet" (Zeiler & Fergus), "guided" or "backprop" (gradient).
  Returns:
    (N, S, S, C) projections in the dtype of ``images`` (a VJP returns its input's
    dtype): a bfloat16 model computes the way down in bfloat16 and float32 images
    get float32 projections.  In bfloat16 a max-pool switch or a ReLU's sign can
    flip where values lie within bfloat16's precision (8 significant bits) of each
    other or of zero, so deep layers' projections can differ from float32 ones by
    more than rounding.
  Works under ``jax.jit`` (``layer``, ``channel``, ``position``, ``rule`` static).
  """
  layers.check_rule(rule)
  check_images(model, variables, images)
  shape = _check_layer(model, images.shape[1], layer)
  _check_channel(layer, shape, channel)
  n = images.shape[0]
  if position is not None and np.ndim(position) == 2:  # one (row, col) per image
    if np.shape(position) != (n, 2):
      raise ValueError(f"position must be None, (row, col) or ({n}, 2), got shape "
                       f"{np.shape(position)}")
    for p in np.asarray(position):
      _check_position(layer, shape, tuple(p))
  else:
    _check_position(layer, shape, position)
  positions, strongest = _broadcast_position(position, n)
  proj, _, _ = _project_batch(model.clone(rule=rule), variables, images,
                              jnp.full((n,), channel, jnp.int32), positions, strongest,
                              layer=layer,
                              filters=transposed_filters(model, variables))
  return proj


def strongest(model: models.PaperNet, variables, images: jax.Array, *, layer: str,
              channel: int) -> tuple[jax.Array, jax.Array]:
  """((N, 2) int (row, col), (N,) value) of the strongest activation of a map."""
  check_images(model, variables, images)
  shape = _check_layer(model, images.shape[1], layer)
  _check_channel(layer, shape, channel)
  return _strongest(model, variables, images, channel, layer=layer)


@functools.partial(conv.jit, static_argnames=("model", "layer"))
def _strongest(model, variables, images, channel, layer):
  act = model.apply(variables, images, method="features")[layer]
  act = act.reshape(act.shape[0], 1, 1, -1) if act.ndim == 2 else act
  maps = act[..., channel].reshape(act.shape[0], -1)
  flat = jnp.argmax(maps, axis=1)
  return jnp.stack([flat // act.shape[2], flat % act.shape[2]], 1), jnp.max(maps, axis=1)


def project_many(model: models.PaperNet, variables, images: jax.Array, *,
                 layer: str | Sequence[str], channels, positions=None,
                 rule: str = "deconvnet", chunk_size: int = 32,
                 progress: bool = False) -> jax.Array:
  """Many projections in one call: request r projects (images[r], layer[r],
  channels[r], positions[r]).

  Args:
    images: (R, S, S, C), one image per request (repeat an image for several
      requests on it).
    layer: one name for all requests or a sequence of R names.
    channels: (R,) ints.
    positions: (R, 2) ints (row, col), or None for the strongest activation of
      each map.  Rows of fc requests must be (0, 0).
    chunk_size: requests per jitted batch (bounds memory: one forward and one
      VJP of ``chunk_size`` images at a time).  The last chunk is padded, so
      every chunk reuses one compilation per layer.
    progress: show a progress bar over chunks.
  Returns:
    (R, S, S, C) projections in request order, in the dtype of ``images`` (as
    ``project``).
  """
  layers.check_rule(rule)
  check_images(model, variables, images)
  model = model.clone(rule=rule)
  filters = transposed_filters(model, variables)
  batch = lambda name, *args: _project_batch(model, variables, *args, layer=name,
                                             filters=filters)
  return _project_requests(batch, model, images, layer, channels, positions, chunk_size,
                           progress, rule)


def _project_requests(batch, table, images, layer, channels, positions, chunk_size, progress,
                      rule):
  """Validate requests against ``table``'s layer table, then project them by layer in
  padded chunks with ``batch(name, images, channels, positions, strongest)``."""
  r = images.shape[0]
  names = [layer] * r if isinstance(layer, str) else list(layer)
  if len(names) != r:
    raise ValueError(f"layer has {len(names)} names for {r} images; give one name or {r}")
  channels = np.asarray(channels)
  if channels.shape != (r,) or not np.issubdtype(channels.dtype, np.integer):
    raise ValueError(f"channels must be {r} ints (one per image), got shape "
                     f"{channels.shape} dtype {channels.dtype}")
  if positions is not None:
    positions = np.asarray(positions)
    if positions.shape != (r, 2) or not np.issubdtype(positions.dtype, np.integer):
      raise ValueError(f"positions must be None or ({r}, 2) ints, got shape "
                       f"{positions.shape} dtype {positions.dtype}")
  if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  for i, name in enumerate(names):
    shape = _check_layer(table, images.shape[1], name)
    _check_channel(name, shape, int(channels[i]))
    _check_position(name, shape, None if positions is None else positions[i])

  groups = {}
  for i, name in enumerate(names):
    groups.setdefault(name, []).append(i)
  chunks = [(name, idx[s:s + chunk_size]) for name, idx in groups.items()
            for s in range(0, len(idx), chunk_size)]
  chunks = console.progress(chunks, desc=f"projections ({rule})", unit="chunk",
                            disable=not progress)
  size = min(chunk_size, r)
  outs, order = [], []
  for name, idx in chunks:
    take = np.asarray(idx + [idx[-1]] * (size - len(idx)))  # pad the last chunk
    pos = (np.zeros((size, 2), np.int32) if positions is None
           else positions[take].astype(np.int32))
    proj, _, _ = batch(name, images[take], jnp.asarray(channels[take], jnp.int32),
                       jnp.asarray(pos), jnp.full((size,), positions is None))
    outs.append(proj[:len(idx)])
    order.extend(idx)
  out = jnp.concatenate(outs) if len(outs) > 1 else outs[0]
  if order != list(range(r)):
    out = out[np.argsort(np.asarray(order))]
  return out


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
  layers.check_rule(rule)
  module = model.module if isinstance(model, Network) else model
  if isinstance(model, Network) and not isinstance(
      module, (models.PaperNet, models.TorchvisionNet)):
    return _walk_network(model, variables, image, layer, channel, position, rule)
  if not isinstance(module, (models.PaperNet, models.TorchvisionNet)):
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


AVGPOOL = "avgpool"   # torchvision's adaptive average pool before fc6: step "average"


def _plan(model, input_size: int, layer: str) -> list[tuple[models.LayerSpec, str]]:
  """The steps from ``layer`` down to the pixels: [(layer spec, step)]."""
  table = model.layer_table(input_size)
  plan = []
  for spec in reversed(table[:[s.name for s in table].index(layer) + 1]):
    if spec.kind in ("conv", "fc"):
      plan += ([(spec, "rectify")] if spec.name != "logits" else []) + [(spec, "filter")]
      if spec.name == "fc6" and isinstance(model, models.TorchvisionNet):
        plan.append((models.LayerSpec(AVGPOOL, "pool"), "average"))
    else:
      plan.append((spec, "unpool" if spec.kind == "pool" else "normalise"))
  return plan


def _pool_args(model, spec: models.LayerSpec):
  """(window, strides, padding) of a pool of ``model`` in NHWC: ceil mode for ours,
  floor mode (no padding) for torchvision's."""
  if isinstance(model, models.TorchvisionNet):
    k, s = spec.kernel, spec.stride
    return (1, k, k, 1), (1, s, s, 1), ((0, 0),) * 4
  return None


@functools.partial(conv.jit, static_argnames=("model", "layer"))
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
    if spec.name == "fc6" and isinstance(model, models.TorchvisionNet):
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


def _layer_fn(spec: models.LayerSpec, params, dtype) -> Callable:
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


@functools.partial(conv.jit, static_argnames=("model",))
def _switches(model, variables, images):
  _, state = model.apply(variables, images, method="features", mutable=["switches"])
  return {name: layers.switch_positions(s, 3, 2)
          for name, s in state["switches"].items()}


# ----------------------------------------------------------------------------
# Display.
# ----------------------------------------------------------------------------

def to_image(projections) -> np.ndarray:
  """Projections -> float32 images in [0, 1] as the paper shows them.

  Each projection (each leading index of an (N, H, W, C) batch, or a single
  (H, W, C) array) is scaled on its own by its largest absolute value, with zero
  at mid-grey 0.5: 0.5 + p / (2 max|p|).  An all-zero projection is flat grey.
  """
  p = np.asarray(projections, np.float32)
  if p.ndim not in (3, 4):
    raise ValueError(f"projections must be (H, W, C) or (N, H, W, C), got shape {p.shape}")
  axes = tuple(range(p.ndim - 3, p.ndim))
  scale = np.max(np.abs(p), axis=axes, keepdims=True)
  scale = np.where(scale > 0, 2 * scale, 1.0)
  return np.clip(0.5 + p / scale, 0.0, 1.0)


def receptive_patch(model, images, layer: str, position, *,
                    fill: float = 0.0, clip: bool = False):
  """The part of the input that unit ``position`` of ``layer`` sees.

  Args:
    images: (N, S, S, C) or (S, S, C); also works on projections.
    layer: a spatial layer (conv*, pool*, norm*); fc layers see the whole image.
    position: (row, col), or (N, 2) one per image.
    fill: value outside the image (0 = the mean pixel for mean-subtracted images).
    clip: False -> crops of the full receptive-field size (size x size, parts
      outside the image set to ``fill``), so every crop is centred alike; True ->
      only the part inside the image (a list for a batch).
  Returns:
    (N, size, size, C) (or (size, size, C)) array, or clipped crops.
  """
  x = np.asarray(images)
  single = x.ndim == 3
  if single:
    x = x[None]
  if x.ndim != 4 or x.shape[1] != x.shape[2]:
    raise ValueError(f"images must be (S, S, C) or (N, S, S, C), got shape {np.shape(images)}")
  n, s = x.shape[0], x.shape[1]
  shape = _check_layer(model, s, layer)
  fields = as_network(model).receptive_fields(s)
  if layer not in fields:  # fc: the whole image
    return [c for c in x] if (clip and not single) else (x[0] if single else x)
  pos = np.asarray(position)
  pos = np.broadcast_to(pos, (n, 2)) if pos.shape == (2,) else pos
  if pos.shape != (n, 2):
    raise ValueError(f"position must be (row, col) or ({n}, 2), got shape {pos.shape}")
  for p in pos:
    _check_position(layer, shape, tuple(p))
  rf = fields[layer]
  crops = []
  for img, (i, j) in zip(x, pos):
    r0, c0 = rf.offset + int(i) * rf.stride, rf.offset + int(j) * rf.stride
    if clip:
      a, b, c, d = rf.window(int(i), int(j), s)
      crops.append(img[a:b, c:d])
      continue
    crop = np.full((rf.size, rf.size, x.shape[3]), fill, x.dtype)
    a, b, c, d = rf.window(int(i), int(j), s)
    crop[a - r0:b - r0, c - c0:d - c0] = img[a:b, c:d]
    crops.append(crop)
  if clip:
    return crops[0] if single else crops
  crops = np.stack(crops)
  return crops[0] if single else crops


def crop_receptive_field(images: np.ndarray, rf: models.ReceptiveField,
                         positions: np.ndarray, fill: float = 0.5) -> np.ndarray:
  """Crop each image to its unit's receptive field.

  images (R, S, S, C); positions (R, 2) (row, col) of the units -> (R, t, t, C)
  with t = min(rf.size, S).  The clipped window sits where it lies in the full
  receptive field (when rf.size <= S), so the part outside the image is
  ``fill``; when rf.size > S the crop is the S pixels of each axis that start at
  the field's first pixel or, when the field starts before the image, end at its
  last pixel inside the image (the whole image when the field covers it).
  """
  s = images.shape[1]
  t = min(rf.size, s)
  out = np.full((images.shape[0], t, t, images.shape[3]), fill, np.float32)
  for n, (i, j) in enumerate(np.asarray(positions)):
    r0, r1, c0, c1 = rf.window(int(i), int(j), s)
    dr = t - (r1 - r0) if rf.offset + i * rf.stride < 0 else 0
    dc = t - (c1 - c0) if rf.offset + j * rf.stride < 0 else 0
    out[n, dr:dr + r1 - r0, dc:dc + c1 - c0] = images[n, r0:r1, c0:c1]
  return out



# ----------------------------------------------------------------------------
# Any CNN (through ``zfnet_jax.rewrite``).
# ----------------------------------------------------------------------------

def _pick(out, output):
  if output is None:
    return out
  if callable(output):
    return output(out)
  return out[output]


@functools.partial(conv.jit, static_argnames=("fn", "output", "rule"))
def _project_fn_jit(fn, params, images, channels, positions, strongest, output, rule):
  call = (lambda x: fn(x)) if params is None else (lambda x: fn(params, x))
  g = rewrite.deconvnet_transform(lambda x: _pick(call(x), output), rule)
  return _project_core(g, images, channels, positions, strongest)


def project_fn(fn: Callable, images: jax.Array, *, channel, position=None,
               output: Any = None, rule: str = "deconvnet", params: Any = None,
               chunk_size: int | None = None, return_info: bool = False):
  """Projections of one activation per image of any CNN (see ``deconvnet_transform``).

  Args:
    fn: images (N, H, W, C) -> the target activation (N, h, w, c) or (N, units),
      or a pytree of intermediates from which ``output`` picks the target; with
      ``params``, ``fn(params, images)``.  E.g. ``lambda x: model.apply(variables,
      x, method="features")`` with ``output="conv3"``; an NNX module's call; a
      pure JAX function.
    images: (N, H, W, C): one request per image (repeat an image for several
      requests on it).
    channel: int, or (N,) ints, the map (or fc unit) to project.
    position: None (strongest activation of the map in each image), (row, col),
      or (N, 2).
    output: None, a key of ``fn``'s output, or a callable on it.
    rule: "deconvnet", "guided" or "backprop".
    params: the network's parameters, passed as ``fn(params, images)``.  ``fn``
      (and ``output``) are static: jax compiles once per function *object*, so a
      new lambda per call compiles again.  Define ``fn`` once (e.g.
      ``fn = functools.partial(model.apply, method="features")``) and pass the
      weights as ``params=``: one compilation then serves every call with the
      same shapes, whatever the weights.
    chunk_size: at most this many requests per jitted batch (memory bound; the
      last chunk is padded, so all chunks share one compilation); None: one batch.
    return_info: also return the (N, 2) positions used and the (N,) activation
      values the projections started from.
  Returns:
    (N, H, W, C) projections in the dtype of ``images`` whatever ``fn`` computes in
    (and the info, if asked).
  """
  layers.check_rule(rule)
  shape = getattr(images, "shape", None)
  if shape is None or len(shape) < 2:
    raise ValueError(f"images must be a batch (N, ...), got shape {shape}")
  if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or
                                 chunk_size < 1):
    raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
  n = shape[0]
  call = fn if params is None else functools.partial(fn, params)
  act = jax.eval_shape(lambda x: _pick(call(x), output), images)
  if not hasattr(act, "shape") or act.ndim not in (2, 4) or act.shape[0] != n:
    raise ValueError(f"the target activation must be (N, h, w, c) or (N, units) with "
                     f"N={n}, got {jax.tree_util.tree_map(lambda a: a.shape, act)}; "
                     f"pick it with output=")
  hwc = (1, 1, act.shape[1]) if act.ndim == 2 else tuple(act.shape[1:])
  what = f"output {output!r}" if output is not None else "the target"
  chans = np.asarray(channel)
  for c in chans.reshape(-1):
    _check_channel(what, hwc, c.item() if isinstance(c, np.generic) else c)
  channels = np.broadcast_to(chans.astype(np.int32), (n,))
  if position is None:
    positions, strongest = np.zeros((n, 2), np.int32), np.ones((n,), bool)
  else:
    pos = np.asarray(position)
    for p in pos.reshape(-1, 2):
      _check_position(what, hwc, tuple(p))
    positions, strongest = np.broadcast_to(pos.astype(np.int32), (n, 2)), np.zeros((n,), bool)
  size = n if chunk_size is None else min(int(chunk_size), n)
  outs = []
  for s in range(0, n, size):
    take = np.minimum(np.arange(s, s + size), n - 1)       # the last chunk padded
    got = _project_fn_jit(fn, params, images[take], jnp.asarray(channels[take]),
                          jnp.asarray(positions[take]), jnp.asarray(strongest[take]),
                          output=output, rule=rule)
    outs.append([a[:min(size, n - s)] for a in got])
  proj, pos, values = (jnp.concatenate(parts) if len(outs) > 1 else parts[0]
                       for parts in zip(*outs))
  return (proj, pos, values) if return_info else proj


# ----------------------------------------------------------------------------
# Networks as the analyses see them.
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class Network:
  """A CNN as the analyses see it.

  features: (variables, images (N, S, S, C)) -> {layer: (N, H, W, C) or (N, units)},
    with "logits" for analyses that read class probabilities.
  layer_table: input_size -> [models.LayerSpec] (names, kinds, maps, map sides),
    so ``models.layer_shapes``, ``models.check_layer``... work on it.
  project: (variables, images (R, S, S, C), *, layer, channels (R,), positions
    (R, 2) or None, rule, chunk_size, progress) -> (R, S, S, C) projections.
  fields: input_size -> {spatial layer: models.ReceptiveField}, or None if
    unknown (analyses that crop to receptive fields then say so).
  module: the Flax module, when there is one.
  """
  features: Callable
  layer_table: Callable[[int], list]
  project: Callable
  fields: Callable[[int], dict] | None = None
  name: str = "network"
  module: Any = None

  @functools.cached_property
  def jit_features(self) -> Callable:
    """jit(features): one compilation per input shape, reused by every analysis."""
    return conv.jit(self.features)

  def receptive_fields(self, input_size: int) -> dict:
    if self.fields is None:
      raise ValueError(f"the receptive fields of {self.name} are unknown: give "
                       "receptive_fields= to deconv.from_features")
    return self.fields(input_size)

  def param(self, variables, layer: str, name: str = "kernel"):
    """A parameter of a layer (``variables["params"][layer][name]``), or None."""
    params = variables.get("params", {}) if hasattr(variables, "get") else {}
    return params.get(layer, {}).get(name) if hasattr(params, "get") else None


def _paper_features(model, variables, images):
  return model.apply(variables, images, method="features")


@functools.lru_cache(maxsize=32)
def network(model: models.PaperNet) -> Network:
  """One of our models as a Network (cached per model, so compilations are shared)."""
  return Network(features=functools.partial(_paper_features, model),
                 layer_table=model.layer_table,
                 project=functools.partial(project_many, model),
                 fields=functools.partial(models.receptive_fields, model),
                 name=type(model).__name__, module=model)


def as_network(model) -> Network:
  """``model`` if it is a Network, else ``network(model)`` (one of our models)."""
  return model if isinstance(model, Network) else network(model)


@functools.partial(conv.jit, static_argnames=("features", "layer", "rule"))
def _project_features(features, variables, images, channels, positions, strongest, layer,
                      rule):
  g = rewrite.deconvnet_transform(lambda v, x: features(v, x)[layer], rule)
  return _project_core(lambda x: g(variables, x), images, channels, positions, strongest)


def _fit_field(left: np.ndarray, right: np.ndarray, s: int) -> tuple[int, int, int]:
  """(size, stride, offset) whose windows, clipped to [0, s), are columns
  [left[j], right[j]] for every unit j (see ``probe_receptive_fields``)."""
  j = np.arange(len(left))
  for stride in range(1, s + 1):
    offsets = np.arange(s - 1, -4 * s, -1)                   # least padding first
    starts = offsets[:, None] + j * stride                   # (O, W)
    ok = (np.clip(starts, 0, s - 1) == left).all(axis=1)
    for offset, start in zip(offsets[ok], starts[ok]):
      free = right < s - 1                                   # right edges inside the image
      if free.any():
        size = int(right[free][0] - start[free][0] + 1)
      else:
        size = int(max(1, (s - start).max()))
      if (np.clip(start + size - 1, 0, s - 1) == right).all():
        return size, stride, int(offset)
  raise ValueError("no receptive-field geometry fits the probed windows")


def probe_receptive_fields(features: Callable, variables, channels: int, input_size: int, *,
                           batch_size: int = 16) -> dict[str, models.ReceptiveField]:
  """Receptive field of every spatial layer of ``features``, found by probing.

  Image c of a batch holds NaN in input column c (every row and channel); a unit
  whose map column turns NaN sees that column.  The columns each unit sees give its
  window clipped to the image; ``_fit_field`` finds the geometry that reproduces
  every clipped window exactly (where the image is too small to tell, the smallest
  stride, then the least padding and the smallest size).  Rows are assumed to behave as columns (square kernels, symmetric strides).
  Raises ValueError for a layer no NaN reaches (an op that stops NaNs, e.g.
  ``jnp.where(x > 0, x, 0)``): give ``receptive_fields=`` then.
  """
  s = int(input_size)
  jit = jax.jit(features, compiler_options=conv.nan_propagating_options())
  seen = {}                                   # layer -> (S, W) bool: column c hits unit column j
  for c0 in range(0, s, batch_size):
    cols = np.arange(c0, min(c0 + batch_size, s))
    x = np.zeros((len(cols), s, s, channels), np.float32)
    x[np.arange(len(cols)), :, cols, :] = np.nan
    for name, act in jit(variables, jnp.asarray(x)).items():
      if np.ndim(act) != 4:
        continue
      hit = np.isnan(np.asarray(act)).any(axis=(1, 3))          # (B, W)
      seen.setdefault(name, []).append(hit)
  out = {}
  for name, parts in seen.items():
    hit = np.concatenate(parts)                                 # (S, W)
    w = hit.shape[1]
    if not hit.any(axis=0).all():
      raise ValueError(f"probing the receptive fields of {name!r}: NaN reached no input "
                       "for some of its units (an op that stops NaN, such as "
                       "jnp.where(x > 0, x, 0)?); give receptive_fields= to from_features")
    left = np.array([np.flatnonzero(hit[:, j])[0] for j in range(w)])
    right = np.array([np.flatnonzero(hit[:, j])[-1] for j in range(w)])
    size, stride, offset = _fit_field(left, right, s)
    out[name] = models.ReceptiveField(size, stride, offset)
  return out


def from_features(features: Callable, variables, channels: int, *,
                  receptive_fields: Callable[[int], dict] | Mapping | None = None,
                  name: str = "network") -> Network:
  """Any CNN as a Network, from ``features(variables, images) -> {layer: activation}``.

  Projections go through ``rewrite.deconvnet_transform`` (its ReLUs and
  max-pools take the rule).  ``channels``: input channels; ``variables``: any
  variables of the network (only their shapes are kept, for the layer table).
  ``receptive_fields``: {layer: models.ReceptiveField} or input_size -> that; None:
  found by ``probe_receptive_fields`` (once per input size, cached).
  """
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)),
                          variables)

  @functools.lru_cache(maxsize=8)
  def table(input_size: int) -> list:
    x = jax.ShapeDtypeStruct((1, input_size, input_size, channels), jnp.float32)
    shapes = jax.eval_shape(features, abstract, x)
    return [models.LayerSpec(k, "fc", v.shape[-1]) if len(v.shape) == 2 else
            models.LayerSpec(k, "conv", v.shape[-1], out=v.shape[1]) for k, v in shapes.items()]

  def project(variables, images, *, layer, channels, positions=None, rule="deconvnet",
              chunk_size=32, progress=False):
    layers.check_rule(rule)
    _check_images(images)
    batch = lambda name, *args: _project_features(features, variables, *args, layer=name,
                                                  rule=rule)
    return _project_requests(batch, net, images, layer, channels, positions, chunk_size,
                             progress, rule)

  fields = receptive_fields
  if isinstance(receptive_fields, Mapping):
    fields = lambda input_size: dict(receptive_fields)
  elif receptive_fields is None:                       # found by probing, once per size
    fields = functools.lru_cache(maxsize=8)(
        lambda input_size: probe_receptive_fields(features, variables, channels, input_size))
  net = Network(features, table, project, fields, name)
  return net
