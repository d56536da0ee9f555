"""Feature atlas (paper Fig. 2): the top-k activations of every feature map over
a dataset split, projected back to pixels, beside the image patches they saw.

Two steps:

1. ``scan``: one streaming pass over the split.  A jitted step computes the
   chosen layers' activations for a batch, takes the batch's top-k per map
   with ``lax.top_k`` and merges them with the running top-k.  Memory is
   bounded: per map only k (value, example id, position) triples are kept on
   the device, plus, on the host, the images of the current top-k of the maps
   that will be shown.
2. ``project``: every recorded unit of the shown maps is projected to pixels
   with ``deconv.project_many`` (one batched call per layer), and both the
   projection and the original image are cropped to the unit's receptive field
   (``models.receptive_fields``).

Ties are deterministic: a larger value ranks first, then the lower example id,
then the lower flat position ``row * width + col`` in the map.  (ReLU maps have
many exact zeros, so ties are common in dead or sparse maps.)  Slots that no
valid example filled (fewer than k candidates) have id -1 and value -inf.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm.auto import tqdm

from zfnet_jax import layers as layers_lib
from zfnet_jax import models

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
  receptive_field: models.ReceptiveField


def spatial_layers(model: models.PaperNet, input_size: int) -> dict[str, int]:
  """{name: maps} of every conv/pool/norm layer the model has at this input size."""
  return {s.name: s.features for s in model.layer_table(input_size) if s.kind != "fc"}


def check_options(model: models.PaperNet, input_size: int, *, layers: Sequence[str],
                  k: int, rule: str, num_maps: int = -1, chunk_size: int = 1) -> None:
  """Raise ValueError naming the bad option and what is allowed (before any scan)."""
  allowed = spatial_layers(model, input_size)
  if isinstance(layers, str) or not layers:
    raise ValueError(f"layers must be a non-empty sequence of layer names, got {layers!r}; "
                     f"allowed: {', '.join(allowed)}")
  bad = [l for l in layers if l not in allowed]
  if bad:
    raise ValueError(f"unknown layer(s) {bad} for {type(model).__name__} at {input_size}x"
                     f"{input_size}; allowed: {', '.join(allowed)}")
  if len(set(layers)) != len(layers):
    raise ValueError(f"layers listed twice: {list(layers)}")
  layers_lib.check_rule(rule)
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

def _merge(state, act, ids, mask):
  """Merge one layer's batch into its running top-k.

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
  best = jnp.sort(lax.top_k(jnp.max(v, axis=1).T, kb)[1], axis=1)          # (C, kb)
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
def _make_step(model, layer_names):
  """One jitted scan step per (model, layers): repeated scans do not recompile."""
  @jax.jit
  def step(state, variables, images, ids, mask):
    feats = model.apply(variables, images, method="features")
    return {l: _merge(state[l], feats[l], ids, mask) for l in layer_names}
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


def scan(model: models.PaperNet, variables, batches: Iterable[Mapping[str, np.ndarray]], *,
         layers: Sequence[str], k: int = 9, track: Mapping[str, np.ndarray] | None = None,
         total: int | None = None, progress: bool = True) -> ScanResult:
  """Streaming top-k of every map of ``layers`` over ``batches``.

  Args:
    batches: dicts with 'image' float (B, S, S, C) model inputs, 'id' int (B,)
      example ids (unique over the split), optional 'mask' bool (B,) (False =
      padding) and 'label' int (B,).
    track: {layer: map indices} whose top-k examples' images are kept.
    total: examples in the split, for the progress bar.
  """
  step = _make_step(model, tuple(layers))
  state = None
  track = {l: np.asarray(c) for l, c in (track or {}).items()}
  images, labels, seen = {}, {}, 0
  bar = tqdm(total=total, desc="top-k scan", unit="ex", disable=not progress)
  for batch in batches:
    ids = np.asarray(batch["id"]).astype(np.int64)
    mask = np.asarray(batch.get("mask", np.ones(ids.shape, bool)), bool)
    if ids.size and (ids[mask].min() < 0 or ids[mask].max() >= _EMPTY):
      raise ValueError(f"example ids must be in [0, {_EMPTY}), got {ids[mask].min()}.."
                       f"{ids[mask].max()}")
    order = np.argsort(np.where(mask, ids, _EMPTY), kind="stable")  # ascending ids
    ids, mask = ids[order], mask[order]
    image = np.asarray(batch["image"])[order]
    label = np.asarray(batch["label"])[order] if "label" in batch else np.full(ids.shape, -1)
    if state is None:
      shapes = jax.eval_shape(lambda v, x: model.apply(v, x, method="features"),
                              variables, jax.ShapeDtypeStruct(image.shape, jnp.float32))
      state = {l: (jnp.full((shapes[l].shape[-1], k), -jnp.inf, jnp.float32),
                   jnp.full((shapes[l].shape[-1], k), _EMPTY, jnp.int32),
                   jnp.zeros((shapes[l].shape[-1], k), jnp.int32)) for l in layers}
      map_shapes = {l: shapes[l].shape[1:3] for l in layers}
    state = step(state, variables, jnp.asarray(image, jnp.float32),
                 jnp.asarray(np.where(mask, ids, _EMPTY), jnp.int32), jnp.asarray(mask))
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

