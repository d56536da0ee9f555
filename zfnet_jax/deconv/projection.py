"""The projection core: one forward per image, one VJP with one-hot cotangents.

``project`` (one unit per image of a ``PaperNet``), ``project_many`` (many requests, in
padded chunks), ``project_fn`` (any JAX function, through ``rewrite``) and
``strongest`` (where a map is strongest) all go through ``_project_core``; a map
layer of a ``PaperNet`` goes down only inside the unit's receptive field.
"""
from __future__ import annotations

import functools
import weakref
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from zfnet_jax import console, xla
from zfnet_jax.deconv import rewrite
from zfnet_jax.deconv.checks import (
  _check_channel,
  _check_layer,
  _check_position,
  check_images,
)
from zfnet_jax.nn import geometry, layers, models, rules, torchvision

# ----------------------------------------------------------------------------
# The projection core: one forward per image, one VJP with one-hot cotangents.
# ----------------------------------------------------------------------------

def strongest_in(a, ndim: int):
  """The strongest activation over the last ``ndim`` axes of ``a`` (NumPy or JAX), the one
  definition every "strongest unit" of the project uses: ties go to the first in
  row-major order.  Returns (indices: ``ndim`` int arrays of shape ``a.shape[:-ndim]``,
  values of that shape).  E.g. (N, H, W) maps, ndim=2 -> each image's (rows, cols);
  (C, H, W), ndim=2 -> each map's; (N, H, W, C), ndim=4 -> one (image, row, col, map)."""
  xp = jnp if isinstance(a, jax.Array) else np
  lead, tail = a.shape[:a.ndim - ndim], a.shape[a.ndim - ndim:]
  flat = a.reshape(lead + (-1,))
  k = xp.argmax(flat, axis=-1)
  values = xp.take_along_axis(flat, k[..., None], axis=-1)[..., 0]
  return xp.unravel_index(k, tail), values


def _select(act, channels, positions, strongest):
  """One-hot cotangent holding each image's selected activation.

  act: (N, H, W, C); channels (N,); positions (N, 2); strongest (N,) bool.
  Returns (cotangent like act, positions used (N, 2), values (N,)).
  """
  n, h, w, c = act.shape
  maps = jnp.take_along_axis(act, channels[:, None, None, None], axis=3)[..., 0]
  (rows, cols), _ = strongest_in(maps, 2)
  flat = jnp.where(strongest, rows * w + cols, positions[:, 0] * w + positions[:, 1])
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


@functools.partial(xla.jit, static_argnames=("model", "layer"))
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


_transposed_filters_jit = xla.jit(_transposed_filters, static_argnums=1)


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
  rules.get(rule)
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


@functools.partial(xla.jit, static_argnames=("model", "layer"))
def _strongest(model, variables, images, channel, layer):
  act = model.apply(variables, images, method="features")[layer]
  act = act.reshape(act.shape[0], 1, 1, -1) if act.ndim == 2 else act
  (rows, cols), values = strongest_in(act[..., channel], 2)
  return jnp.stack([rows, cols], 1), values


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
  rules.get(rule)
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


AVGPOOL = "avgpool"   # torchvision's adaptive average pool before fc6: step "average"


def _plan(model, input_size: int, layer: str) -> list[tuple[geometry.LayerSpec, str]]:
  """The steps from ``layer`` down to the pixels: [(layer spec, step)]."""
  table = model.layer_table(input_size)
  plan = []
  for spec in reversed(table[:[s.name for s in table].index(layer) + 1]):
    if spec.kind in ("conv", "fc"):
      plan += ([(spec, "rectify")] if spec.name != "logits" else []) + [(spec, "filter")]
      if spec.name == "fc6" and isinstance(model, torchvision.TorchvisionNet):
        plan.append((geometry.LayerSpec(AVGPOOL, "pool"), "average"))
    else:
      plan.append((spec, "unpool" if spec.kind == "pool" else "normalise"))
  return plan


# ----------------------------------------------------------------------------
# Any CNN (through ``zfnet_jax.deconv.rewrite``).
# ----------------------------------------------------------------------------

def _pick(out, output):
  if output is None:
    return out
  if callable(output):
    return output(out)
  return out[output]


@functools.partial(xla.jit, static_argnames=("fn", "output", "rule"))
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
  rules.get(rule)
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

