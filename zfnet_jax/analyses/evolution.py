"""Feature evolution during training (paper Fig. 4).

At each kept evolution checkpoint, for the chosen maps of each layer (a random
subset per layer, seeded, as the paper's "randomly chosen subset", or maps given
by index): find the strongest activation of the map over a search set of
training images, project it to pixels with the deconvnet and crop the
projection to the unit's receptive field.  One grid per layer: rows = epochs,
columns = maps.  The search set is streamed once for all checkpoints (every
checkpoint's forward pass runs on each batch; checkpoints are loaded in groups
of at most ``max_bytes`` of parameters), keeping per (checkpoint, layer, map)
only the best unit and its image.

``tensorboard_panel`` draws the same tiles for the current weights (rows =
layers, columns = maps) as one uint8 image; ``tensorboard_hook`` makes the
training hook that writes it every few steps, so features can be watched while
they form.

Every function takes a ``deconv.Network`` or one of our models.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from zfnet_jax import console, deconv, xla
from zfnet_jax.nn import geometry
from zfnet_jax.render import content, figures

TILE = 48  # side of a tile in pixels (receptive-field crops are resized to it)

Maps = Sequence[int] | Mapping[str, Sequence[int]]   # the same maps in every layer, or per layer


@dataclasses.dataclass(frozen=True)
class Options:
  """layers: spatial layers shown; maps: their channels shown (the same in every layer),
  () = ``num_maps`` random maps per layer (``choose_maps``); max_examples: the first N
  training images searched for the strongest activations (-1 = the whole split)."""
  layers: tuple[str, ...]
  maps: tuple[int, ...]
  max_examples: int
  num_maps: int = 6


def choose_maps(num_channels: int, num_maps: int, seed: int, layer_index: int) -> np.ndarray:
  """Fig. 4's maps of one layer: sorted, ``num_maps`` of ``num_channels`` drawn without
  replacement by ``np.random.default_rng([seed, layer_index, 4])`` (all if num_maps >=
  num_channels)."""
  if num_maps >= num_channels:
    return np.arange(num_channels)
  rng = np.random.default_rng([seed, layer_index, 4])
  return np.sort(rng.choice(num_channels, num_maps, replace=False))


def layer_maps(net, input_size: int, layers: Sequence[str], options: Options, seed: int
               ) -> dict[str, tuple[int, ...]]:
  """{layer: maps shown}: ``options.maps`` in every layer, or random (``choose_maps``)."""
  if options.maps:
    return {l: tuple(options.maps) for l in layers}
  widths = geometry.spatial_layers(deconv.as_network(net), input_size)
  return {l: tuple(int(m) for m in choose_maps(widths[l], options.num_maps, seed, n))
          for n, l in enumerate(layers)}


def _per_layer(layers: Sequence[str], maps: Maps) -> dict[str, tuple[int, ...]]:
  if isinstance(maps, Mapping):
    return {l: tuple(int(m) for m in maps[l]) for l in layers}
  return {l: tuple(int(m) for m in maps) for l in layers}


def check(net, input_size: int, layers: Sequence[str], maps: Maps) -> None:
  """ValueError for an unknown/non-spatial layer or a map out of range in any layer."""
  if not layers or not maps:
    raise ValueError(f"evolution needs layers and maps, got layers={list(layers)} "
                     f"maps={maps!r}")
  net = deconv.as_network(net)
  for layer in layers:
    geometry.check_layer(net, input_size, layer, "evolution layer", spatial=True)
    geometry.check_channels(net, input_size, layer, list(_per_layer([layer], maps)[layer]),
                          "evolution map")


def validate(options, net, data: content.Data) -> Options:
  """Validated options from ``config.analyses.evolution`` (the TensorBoard maps too,
  when ``tensorboard_every_steps`` > 0)."""
  layers, size = tuple(options.layers), data.input_size
  maps, num_maps = tuple(int(m) for m in options.maps), options.get("num_maps", 6)
  if isinstance(num_maps, bool) or not isinstance(num_maps, (int, np.integer)) or num_maps < 1:
    raise ValueError(f"evolution.num_maps {num_maps!r} not allowed: a positive integer "
                     "(random maps per layer, used when evolution.maps is empty)")
  check(net, size, layers, maps or [0])
  if options.max_examples < 1 and options.max_examples != -1:
    raise ValueError(f"evolution.max_examples {options.max_examples} not allowed: >= 1, "
                     "or -1 (the whole training split)")
  if options.tensorboard_every_steps > 0:
    check(net, size, layers, list(options.tensorboard_maps))
  return Options(layers, maps, int(options.max_examples), int(num_maps))


@functools.lru_cache(maxsize=32)
def _batch_max_fn(net: deconv.Network, maps: tuple[tuple[str, tuple[int, ...]], ...]):
  """jit((variables, x (B, S, S, C), mask (B,)) -> {layer: (max (M,), (image, row, col)
  (3 x (M,)) of each map's strongest activation, ``deconv.strongest_in``)}); masked
  images never win."""
  def batch_max(variables, x, mask):
    f = net.features(variables, x)
    out = {}
    for layer, idx in maps:
      a = f[layer][..., np.asarray(idx, np.int32)].astype(jnp.float32)   # (B, H, W, M)
      a = jnp.where(mask[:, None, None, None], a, -jnp.inf)
      where, value = deconv.strongest_in(jnp.moveaxis(a, -1, 0), 3)
      out[layer] = (value, where)
    return out
  return xla.jit(batch_max)


def _array_batches(images: np.ndarray, batch_size: int) -> Iterator[dict]:
  """Batches of ``images`` (N, S, S, C), ids = index, the last padded (mask False)."""
  bs = max(1, min(batch_size, len(images)))
  for start in range(0, len(images), bs):
    x = images[start:start + bs]
    n = len(x)
    if n < bs:
      x = np.concatenate([x, np.zeros((bs - n,) + x.shape[1:], x.dtype)])
    yield {"image": x, "id": np.arange(start, start + bs), "mask": np.arange(bs) < n}


Best = dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]


def strongest_many(net, variables: Sequence[Any], batches: Iterable[Mapping[str, np.ndarray]],
                   layers: Sequence[str], maps: Maps, progress: bool = False
                   ) -> tuple[list[Best], dict[int, np.ndarray]]:
  """One pass over ``batches`` for several sets of ``variables`` (E checkpoints).

  batches: {"image" (B, S, S, C), "id" (B,) ascending over the stream, optional "mask"}.
  Returns ([{layer: (example id (M,), position (M, 2) (row, col), value (M,))}] per
  variables, {id: image (S, S, C)} of every winner).  Ties: the first in (stream order,
  row, col).
  """
  net = deconv.as_network(net)
  per = _per_layer(layers, maps)
  fn = _batch_max_fn(net, tuple(per.items()))
  best = [{l: (np.full(len(m), -1), np.zeros((len(m), 2), int), np.full(len(m), -np.inf))
           for l, m in per.items()} for _ in variables]
  images, hw = {}, None
  bar = console.progress(desc="evolution search", unit="ex", disable=not progress)
  for batch in batches:
    x = np.asarray(batch["image"], np.float32)
    ids = np.asarray(batch["id"]).astype(np.int64)
    mask = np.asarray(batch.get("mask", np.ones(len(ids), bool)), bool)
    if hw is None:
      shapes = jax.eval_shape(net.features, variables[0],
                              jax.ShapeDtypeStruct(x.shape, jnp.float32))
      hw = {l: shapes[l].shape[1:3] for l in per}
    xd, md = jnp.asarray(x), jnp.asarray(mask)
    res = jax.device_get([fn(v, xd, md) for v in variables])    # every checkpoint, one batch
    for e, r in enumerate(res):
      for l, (val, (b, i, j)) in r.items():
        better = val > best[e][l][2]
        best[e][l][0][better] = ids[b[better]]
        best[e][l][1][better] = np.stack([i, j], 1)[better]
        best[e][l][2][better] = val[better]
    wanted = {int(i) for b_ in best for (w, _, _) in b_.values() for i in w}
    for k in np.flatnonzero(mask):
      if int(ids[k]) in wanted and int(ids[k]) not in images:
        images[int(ids[k])] = x[k].copy()
    for i in [i for i in images if i not in wanted]:
      del images[i]
    bar.update(int(mask.sum()))
  bar.close()
  if hw is None:
    raise ValueError("the evolution search set yielded no batches")
  return best, images


def strongest(net, variables, images: np.ndarray, layers: Sequence[str], maps: Maps,
              batch_size: int = 64) -> Best:
  """{layer: (image index (M,), position (M, 2) (row, col), value (M,))} of each map's
  strongest activation over ``images`` (N, S, S, C) (first in (image, row, col) order on
  ties); ``maps``: the same in every layer, or {layer: maps}."""
  (best,), _ = strongest_many(net, [variables], _array_batches(images, batch_size), layers,
                              maps)
  return best


def _project(net, variables, best: Best, images: Mapping[int, np.ndarray], maps: Maps,
             input_size: int, rule: str, tile: int | None) -> dict[str, np.ndarray]:
  """{layer: (M, t, t, C)}: the projections of ``best``'s units, cropped and resized."""
  layers = list(best)
  per = _per_layer(layers, maps)
  req_img = np.concatenate([best[l][0] for l in layers])
  req_pos = np.concatenate([best[l][1] for l in layers]).astype(np.int32)
  names = [l for l in layers for _ in per[l]]
  proj = np.asarray(net.project(variables, np.stack([images[int(i)] for i in req_img]),
                                layer=names, positions=req_pos, rule=rule,
                                channels=np.concatenate([np.asarray(per[l], np.int32)
                                                         for l in layers])))
  fields = net.receptive_fields(input_size)
  out, start = {}, 0
  for layer in layers:
    part = slice(start, start + len(per[layer]))
    start = part.stop
    crops = deconv.crop_receptive_field(deconv.to_image(proj[part]), fields[layer],
                                        req_pos[part])
    out[layer] = crops if tile is None else np.stack([_resize(c, tile) for c in crops])
  return out


def tiles(net, variables, images: np.ndarray, layers: Sequence[str], maps: Maps,
          rule: str = "deconvnet", batch_size: int = 64, tile: int | None = TILE
          ) -> dict[str, np.ndarray]:
  """{layer: (M, t, t, C) in [0, 1]}: per map, the projection of its strongest activation
  over ``images`` (N, S, S, C), cropped to the receptive field as the atlas crops
  (``deconv.crop_receptive_field``: t = min(its size, S); parts outside the image
  mid-grey; the whole image when the field is larger) and resized to ``tile`` x ``tile``
  (nearest up, bilinear down; None = not)."""
  net = deconv.as_network(net)
  check(net, images.shape[1], layers, maps)
  best = strongest(net, variables, images, layers, maps, batch_size)
  return _project(net, variables, best, dict(enumerate(images)), maps, images.shape[1], rule,
                  tile)


def _resize(image: np.ndarray, tile: int) -> np.ndarray:
  method = Image.NEAREST if image.shape[0] <= tile else Image.BILINEAR
  chans = [np.asarray(Image.fromarray(np.float32(image[..., c])).resize((tile, tile), method))
           for c in range(image.shape[-1])]
  return np.stack(chans, -1).astype(np.float32)


def tensorboard_panel(net, variables, images, layers: Sequence[str], maps: Sequence[int],
                      rule: str = "deconvnet", tile: int = TILE) -> np.ndarray:
  """uint8 (H, W, 3) image for TensorBoard: rows = layers, columns = maps; each tile the
  projection of the map's strongest activation over ``images`` (mean-subtracted
  (N, S, S, C)), cropped to the receptive field and resized to ``tile`` px."""
  t = tiles(net, variables, np.asarray(images, np.float32), layers, maps, rule, tile=tile)
  return figures.grid(np.concatenate([t[l] for l in layers]), len(maps), 1, gap=2)


def tensorboard_hook(net, images: np.ndarray, *, layers: Sequence[str], maps: Sequence[int],
                     rule: str = "deconvnet", every: int = 0
                     ) -> Callable[[int, Any, Any], None] | None:
  """A training hook: None when ``every`` <= 0, else ``hook(step, state, writer)`` that,
  every ``every`` steps, writes ``tensorboard_panel`` of ``images`` (N, S, S, C) at
  ``state.params`` as the image "evolution/projections" (``writer``: a clu metric writer).
  ``layers`` and ``maps`` are checked first (ValueError)."""
  net = deconv.as_network(net)
  images = np.asarray(images, np.float32)
  layers, maps = tuple(layers), [int(m) for m in maps]
  check(net, images.shape[1], layers, maps)
  every = int(every)
  if every <= 0:
    return None

  def hook(step: int, state, writer) -> None:
    if step % every:
      return
    panel = tensorboard_panel(net, {"params": jax.device_get(state.params)}, images, layers,
                              maps, rule)
    writer.write_images(int(step), {"evolution/projections": panel[None]})
    writer.flush()
  return hook


def grids(net, checkpoints: Sequence[tuple[float, Any]],
          images: np.ndarray | Callable[[], Iterable[Mapping[str, np.ndarray]]],
          layers: Sequence[str], maps: Maps, rule: str = "deconvnet",
          batch_size: int = 64, tile: int | None = TILE, progress: bool = True,
          max_bytes: int = 4 << 30, details: bool = False):
  """(epochs, {layer: (E, M, t, t, C) tiles}): ``tiles`` at each checkpoint; with
  ``details`` also {layer: (example ids (E, M), positions (E, M, 2), values (E, M))} of
  the projected units.

  checkpoints: E pairs (epoch, variables), or (epoch, () -> variables) to load them
  one at a time.  images: the search set, (N, S, S, C), or () -> a fresh iterator of
  its batches (as ``strongest_many`` takes).  One pass over the search set serves
  every checkpoint whose parameters fit, with the others loaded, in ``max_bytes``.
  """
  net = deconv.as_network(net)
  if not checkpoints:
    raise ValueError("no evolution checkpoints given")
  if isinstance(images, np.ndarray):
    array = images
    images = lambda: _array_batches(array, batch_size)
  epochs, per = [float(e) for e, _ in checkpoints], {l: [] for l in layers}
  units = {l: [] for l in layers}
  bar = console.progress(total=len(checkpoints), desc="feature evolution", unit="checkpoint",
                         disable=not progress)
  pending = list(checkpoints)
  while pending:
    group, used = [], 0
    while pending:
      v = pending[0][1]
      v = v() if callable(v) else v
      size = sum(np.asarray(a).nbytes for a in jax.tree_util.tree_leaves(v))
      if group and used + size > max_bytes:
        break
      group.append(v)
      used += size
      pending.pop(0)
    best, found = strongest_many(net, group, images(), layers, maps)
    size_s = next(iter(found.values())).shape[0]
    for v, b in zip(group, best):
      t = _project(net, v, b, found, maps, size_s, rule, tile)
      for l in layers:
        per[l].append(t[l])
        units[l].append(b[l])
      bar.update(1)
  bar.close()
  tiles_ = {l: np.stack(v) for l, v in per.items()}
  if not details:
    return epochs, tiles_
  return epochs, tiles_, {l: tuple(np.stack(a) for a in zip(*u)) for l, u in units.items()}


def plot_grid(epochs, tiles_: np.ndarray, maps, layer: str, path: str) -> str:
  """Fig. 4 for one layer: rows = epochs (labelled), columns = maps."""
  plt = figures.pyplot()
  e, m = tiles_.shape[:2]
  img = figures.grid(tiles_.reshape((-1,) + tiles_.shape[2:]), m, 1, gap=2)
  fig, ax = plt.subplots(figsize=(1.0 + 0.75 * m, 0.3 + 0.75 * e))
  ax.imshow(img, interpolation="nearest")
  step = tiles_.shape[2] + 2
  ax.set_yticks([step * r + tiles_.shape[2] / 2 for r in range(e)])
  ax.set_yticklabels([f"epoch {x:g}" for x in epochs], fontsize=8)
  ax.set_xticks([step * c + tiles_.shape[3] / 2 for c in range(m)])
  ax.set_xticklabels([f"map {c}" for c in maps], fontsize=7)
  ax.set_title(f"{layer}: strongest activation over the training sample, projected", fontsize=9)
  return figures.save_figure(fig, path)


def sections(context: content.Context, options: Options) -> list[content.Section]:
  """Fig. 4 over ``context.checkpoints``: evolution_<layer>.png and evolution.npz
  (epochs (E,), num_examples searched, per layer: maps_<layer> (M,), <layer> tiles
  (E, M, t, t, C), ids_<layer> (E, M) training example ids, positions_<layer> (E, M, 2),
  values_<layer> (E, M))."""
  layers = list(options.layers)
  sec = content.Section("Feature evolution", "evolution")
  if not context.checkpoints:
    sec.paragraphs.append("No evolution checkpoints in this run (config.evolution_epochs).")
    return [sec]
  size = int(np.shape(context.pixel_mean)[0]) if context.data is None else context.data.input_size
  maps = layer_maps(context.net, size, layers, options, context.seed)
  counted = []

  def batches():     # one pass per group of checkpoints: count the examples of the last
    counted.clear()
    for b in context.train_batches(options.max_examples):
      counted.append(int(np.sum(b.get("mask", np.ones(len(b["id"]), bool)))))
      yield b
  epochs, g, units = grids(context.net, context.checkpoints, batches, layers, maps,
                           context.rule, context.batch_size, progress=context.progress,
                           details=True)
  n = sum(counted)
  np.savez_compressed(
      context.path("evolution.npz"), epochs=np.asarray(epochs), num_examples=np.asarray(n),
      **{f"maps_{l}": np.asarray(maps[l]) for l in layers}, **g,
      **{f"{k}_{l}": a for l in layers for k, a in zip(("ids", "positions", "values"), units[l])})
  chosen = ("maps " + ", ".join(map(str, options.maps)) + " of each layer" if options.maps
            else f"{options.num_maps} maps of each layer chosen at random (seed {context.seed})")
  sec.paragraphs.append(
      f"Paper Fig. 4: for {chosen}, the strongest activation over the first {n} training "
      f"examples (centre crops), projected with the {context.rule} rule and cropped to the "
      f"receptive field, at each kept checkpoint (epochs {', '.join(f'{e:g}' for e in epochs)}). "
      "Each tile is scaled on its own (zero = mid-grey). The image that wins may change from "
      "row to row.")
  for l in layers:
    plot_grid(epochs, g[l], maps[l], l, context.path(f"evolution_{l}.png"))
    sec.figures.append((f"evolution_{l}.png", f"{l}: rows = epochs, columns = maps "
                        f"{', '.join(map(str, maps[l]))}."))
  return [sec]
