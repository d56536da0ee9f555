"""Occlusion sensitivity (paper Sec. 4.2, Fig. 7).

A grey square slides over the image.  Square positions form a grid of cells of
``stride`` pixels: cell (i, j) covers pixels [i*stride, (i+1)*stride) of rows
and columns, and the square of side ``size`` is centred on the cell's centre
pixel (c = i*stride + stride//2, square rows [c - size//2, c - size//2 + size)),
clipped at the image border (never wrapped).  Map value (i, j) is therefore
drawn over exactly that cell, so maps overlay the image pixel for pixel.

The strongest feature map is the paper's: the map of ``layer`` with the largest
single activation (max over positions) in the unoccluded image (``strongest_map``).
For each position: (b) the total activation (sum over positions) of that map,
(d) the probability of the true class, (e) the most probable class (and its
probability).  (c) is the projection of that map's strongest unit on the
unoccluded image, cropped to the unit's receptive field as the atlas crops
(Fig. 7 (c)'s black square; uncropped when the network's receptive fields are
unknown), and, as the paper's (c) companion, the projections of that map's top
``COMPANION_K`` activations in *other* images of the scanned split (``companions``:
``atlas.scan`` over the first ``companion_examples`` examples, the occluded image
left out, one unit per image).  All positions of an image go
through one jitted ``lax.map`` in chunks of ``chunk_size`` occluded images, so
memory is bounded by the chunk and a 224x224 image at stride 8 (784 positions)
takes seconds on an accelerator.

Defaults (paper: not stated): size = crop/4 (56 px at 224, 8 at 32),
stride = crop/28 (8 px at 224, 1 at 32), fill = the training mean at each pixel
(mid-grey; 0 in the model's mean-subtracted input).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import matplotlib.patches
import numpy as np

from zfnet_jax import deconv, xla
from zfnet_jax.analyses import common
from zfnet_jax.nn import geometry
from zfnet_jax.render import content, figures


@dataclasses.dataclass
class Settings:
  size: int
  stride: int
  fill: float          # pixel value 0..255, or < 0 for the training mean
  layer: str
  chunk_size: int
  companion_examples: int = 0   # examples scanned for (c)'s other images (0 = none)


def validate(options, net, data: content.Data) -> Settings:
  """Resolved and validated settings from ``config.analyses.occlusion``."""
  size = int(round(common.default_size(options.size, 56, data.input_size)))
  stride = int(round(common.default_size(options.stride, 8, data.input_size)))
  return check(Settings(max(size, 1), max(stride, 1), float(options.fill), options.layer,
                        int(options.chunk_size), int(options.companion_examples)),
               net, data.input_size)


def check(s: Settings, net, input_size: int) -> Settings:
  if not 1 <= s.size <= input_size:
    raise ValueError(f"occlusion size {s.size} not allowed: 1..{input_size} (the input size)")
  if not 1 <= s.stride <= input_size:
    raise ValueError(f"occlusion stride {s.stride} not allowed: 1..{input_size}")
  if s.chunk_size < 1:
    raise ValueError(f"occlusion chunk_size {s.chunk_size} not allowed: >= 1")
  if s.companion_examples < 0:
    raise ValueError(f"occlusion companion_examples {s.companion_examples} not allowed: "
                     ">= 0 (0 = no other images)")
  if s.fill > 255:
    raise ValueError(f"occlusion fill {s.fill} not allowed: a pixel value 0..255, or -1 (mean)")
  geometry.check_layer(deconv.as_network(net), input_size, s.layer, "occlusion layer",
                     spatial=True)
  return s


def squares(input_size: int, size: int, stride: int) -> np.ndarray:
  """(n, 2) [lo, hi) pixel range of the square along one axis for each of the n cells."""
  n = -(-input_size // stride)
  lo = np.arange(n) * stride + stride // 2 - size // 2
  return np.clip(np.stack([lo, lo + size], 1), 0, input_size)


def fill_image(fill: float, mean: np.ndarray | None, shape) -> np.ndarray:
  """The square's content in the model's (mean-subtracted) input space, (S, S, C)."""
  if fill < 0 or mean is None:
    return np.zeros(shape, np.float32) if fill < 0 else np.full(shape, fill, np.float32)
  return (fill - np.asarray(mean, np.float32)).astype(np.float32)


def strongest_map(activation: np.ndarray) -> int:
  """(H, W, C) activations of one image -> the map with the largest single activation
  (max over positions, ``deconv.strongest_in``; the paper's "strongest feature map");
  ties: the lowest index."""
  _, top = deconv.strongest_in(np.moveaxis(np.asarray(activation), -1, 0), 2)
  return int(np.argmax(top))


def scan(net, variables, image: np.ndarray, label: int, s: Settings,
         fill: np.ndarray | None = None, channel: int | None = None) -> dict[str, np.ndarray]:
  """Occlusion maps of one image (S, S, C) with true class ``label``.

  net: a ``deconv.Network`` (or one of our models); its features need "logits".
  fill: (S, S, C) square content in input space (default zeros = the mean).
  channel: map of ``s.layer`` to follow (default: ``strongest_map`` of the
  unoccluded image: the largest single activation).
  Returns activation (n, n) [total activation of the map], prob_true (n, n),
  top_class (n, n) int, top_prob (n, n), squares (n, 2), channel, and the
  unoccluded activation, prob_true and top_class.
  """
  net = deconv.as_network(net)
  image = jnp.asarray(image, jnp.float32)
  size = image.shape[0]
  fill = jnp.zeros_like(image) if fill is None else jnp.asarray(fill, jnp.float32)
  sq = squares(size, s.size, s.stride)
  n = len(sq)
  check(s, net, size)
  num_classes = geometry.layer_shapes(net, size)["logits"][2]
  if not 0 <= int(label) < num_classes:
    raise ValueError(f"label {label} out of range: allowed 0..{num_classes - 1}")
  if channel is not None:
    geometry.check_channels(net, size, s.layer, [channel])
  f0 = common.activations(net, variables, np.asarray(image)[None], [s.layer])
  totals = f0[s.layer][0].reshape(-1, f0[s.layer].shape[-1]).sum(0)
  if channel is None:
    channel = strongest_map(f0[s.layer][0])
  p0 = common.softmax(f0["logits"][0].astype(np.float64))
  out = _scan_fn(net, s.layer, s.chunk_size)(variables, image, fill, jnp.asarray(sq),
                                               jnp.int32(label), jnp.int32(channel))
  out = {k: np.asarray(v).reshape(n, n) for k, v in jax.device_get(out).items()}
  out.update(squares=sq, channel=np.int32(channel), label=np.int32(label),
             activation0=np.float32(totals[channel]), prob_true0=np.float32(p0[label]),
             top_class0=np.int32(np.argmax(p0)), size=np.int32(s.size), stride=np.int32(s.stride))
  return out


@functools.lru_cache(maxsize=16)
def _scan_fn(net, layer: str, chunk_size: int):
  return xla.jit(functools.partial(_scan, net, layer, chunk_size))


def _scan(net, layer, chunk_size, variables, image, fill, sq, label, channel):
  n = sq.shape[0]
  pix = jnp.arange(image.shape[0])
  inside = (pix[None, :] >= sq[:, :1]) & (pix[None, :] < sq[:, 1:])    # (n, S)
  ii, jj = jnp.meshgrid(jnp.arange(n), jnp.arange(n), indexing="ij")

  def one(ij):
    m = inside[ij[0]][:, None] & inside[ij[1]][None, :]
    x = jnp.where(m[..., None], fill, image)[None]
    f = net.features(variables, x)
    probs = jax.nn.softmax(f["logits"][0].astype(jnp.float32))
    return {"activation": f[layer][0, ..., channel].sum(),
            "prob_true": probs[label], "top_class": jnp.argmax(probs).astype(jnp.int32),
            "top_prob": probs.max()}
  return jax.lax.map(one, jnp.stack([ii.ravel(), jj.ravel()], 1), batch_size=chunk_size)


# ----------------------------------------------------------------------------
# (c)'s companion: the same map's top activations in other images.
# ----------------------------------------------------------------------------

COMPANION_K = 9   # other images shown beside (c), as the paper's 3x3 grids


def companions(net, variables, batches: Iterable[Mapping[str, np.ndarray]], layer: str,
               channels: Sequence[int], *, k: int = COMPANION_K,
               batch_size: int = 64) -> dict:
  """The top-``k`` images of each map ``channels`` (M,) of ``layer`` over ``batches``.

  Each image is ranked by its largest activation of the map (one unit per image, as
  Fig. 2 and Fig. 7 (c) show; ties: the lower example id).  batches: dicts with
  'image' (B, S, S, C), 'id' (B,) unique, optional 'mask' (B,) (False = padding).
  Memory: the current top-k images only.  Returns channels (M,), values float32 (M, k)
  (-inf: empty), ids int64 (M, k) (-1: empty), positions int32 (M, k, 2) (row, col) in
  the map, images {id: (S, S, C)}.
  """
  channels = np.asarray(channels, np.int64)
  m = len(channels)
  values = np.full((m, 0), -np.inf, np.float32)
  ids = np.zeros((m, 0), np.int64)
  flat = np.zeros((m, 0), np.int64)
  images, width = {}, None
  for batch in batches:
    bid = np.asarray(batch["id"]).astype(np.int64)
    keep = np.asarray(batch.get("mask", np.ones(bid.shape, bool)), bool)
    x = np.asarray(batch["image"], np.float32)
    if not keep.any():
      continue
    x, bid = x[keep], bid[keep]
    a = common.activations(net, variables, x, [layer], batch_size)[layer][..., channels]
    width = a.shape[2]
    a = a.reshape(len(x), -1, m)                                   # (B, H*W, M)
    values = np.concatenate([values, a.max(1).T.astype(np.float32)], 1)
    ids = np.concatenate([ids, np.broadcast_to(bid, (m, len(bid)))], 1)
    flat = np.concatenate([flat, a.argmax(1).T], 1)
    order = np.lexsort((ids, -values))[:, :k]                      # value desc, then id
    values, ids, flat = (np.take_along_axis(v, order, 1) for v in (values, ids, flat))
    wanted = set(ids.ravel().tolist())
    images.update({int(j): x[n].copy() for n, j in enumerate(bid) if int(j) in wanted})
    images = {j: v for j, v in images.items() if j in wanted}
  short = k - values.shape[1]
  if short > 0:
    values = np.pad(values, ((0, 0), (0, short)), constant_values=-np.inf)
    ids = np.pad(ids, ((0, 0), (0, short)), constant_values=-1)
    flat = np.pad(flat, ((0, 0), (0, short)))
  w = width or 1
  positions = np.stack([flat // w, flat % w], -1).astype(np.int32)
  return {"channels": channels, "values": values, "ids": ids, "positions": positions,
          "images": images}


def _first(batches: Iterable[Mapping[str, np.ndarray]], n: int):
  """The batches' first ``n`` valid examples (later ones masked out, then stopped)."""
  seen = 0
  for b in batches:
    if seen >= n:
      return
    mask = np.asarray(b.get("mask", np.ones(np.shape(b["id"]), bool)), bool)
    keep = mask & (np.cumsum(mask) <= n - seen)
    seen += int(keep.sum())
    yield {**b, "mask": keep}


def others(found: dict, row: int, image_id: int, image: np.ndarray,
           k: int = COMPANION_K) -> np.ndarray:
  """Slots of row ``row`` of ``companions``' result that are filled and not the
  occluded image (same id and pixels), the first ``k``."""
  ids = found["ids"][row]
  same = lambda j: ids[j] == image_id and np.array_equal(found["images"][int(ids[j])], image)
  return np.asarray([j for j in range(len(ids)) if ids[j] >= 0 and not same(j)][:k], int)


def companion_tiles(net, variables, found: dict, row: int, slots: np.ndarray, layer: str,
                    pixel_mean, rule: str) -> tuple[np.ndarray, np.ndarray]:
  """Projections and patches (k', t, t, C) in [0, 1] of the units ``slots`` (k',) of row
  ``row`` of ``companions``' result, cropped to the receptive field."""
  net = deconv.as_network(net)
  filled = np.asarray(slots, int)
  imgs = np.stack([found["images"][int(i)] for i in found["ids"][row, filled]])
  pos = found["positions"][row, filled]
  channel = np.full(len(filled), int(found["channels"][row]))
  proj = deconv.to_image(np.asarray(net.project(variables, jnp.asarray(imgs), layer=layer,
                                                channels=channel, positions=pos, rule=rule)))
  display = np.clip((imgs + np.asarray(pixel_mean, np.float32)) / 255.0, 0.0, 1.0)
  if net.fields is None:
    return proj, display
  field = net.receptive_fields(imgs.shape[1])[layer]
  return (deconv.crop_receptive_field(proj, field, pos),
          deconv.crop_receptive_field(display, field, pos))


# ----------------------------------------------------------------------------
# The panels of Fig. 7.
# ----------------------------------------------------------------------------

def plot(result: dict, display: np.ndarray, projection: np.ndarray | None,
         class_names, path: str, label_kind: str = "true") -> str:
  """One row of Fig. 7: (a) image + square, (b) activation map, (c) projection,
  (d) P(true class) map, (e) most probable class map with a legend.  projection: (t, t)
  or (t, t, 3) in [0, 1], cropped to the unit's receptive field.
  ``label_kind``: what ``result["label"]`` is ("true", or "top class" for an unlabelled image)."""
  plt = figures.pyplot()
  patches = matplotlib.patches
  size = display.shape[0]
  sq, n = result["squares"], len(result["squares"])
  stride = int(result["stride"])
  extent = (0, n * stride, n * stride, 0)
  names = list(class_names) if class_names else [str(i) for i in range(1000)]
  label, top0 = int(result["label"]), int(result["top_class0"])
  fig, axes = plt.subplots(1, 5, figsize=(17, 3.6))
  figures.imshow(axes[0], display)
  c = n // 2
  axes[0].add_patch(patches.Rectangle((sq[c, 0] - .5, sq[c, 0] - .5), sq[c, 1] - sq[c, 0],
                                      sq[c, 1] - sq[c, 0], fc=(.5, .5, .5, .8), ec="k"))
  axes[0].set_title(f"(a) {label_kind}: {names[label]}", fontsize=9)
  for ax, key, title, cmap in ((axes[1], "activation", f"(b) total activation, "
                                f"map {int(result['channel'])}", "jet"),
                               (axes[3], "prob_true", f"(d) p({names[label]})", "jet")):
    figures.imshow(ax, display, alpha=1.0)
    im = ax.imshow(result[key], cmap=cmap, alpha=0.6, extent=extent, interpolation="nearest")
    ax.set_xlim(-.5, size - .5)
    ax.set_ylim(size - .5, -.5)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
  if projection is not None:
    figures.imshow(axes[2], projection)
  axes[2].set_title("(c) projection of that map, receptive field", fontsize=9)
  axes[2].set_xticks([])
  axes[2].set_yticks([])
  classes = sorted(set(np.unique(result["top_class"]).tolist()))
  cmap = plt.get_cmap("tab20", max(len(classes), 1))
  idx = np.searchsorted(classes, result["top_class"])
  axes[4].imshow(idx, cmap=cmap, vmin=-.5, vmax=len(classes) - .5, extent=extent,
                 interpolation="nearest")
  axes[4].set_xlim(-.5, size - .5)
  axes[4].set_ylim(size - .5, -.5)
  axes[4].set_xticks([])
  axes[4].set_yticks([])
  axes[4].set_title(f"(e) most probable class (unoccluded: {names[top0]})", fontsize=9)
  handles = [patches.Patch(color=cmap(k), label=names[c]) for k, c in enumerate(classes)]
  axes[4].legend(handles=handles,
                 loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
  return figures.save_figure(fig, path)


def sections(context: content.Context, s: Settings) -> list[content.Section]:
  """Fig. 7 for each analysed image: occlusion_<id>.npz and .png, one Section."""
  net, size = context.net, context.images.shape[1]
  field = net.receptive_fields(size).get(s.layer) if net.fields is not None else None
  fill = fill_image(s.fill, context.pixel_mean, context.images.shape[1:])
  fill_text = "the training mean, mid-grey" if s.fill < 0 else f"pixel value {s.fill:g}"
  sec = content.Section(
      "Occlusion sensitivity", "occlusion",
      paragraphs=[
          f"A square of {s.size}x{s.size} px (fill: {fill_text}) slides over each "
          f"{size}x{size} input with its centre on a grid of stride {s.stride} px, clipped at "
          f"the border. Per position: (b) total activation of the {s.layer} map that is "
          "strongest on the unoccluded image (the largest single activation, as the paper "
          "chooses it), (c) the projection of that map's strongest unit, cropped to its receptive field (the whole image when the field is larger), "
          "(d) probability of the true class, (e) most probable class (paper Fig. 7). Each "
          "map cell is drawn over the pixels whose occlusion it measures. Arrays: "
          "occlusion_<id>.npz."])
  results = [scan(net, context.variables, image, int(label), s, fill=fill)
             for image, label in zip(context.images, context.labels)]
  found = None
  if s.companion_examples and context.split_batches is not None and results:
    channels = sorted({int(r["channel"]) for r in results})
    found = companions(net, context.variables,   # one more: the occluded image may be there
                       _first(context.split_batches(), s.companion_examples), s.layer,
                       channels, k=COMPANION_K + 1, batch_size=context.batch_size)
    sec.paragraphs.append(
        f"Beside each row: the projections of the same {s.layer} map's top "
        f"{COMPANION_K} activations in other images (one unit per image, the image's "
        f"largest activation of the map) among the first {s.companion_examples} examples of "
        f"{context.split_name or 'the split'}, the occluded image left out, with their "
        "image patches (the paper's Fig. 7 (c) companion).")
  rows = []
  for image, label, i, r in zip(context.images, context.labels, context.ids, results):
    a = common.activations(net, context.variables, image[None], [s.layer])[s.layer][0]
    a = a[..., int(r["channel"])]
    pos = np.asarray([np.unravel_index(np.argmax(a), a.shape)], np.int32)  # its strongest unit
    proj = net.project(context.variables, jnp.asarray(image[None]), layer=s.layer,
                       channels=np.array([int(r["channel"])]), positions=pos,
                       rule=context.rule)
    proj = deconv.to_image(proj)
    proj = (proj if field is None else deconv.crop_receptive_field(proj, field, pos))[0]
    r["projection"], r["projection_position"] = proj, pos[0]
    row = None if found is None else int(np.searchsorted(found["channels"], int(r["channel"])))
    if row is not None:
      slots = others(found, row, int(i), np.asarray(image, np.float32))
      for key in ("values", "ids", "positions"):
        r[f"others_{key}"] = found[key][row][slots]
    np.savez_compressed(context.path(f"occlusion_{int(i)}.npz"), **r)
    disp = common.to_display(image, context.pixel_mean)
    proj = proj[..., 0] if proj.shape[-1] == 1 else proj
    plot(r, disp, proj, context.class_names, context.path(f"occlusion_{int(i)}.png"))
    name = context.class_name(label)
    sec.figures.append((f"occlusion_{int(i)}.png",
                        f"Image {int(i)} (true class {name}): Fig. 7 panels."))
    if row is not None and len(slots):
      tiles = companion_tiles(net, context.variables, found, row, slots, s.layer,
                              context.pixel_mean, context.rule)
      got = r["others_ids"]
      figures.save_png(figures.atlas_panel(tiles[0][None], tiles[1][None],
                                           [int(r["channel"])],
                                           titles=[f"{s.layer} map {int(r['channel'])}"]),
                       context.path(f"occlusion_{int(i)}_others.png"))
      sec.figures.append((f"occlusion_{int(i)}_others.png",
                          f"Image {int(i)}: {s.layer} map {int(r['channel'])} in {len(got)} "
                          f"other images (ids {', '.join(str(int(g)) for g in got)}), "
                          "projections left, patches right."))
    rows.append([str(int(i)), name, f"{float(r['prob_true0']):.3f}",
                 f"{float(r['prob_true'].min()):.3f}",
                 f"{float((r['top_class'] == int(label)).mean()):.2f}"])
  sec.tables.append((["image", "true class", "p(true) unoccluded", "min p(true) occluded",
                      "fraction of positions still correct"], rows))
  return [sec]
