"""Feature atlas (paper Fig. 2): the top-k activations of every feature map over
a dataset split, projected back to pixels, beside the image patches they saw.

Two steps:

1. ``scan``: one streaming pass over the split.  A jitted step computes the
   chosen layers' activations for a batch and merges the batch's best
   candidates of every map into the running top-k.  Two modes:

   * distinct images (the default, as the paper's Fig. 2): the k *images* with
     the strongest activation of the map (each image's maximum over
     positions), each at its strongest unit (the first maximum in row-major
     order).  Each map is reduced to its per-image maximum first; positions
     come from the same pass (the first maximum of each image's map).
   * per unit (``distinct_images=False``): the k largest *units*, so one image
     that fires strongly can fill several slots.

   Memory is bounded: per map only k (value, example id, position) triples are
   kept on the device, plus, on the host, the images of the current top-k of
   the maps that will be shown.
2. ``project``: every recorded unit of the shown maps is projected to pixels
   with ``deconv.project_many`` (one batched call per layer), and both the
   projection and the original image are cropped to the unit's receptive field
   (``geometry.receptive_fields``).

Ties are deterministic: a larger value ranks first, then the lower example id,
then the lower flat position ``row * width + col`` in the map.  (ReLU maps have
many exact zeros, so ties are common in dead or sparse maps.)  Slots that no
valid example filled (fewer than k candidates) have id -1 and value -inf.

``save``/``load``: a layer's shown maps as ``atlas_<layer>.npz`` (the report
writes one per layer).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from zfnet_jax import console, deconv, xla
from zfnet_jax.analyses import legibility as legibility_lib
from zfnet_jax.nn import geometry, rules
from zfnet_jax.render import content, figures

_EMPTY = np.iinfo(np.int32).max  # id of an empty slot while scanning (sorts last)


@dataclasses.dataclass
class TopK:
  """The top-k units of every feature map of one layer, best first.

  values: float32 (C, k) activations; ids: int64 (C, k) example ids (-1 =
  empty slot); positions: int32 (C, k, 2) (row, col) in the layer's map.
  """
  values: np.ndarray
  ids: np.ndarray
  positions: np.ndarray


@dataclasses.dataclass
class LayerAtlas:
  """The shown maps of one layer: M maps x k units, each as two tiles.

  channels: (M,) map indices; values, ids, positions, labels: (M, k[, 2]) of
  the recorded units (label -1 where unknown); projections: float32
  (M, k, t, t, C) in [0, 1] (zero at 0.5, each normalised on its own);
  patches: float32 (M, k, t, t, C) display pixels in [0, 1]; t = min(receptive
  field, input size); outside the image tiles are mid-grey (0.5).
  """
  layer: str
  channels: np.ndarray
  values: np.ndarray
  ids: np.ndarray
  positions: np.ndarray
  labels: np.ndarray
  projections: np.ndarray
  patches: np.ndarray
  receptive_field: geometry.ReceptiveField


def check_options(net, input_size: int, *, layers: Sequence[str],
                  k: int, rule: str, num_maps: int = -1, chunk_size: int = 1) -> None:
  """Raise ValueError naming the bad option and what is allowed (before any scan)."""
  net = deconv.as_network(net)
  allowed = geometry.spatial_layers(net, input_size)
  if isinstance(layers, str) or not layers:
    raise ValueError(f"layers must be a non-empty sequence of layer names, got {layers!r}; "
                     f"allowed: {', '.join(allowed)}")
  bad = [l for l in layers if l not in allowed]
  if bad:
    raise ValueError(f"unknown layer(s) {bad} for {net.name} at {input_size}x"
                     f"{input_size}; allowed: {', '.join(allowed)}")
  if len(set(layers)) != len(layers):
    raise ValueError(f"layers listed twice: {list(layers)}")
  rules.get(rule)
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"top_k must be a positive integer, got {k!r}")
  if not isinstance(num_maps, (int, np.integer)) or (num_maps < 1 and num_maps != -1):
    raise ValueError(f"num_maps must be a positive integer or -1 (all maps), got {num_maps!r}")
  if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")


def choose_maps(num_channels: int, num_maps: int, seed: int) -> np.ndarray:
  """All maps (num_maps = -1 or >= num_channels), else a sorted random subset."""
  if num_maps == -1 or num_maps >= num_channels:
    return np.arange(num_channels)
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(num_channels, num_maps, replace=False))


# ----------------------------------------------------------------------------
# 1. Streaming top-k.
# ----------------------------------------------------------------------------

def _max_argmax(act):
  """act (B, H, W, C) -> (per-image maximum (B, C), its first row-major flat position
  (B, C) int32).  On XLA's CPU backend a reduction over the middle axes runs at a fraction
  of memory speed; a running maximum over the H rows (one fused elementwise loop, C
  contiguous) is ~4x faster, and carries each column's first row of the maximum."""
  b, h, w, c = act.shape
  if h > 256:   # keep the fused loop small; plain reductions then
    flat = act.reshape(b, h * w, c)
    return jnp.max(flat, axis=1), jnp.argmax(flat, axis=1).astype(jnp.int32)
  m, row = act[:, 0], jnp.zeros((b, w, c), jnp.int32)
  for i in range(1, h):
    gt = act[:, i] > m                       # strictly: the first row keeps ties
    m, row = jnp.where(gt, act[:, i], m), jnp.where(gt, i, row)
  best = jnp.max(m, axis=1)                                        # (B, C)
  col = jnp.arange(w, dtype=jnp.int32)[None, :, None]
  return best, jnp.min(jnp.where(m == best[:, None, :], row * w + col, h * w), axis=1)