def crop_receptive_field(images: np.ndarray, rf: models.ReceptiveField,
                         positions: np.ndarray, fill: float = 0.5) -> np.ndarray:
  """Crop each image to its unit's receptive field.

  images (R, S, S, C); positions (R, 2) (row, col) of the units -> (R, t, t, C)
  with t = min(rf.size, S).  The clipped window sits where it lies in the full
  receptive field (when rf.size <= S), so the part outside the image is
  ``fill``; when rf.size > S the window is the whole image.
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


def project(model: models.PaperNet, variables, scan_result: ScanResult, layer: str,
            channels: np.ndarray, pixel_mean: np.ndarray, *, rule: str = "deconvnet",
            chunk_size: int = 64) -> LayerAtlas:
  """Project the recorded units of ``channels`` of ``layer`` (deconv.project_many)
  and crop projections and display images to their receptive fields."""
  from zfnet_jax import deconv  # pylint: disable=g-import-not-at-top
  topk = scan_result.topk[layer]
  channels = np.asarray(channels)
  values, ids, pos = topk.values[channels], topk.ids[channels], topk.positions[channels]
  m, k = ids.shape
  any_image = next(iter(scan_result.images.values()), None)
  if any_image is None:
    raise ValueError("no example images were kept: pass track= to scan()")
  s, cin = any_image.shape[0], any_image.shape[-1]
  rf = models.receptive_fields(model, s)[layer]
  t = min(rf.size, s)
  flat = np.flatnonzero(ids.ravel() >= 0)  # filled slots
  projections = np.full((m * k, t, t, cin), 0.5, np.float32)
  patches = np.full((m * k, t, t, cin), 0.5, np.float32)
  if flat.size:
    imgs = np.stack([scan_result.images[int(i)] for i in ids.ravel()[flat]])
    chans = np.repeat(channels, k)[flat]
    p = pos.reshape(-1, 2)[flat]
    proj = deconv.project_many(model, variables, jnp.asarray(imgs), layer=layer,
                               channels=jnp.asarray(chans), positions=jnp.asarray(p),
                               rule=rule, chunk_size=chunk_size)
    projections[flat] = crop_receptive_field(np.asarray(deconv.to_image(proj)), rf, p)
    display = np.clip((imgs + np.asarray(pixel_mean, np.float32)) / 255.0, 0.0, 1.0)
    patches[flat] = crop_receptive_field(display, rf, p)
  labels = np.array([scan_result.labels.get(int(i), -1) for i in ids.ravel()]).reshape(m, k)
  shape = (m, k, t, t, cin)
  return LayerAtlas(layer, channels, values, ids, pos, labels,
                    projections.reshape(shape), patches.reshape(shape), rf)


def build(model: models.PaperNet, variables, batches: Iterable[Mapping[str, np.ndarray]],
          pixel_mean: np.ndarray, *, layers: Sequence[str], k: int = 9, num_maps: int = -1,
          rule: str = "deconvnet", chunk_size: int = 64, seed: int = 0,
          total: int | None = None, progress: bool = True
          ) -> tuple[dict[str, LayerAtlas], ScanResult]:
  """The atlas of ``layers``: scan, then project ``num_maps`` maps per layer
  (-1 = all; a random subset, seeded, otherwise)."""
  input_size = int(np.shape(pixel_mean)[0])
  check_options(model, input_size, layers=layers, k=k, rule=rule, num_maps=num_maps,
                chunk_size=chunk_size)
  widths = spatial_layers(model, input_size)
  shown = {l: choose_maps(widths[l], num_maps, seed + n) for n, l in enumerate(layers)}
  result = scan(model, variables, batches, layers=layers, k=k, track=shown, total=total,
                progress=progress)
  atlas = {}
  for l in tqdm(layers, desc="projections", disable=not progress):
    atlas[l] = project(model, variables, result, l, shown[l], pixel_mean, rule=rule,
                       chunk_size=chunk_size)
  return atlas, result