def _merge_images(state, act, ids, mask):
  """Merge one layer's batch into its running top-k images (distinct-images mode).

  state: (values (C, k), ids (C, k), flat positions (C, k)); act (B, H, W, C);
  ids int32 (B,) ascending; mask bool (B,).

  Each map is reduced to its per-image maximum and first row-major argmax (B, C) --
  one pass over the activations, no transpose, no gather of maps; the batch's kb
  best images per map are merged with the running top-k.
  """
  values, run_ids, run_pos = state
  k = values.shape[1]
  kb = min(k, act.shape[0])
  m, pos = _max_argmax(act)
  m = m.astype(jnp.float32)
  m = jnp.where(m == 0, 0.0, m)  # -0.0 -> 0.0: one total order for ties
  m = jnp.where(mask[:, None], m, -jnp.inf)
  # top_k prefers the lower index among ties, i.e. (ids ascending) the lower id.
  top, best = lax.top_k(m.T, kb)                                          # (C, kb)
  cand_pos = jnp.take_along_axis(pos.T, best, axis=1)
  cand_ids = jnp.where(top > -jnp.inf, ids[best], _EMPTY)
  neg, all_ids, all_pos = lax.sort(
      (jnp.concatenate([-values, -top], 1), jnp.concatenate([run_ids, cand_ids], 1),
       jnp.concatenate([run_pos, cand_pos], 1)), dimension=1, num_keys=2)
  return -neg[:, :k], all_ids[:, :k], all_pos[:, :k]


def _merge_units(state, act, ids, mask):
  """Merge one layer's batch into its running top-k units (per-unit mode).

  state: (values (C, k), ids (C, k), flat positions (C, k)); act (B, H, W, C);
  ids int32 (B,) ascending; mask bool (B,).

  Only the k examples with the largest maxima of a map can hold its top k
  values (any other example is beaten by k maxima that rank before it, ties
  included), so those k maps are gathered and searched, never the whole batch.
  """
  values, run_ids, run_pos = state
  k = values.shape[1]
  b, h, w, c = act.shape
  v = act.astype(jnp.float32)
  v = jnp.where(v == 0, 0.0, v)  # -0.0 -> 0.0: one total order for ties
  v = jnp.where(mask[:, None, None, None], v, -jnp.inf).reshape(b, h * w, c)
  kb = min(k, b)
  # The kb examples with the largest maxima per map (top_k prefers the lower
  # index among ties), put back in ascending example order.
  m = _max_argmax(act)[0].astype(jnp.float32)          # the argmax is dropped by XLA
  m = jnp.where(mask[:, None], jnp.where(m == 0, 0.0, m), -jnp.inf)
  best = jnp.sort(lax.top_k(m.T, kb)[1], axis=1)                             # (C, kb)
  maps = jnp.take_along_axis(v, best.T[:, None, :], axis=0)                  # (kb, HW, C)
  maps = maps.transpose(2, 0, 1).reshape(c, kb * h * w)
  # Candidates in (example, row, col) order; top_k breaks ties by the lower
  # index, i.e. (with ascending ids) by the lower id, then the lower position.
  top, idx = lax.top_k(maps, min(k, kb * h * w))
  example = jnp.take_along_axis(best, idx // (h * w), axis=1)
  cand_ids = jnp.where(top > -jnp.inf, ids[example], _EMPTY)
  cand_pos = (idx % (h * w)).astype(jnp.int32)
  neg, all_ids, all_pos = lax.sort(
      (jnp.concatenate([-values, -top], 1), jnp.concatenate([run_ids, cand_ids], 1),
       jnp.concatenate([run_pos, cand_pos], 1)), dimension=1, num_keys=3)
  return -neg[:, :k], all_ids[:, :k], all_pos[:, :k]


@functools.lru_cache(maxsize=16)
def _make_step(net, layer_names, distinct_images):
  """One jitted scan step per (network, layers, mode): repeated scans do not recompile."""
  merge = _merge_images if distinct_images else _merge_units

  @xla.jit
  def step(state, variables, images, ids, mask):
    feats = net.features(variables, images)
    return {l: merge(state[l], feats[l], ids, mask) for l in layer_names}
  return step


@dataclasses.dataclass
class ScanResult:
  """topk: {layer: TopK}; images/labels: {example id: image (S, S, C) / label}
  for every example in the final top-k of the tracked maps; num_examples: valid
  examples scanned."""
  topk: dict[str, TopK]
  images: dict[int, np.ndarray]
  labels: dict[int, int]
  num_examples: int


def scan(net, variables, batches: Iterable[Mapping[str, np.ndarray]], *,
         layers: Sequence[str], k: int = 9, track: Mapping[str, np.ndarray] | None = None,
         total: int | None = None, progress: bool = True, distinct_images: bool = True
         ) -> ScanResult:
  """Streaming top-k of every map of ``layers`` over ``batches``: the k images with the
  largest maximum of the map, each at its strongest unit (``distinct_images``), or the
  k largest units (an image may hold several).

  Args:
    batches: dicts with 'image' float (B, S, S, C) model inputs, 'id' int (B,)
      example ids (unique over the split), optional 'mask' bool (B,) (False =
      padding) and 'label' int (B,).
    track: {layer: map indices} whose top-k examples' images are kept.
    total: examples in the split, for the progress bar.
  """
  net = deconv.as_network(net)
  step = _make_step(net, tuple(layers), bool(distinct_images))
  state = None
  track = {l: np.asarray(c) for l, c in (track or {}).items()}
  images, labels, seen = {}, {}, 0
  bar = console.progress(total=total, desc="top-k scan", unit="ex", disable=not progress)
  for batch in batches:
    ids = np.asarray(batch["id"]).astype(np.int64)
    mask = np.asarray(batch.get("mask", np.ones(ids.shape, bool)), bool)
    if ids.size and (ids[mask].min() < 0 or ids[mask].max() >= _EMPTY):
      raise ValueError(f"example ids must be in [0, {_EMPTY}), got {ids[mask].min()}.."
                       f"{ids[mask].max()}")
    order = np.argsort(np.where(mask, ids, _EMPTY), kind="stable")  # ascending ids
    image = np.asarray(batch["image"])
    label = np.asarray(batch["label"]) if "label" in batch else np.full(ids.shape, -1)
    if np.any(order != np.arange(len(order))):   # no copy when already in order
      ids, mask, image, label = ids[order], mask[order], image[order], label[order]
    if state is None:
      shapes = jax.eval_shape(net.features, variables,
                              jax.ShapeDtypeStruct(image.shape, jnp.float32))
      state = {l: (jnp.full((shapes[l].shape[-1], k), -jnp.inf, jnp.float32),
                   jnp.full((shapes[l].shape[-1], k), _EMPTY, jnp.int32),
                   jnp.zeros((shapes[l].shape[-1], k), jnp.int32)) for l in layers}
      map_shapes = {l: shapes[l].shape[1:3] for l in layers}
    previous, state = state, step(state, variables, jnp.asarray(image, jnp.float32),
                                  jnp.asarray(np.where(mask, ids, _EMPTY), jnp.int32),
                                  jnp.asarray(mask))
    # One step in flight: without this wait the loop runs ahead of the computation and
    # every queued batch keeps its input buffer alive (memory grew with the scan).
    jax.block_until_ready(previous)
    if track:
      wanted = set(np.concatenate([np.asarray(state[l][1])[c].ravel()
                                   for l, c in track.items()]).tolist())
      for i in np.flatnonzero(mask):
        if int(ids[i]) in wanted and int(ids[i]) not in images:
          images[int(ids[i])], labels[int(ids[i])] = image[i].copy(), int(label[i])
      for i in list(images):
        if i not in wanted:
          del images[i], labels[i]
    n = int(mask.sum())
    seen += n
    bar.update(n)
  bar.close()
  if state is None:
    raise ValueError("the dataset split yielded no batches")
  topk = {}
  for l in layers:
    values, ids, pos = (np.asarray(a) for a in state[l])
    w = map_shapes[l][1]
    ids = np.where(ids == _EMPTY, -1, ids).astype(np.int64)
    topk[l] = TopK(values, ids, np.stack([pos // w, pos % w], -1).astype(np.int32))
  return ScanResult(topk, images, labels, seen)


# ----------------------------------------------------------------------------
# 2. Projections and receptive-field patches.
# ----------------------------------------------------------------------------

def project(net, variables, scan_result: ScanResult, layer: str,
            channels: np.ndarray, pixel_mean: np.ndarray, *, rule: str = "deconvnet",
            chunk_size: int = 64) -> LayerAtlas:
  """Project the recorded units of ``channels`` of ``layer`` (``net.project``)
  and crop projections and display images to their receptive fields."""
  net = deconv.as_network(net)
  topk = scan_result.topk[layer]
  channels = np.asarray(channels)
  values, ids, pos = topk.values[channels], topk.ids[channels], topk.positions[channels]
  m, k = ids.shape
  any_image = next(iter(scan_result.images.values()), None)
  if any_image is None:
    raise ValueError("no example images were kept: pass track= to scan()")
  s, cin = any_image.shape[0], any_image.shape[-1]
  rf = net.receptive_fields(s)[layer]
  t = min(rf.size, s)
  flat = np.flatnonzero(ids.ravel() >= 0)  # filled slots
  projections = np.full((m * k, t, t, cin), 0.5, np.float32)
  patches = np.full((m * k, t, t, cin), 0.5, np.float32)
  if flat.size:
    imgs = np.stack([scan_result.images[int(i)] for i in ids.ravel()[flat]])
    chans = np.repeat(channels, k)[flat]
    p = pos.reshape(-1, 2)[flat]
    proj = net.project(variables, jnp.asarray(imgs), layer=layer, channels=np.asarray(chans),
                       positions=np.asarray(p), rule=rule, chunk_size=chunk_size)
    projections[flat] = deconv.crop_receptive_field(np.asarray(deconv.to_image(proj)), rf, p)
    display = np.clip((imgs + np.asarray(pixel_mean, np.float32)) / 255.0, 0.0, 1.0)
    patches[flat] = deconv.crop_receptive_field(display, rf, p)
  labels = np.array([scan_result.labels.get(int(i), -1) for i in ids.ravel()]).reshape(m, k)
  shape = (m, k, t, t, cin)
  return LayerAtlas(layer, channels, values, ids, pos, labels,
                    projections.reshape(shape), patches.reshape(shape), rf)


def window_masks(rf: geometry.ReceptiveField, positions: np.ndarray, input_size: int
                 ) -> np.ndarray:
  """bool (R, t, t): True where each unit's cropped window (``crop_receptive_field``)
  lies inside the image; positions (R, 2)."""
  ones = np.ones((len(positions), input_size, input_size, 1), np.float32)
  return deconv.crop_receptive_field(ones, rf, positions, fill=0.0)[..., 0] > 0


def legibility(a: LayerAtlas, input_size: int) -> legibility_lib.Legibility:
  """``zfnet_jax.analyses.legibility`` of a layer's filled units: the projections' edge
  maps against their patches', the baseline from other maps' patches."""
  filled = a.ids.ravel() >= 0
  t, c = a.projections.shape[2], a.projections.shape[-1]
  proj = a.projections.reshape(-1, t, t, c)[filled]
  patch = a.patches.reshape(-1, t, t, c)[filled]
  groups = np.repeat(a.channels, a.ids.shape[1])[filled]
  mask = window_masks(a.receptive_field, a.positions.reshape(-1, 2)[filled], input_size)
  return legibility_lib.legibility(proj, patch, groups, mask)


def build(net, variables, batches: Iterable[Mapping[str, np.ndarray]],
          pixel_mean: np.ndarray, *, layers: Sequence[str], k: int = 9, num_maps: int = -1,
          rule: str = "deconvnet", chunk_size: int = 64, seed: int = 0,
          total: int | None = None, progress: bool = True, distinct_images: bool = True
          ) -> tuple[dict[str, LayerAtlas], ScanResult]:
  """The atlas of ``layers``: scan (``distinct_images``: see ``scan``), then project
  ``num_maps`` maps per layer (-1 = all; a random subset, seeded, otherwise)."""
  net = deconv.as_network(net)
  input_size = int(np.shape(pixel_mean)[0])
  check_options(net, input_size, layers=layers, k=k, rule=rule, num_maps=num_maps,
                chunk_size=chunk_size)
  widths = geometry.spatial_layers(net, input_size)
  shown = {l: choose_maps(widths[l], num_maps, seed + n) for n, l in enumerate(layers)}
  result = scan(net, variables, batches, layers=layers, k=k, track=shown, total=total,
                progress=progress, distinct_images=distinct_images)
  atlas = {}
  for l in console.progress(layers, desc="projections", unit="layer", disable=not progress):
    atlas[l] = project(net, variables, result, l, shown[l], pixel_mean, rule=rule,
                       chunk_size=chunk_size)
  return atlas, result


def save(a: LayerAtlas, path: str, *, distinct_images: bool, num_examples: int) -> str:
  """Write the numbers behind a layer's Fig. 2 to ``path`` (.npz): channels (M,), and
  per shown map in rank order (best first) values float32 (M, k), ids int64 (M, k)
  (-1 = empty slot), positions int32 (M, k, 2) (row, col), labels (M, k); layer,
  distinct_images (the scan's mode), num_examples (examples scanned)."""
  np.savez_compressed(path, layer=np.asarray(a.layer), channels=a.channels, values=a.values,
                      ids=a.ids, positions=a.positions, labels=a.labels,
                      distinct_images=np.asarray(bool(distinct_images)),
                      num_examples=np.asarray(int(num_examples)))
  return path


def load(path: str) -> dict[str, np.ndarray]:
  """The arrays ``save`` wrote ({name: array}; layer, distinct_images, num_examples as
  Python scalars)."""
  with np.load(path) as f:
    out = {k: f[k] for k in f.files}
  out["layer"], out["distinct_images"] = str(out["layer"]), bool(out["distinct_images"])
  out["num_examples"] = int(out["num_examples"])
  return out


# ----------------------------------------------------------------------------
# 3. The report's Fig. 2 sections.
# ----------------------------------------------------------------------------

MAPS_PER_IMAGE = 16  # maps per panel PNG (a layer with more maps gets several)


@dataclasses.dataclass(frozen=True)
class Options:
  """The atlas of the report (``config.report``)."""
  split: str            # "" = the evaluation split
  layers: tuple[str, ...]
  num_maps: int
  top_k: int
  rule: str
  max_examples: int     # -1 = the whole split
  batch_size: int
  chunk_size: int
  distinct_images: bool = True  # top-k images (paper); False: top-k units


def validate(options, net, data: content.Data) -> Options:
  """``config.report`` checked (types, ranges, rule, layers of the network) -> Options."""
  def pos_int(name, allow_all=False):
    v = options[name]
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or (
        v < 1 and not (allow_all and v == -1)):
      raise ValueError(f"config.report.{name} must be a positive integer"
                       f"{' or -1 (all)' if allow_all else ''}, got {v!r}")
    return int(v)
  layers = options.layers
  if isinstance(layers, str):
    layers = tuple(l.strip() for l in layers.split(",") if l.strip())
  layers = tuple(layers)
  if not layers:
    raise ValueError("config.report.layers is empty; give at least one layer, e.g. conv1")
  rules.get(options.rule, "config.report.rule")
  distinct = options.get("distinct_images", True)
  if not isinstance(distinct, (bool, np.bool_)):
    raise ValueError(f"config.report.distinct_images must be True (top-k images, as the "
                     f"paper) or False (top-k units), got {distinct!r}")
  opts = Options(options.split, layers, pos_int("num_maps", True), pos_int("top_k"),
                 options.rule, pos_int("max_examples", True), pos_int("batch_size"),
                 pos_int("chunk_size"), bool(distinct))
  check_options(net, data.input_size, layers=opts.layers, k=opts.top_k, rule=opts.rule,
                num_maps=opts.num_maps, chunk_size=opts.chunk_size)
  return opts


def sections(context: content.Context, options: Options) -> list[content.Section]:
  """One section per layer: Fig. 2 panels (atlas_<layer>_<n>.png), the top-k table and
  its numbers (atlas_<layer>.npz, ``save``)."""
  atlas, result = build(context.net, context.variables, context.split_batches(),
                        context.pixel_mean, layers=options.layers, k=options.top_k,
                        num_maps=options.num_maps, rule=options.rule,
                        chunk_size=options.chunk_size, seed=context.seed,
                        total=context.split_total, progress=context.progress,
                        distinct_images=options.distinct_images)
  out = []
  for layer, a in atlas.items():
    s = content.Section(f"Layer {layer}", f"layer-{layer}")
    topk = result.topk[layer]
    dead = int(np.sum(topk.values[:, 0] <= 0))
    save(a, context.path(f"atlas_{layer}.npz"), distinct_images=options.distinct_images,
         num_examples=result.num_examples)
    what = (f"the {options.top_k} images with the strongest activation (each image's "
            "maximum over positions), each at its strongest unit," if options.distinct_images
            else f"the top {options.top_k} units (one image may hold several)")
    s.paragraphs.append(
        f"Per map, {what} over {result.num_examples} examples of the "
        f"{context.split_name!s} split, for {len(a.channels)} of the {topk.values.shape[0]} "
        f"feature maps (numbers in atlas_{layer}.npz). Per map: the projections to pixels with the {options.rule} rule (left, "
        f"each scaled on its own, zero = grey) beside the image patches under the "
        f"receptive field ({a.receptive_field.size} px, stride {a.receptive_field.stride}; "
        f"tiles {a.projections.shape[2]} px) (right). Best first, row by row.")
    s.paragraphs.append(f"{dead} of the {topk.values.shape[0]} maps never fire (maximum <= 0) "
                        f"on these examples.")
    if len(a.channels) > 1:
      leg = legibility(a, int(np.shape(context.pixel_mean)[0]))
      s.paragraphs.append(
          f"Legibility (zfnet_jax.analyses.legibility): the projections' edge maps correlate "
          f"{np.mean(leg.matched):.3f} with their own patches' and {np.mean(leg.baseline):.3f} "
          f"with other maps' patches; score {leg.score:.3f} (0 = no better than a "
          f"mismatched patch).")
    k = a.projections.shape[1]
    for p, start in enumerate(range(0, len(a.channels), MAPS_PER_IMAGE)):
      sl = slice(start, start + MAPS_PER_IMAGE)
      titles = [f"map {int(c)}" + (" (never fires)" if v <= 0 else "")
                for c, v in zip(a.channels[sl], a.values[sl, 0])]
      img = figures.atlas_panel(a.projections[sl], a.patches[sl], a.channels[sl], titles=titles)
      fname = f"atlas_{layer}_{p}.png"
      figures.save_png(img, context.path(fname))
      s.figures.append((fname, f"{layer}, maps {', '.join(str(int(c)) for c in a.channels[sl])}."))
    rows = [[str(int(c)), f"{a.values[i, 0]:.4g}", f"{a.values[i, -1]:.4g}",
             ", ".join(f"{int(e)} ({context.class_name(int(l))})"
                       for e, l in zip(a.ids[i], a.labels[i]) if e >= 0)]
            for i, c in enumerate(a.channels)]
    s.tables.append((["map", "top value", f"value #{k}", "examples (class), best first"], rows))
    out.append(s)
  return out
