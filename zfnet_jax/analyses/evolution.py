"""Feature evolution during training (paper Fig. 4).

At each kept evolution checkpoint, for the chosen maps of each layer: find the
strongest activation of the map over a sample of training images, project it
to pixels with the deconvnet and crop the projection to the unit's receptive
field.  One grid per layer: rows = epochs, columns = maps.

``tensorboard_panel`` draws the same tiles for the current weights (rows =
layers, columns = maps) as one uint8 image; ``tensorboard_hook`` makes the
training hook that writes it every few steps, so features can be watched while
they form.

Every function takes a ``deconv.Network`` or one of our models.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from zfnet_jax import console, deconv, figures, models
from zfnet_jax import sections as sections_lib

TILE = 48  # side of a tile in pixels (receptive-field crops are resized to it)


@dataclasses.dataclass(frozen=True)
class Options:
  """layers: spatial layers shown; maps: their channels shown (the same in every layer);
  max_examples: training images searched for the strongest activations."""
  layers: tuple[str, ...]
  maps: tuple[int, ...]
  max_examples: int


def check(net, input_size: int, layers: Sequence[str], maps: Sequence[int]) -> None:
  """ValueError for an unknown/non-spatial layer or a map out of range in any layer."""
  if not layers or not maps:
    raise ValueError(f"evolution needs layers and maps, got layers={list(layers)} "
                     f"maps={list(maps)}")
  net = deconv.as_network(net)
  for layer in layers:
    models.check_layer(net, input_size, layer, "evolution layer", spatial=True)
    models.check_channels(net, input_size, layer, maps, "evolution map")


def validate(options, net, data: sections_lib.Data) -> Options:
  """Validated options from ``config.analyses.evolution`` (the TensorBoard maps too,
  when ``tensorboard_every_steps`` > 0)."""
  layers, size = tuple(options.layers), data.input_size
  check(net, size, layers, list(options.maps))
  if options.max_examples < 1:
    raise ValueError(f"evolution.max_examples {options.max_examples} not allowed: >= 1")
  if options.tensorboard_every_steps > 0:
    check(net, size, layers, list(options.tensorboard_maps))
  return Options(layers, tuple(int(m) for m in options.maps), int(options.max_examples))


@functools.lru_cache(maxsize=32)
def _batch_max_fn(net: deconv.Network, layers: tuple[str, ...], maps: tuple[int, ...]):
  """jit((variables, x (B, S, S, C)) -> {layer: (max (M,), flat argmax (M,), (H, W))})."""
  idx = np.asarray(maps, np.int32)

  def batch_max(variables, x):
    f = net.features(variables, x)
    out = {}
    for layer in layers:
      a = f[layer][..., idx]                                # (B, H, W, M)
      flat = a.reshape(-1, len(idx))
      out[layer] = (flat.max(0), jnp.argmax(flat, 0), jnp.asarray(a.shape[1:3]))
    return out
  return jax.jit(batch_max)


def strongest(net, variables, images: np.ndarray, layers: Sequence[str], maps: Sequence[int],
              batch_size: int = 64) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """{layer: (image index (M,), position (M, 2) (row, col), value (M,))} of each map's
  strongest activation over ``images`` (N, S, S, C) (first in (image, row, col) order on
  ties)."""
  net = deconv.as_network(net)
  layers = tuple(layers)
  maps = tuple(int(m) for m in maps)
  fn = _batch_max_fn(net, layers, maps)
  m = len(maps)
  best = {l: (np.full(m, -np.inf), np.zeros(m, int), np.zeros((m, 2), int)) for l in layers}
  bs = max(1, min(batch_size, len(images)))
  for start in range(0, len(images), bs):
    x = images[start:start + bs]
    pad = bs - len(x)
    if pad:      # pad by repeating the first image of the batch: never a new maximum
      x = np.concatenate([x, np.repeat(x[:1], pad, 0)])
    res = jax.device_get(fn(variables, jnp.asarray(x)))
    for l, (val, arg, hw) in res.items():
      b, i, j = np.unravel_index(arg, (bs, hw[0], hw[1]))
      better = val > best[l][0]
      best[l][0][better] = val[better]
      best[l][1][better] = start + b[better]
      best[l][2][better] = np.stack([i, j], 1)[better]
  return {l: (idx, pos, val) for l, (val, idx, pos) in best.items()}


def tiles(net, variables, images: np.ndarray, layers: Sequence[str], maps: Sequence[int],
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
  m = len(maps)
  req_img = np.concatenate([best[l][0] for l in layers])
  req_pos = np.concatenate([best[l][1] for l in layers]).astype(np.int32)
  names = [l for l in layers for _ in range(m)]
  proj = np.asarray(net.project(variables, images[req_img], layer=names,
                                channels=np.tile(np.asarray(maps, np.int32), len(layers)),
                                positions=req_pos, rule=rule))
  fields = net.receptive_fields(images.shape[1])
  out = {}
  for k, layer in enumerate(layers):
    part = slice(k * m, (k + 1) * m)
    crops = deconv.crop_receptive_field(deconv.to_image(proj[part]), fields[layer],
                                        req_pos[part])
    out[layer] = crops if tile is None else np.stack([_resize(c, tile) for c in crops])
  return out


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


def grids(net, checkpoints: Sequence[tuple[float, Any]], images: np.ndarray,
          layers: Sequence[str], maps: Sequence[int], rule: str = "deconvnet",
          batch_size: int = 64, tile: int | None = TILE, progress: bool = True
          ) -> tuple[list[float], dict[str, np.ndarray]]:
  """(epochs, {layer: (E, M, t, t, C) tiles}): ``tiles`` at each checkpoint.

  checkpoints: E pairs (epoch, variables), or (epoch, () -> variables) to load them
  one at a time.
  """
  net = deconv.as_network(net)
  if not checkpoints:
    raise ValueError("no evolution checkpoints given")
  epochs, per = [], {l: [] for l in layers}
  it = console.progress(checkpoints, desc="feature evolution", unit="checkpoint",
                        disable=not progress)
  for epoch, variables in it:
    if callable(variables):
      variables = variables()
    t = tiles(net, variables, images, layers, maps, rule, batch_size, tile)
    for l in layers:
      per[l].append(t[l])
    epochs.append(float(epoch))
  return epochs, {l: np.stack(v) for l, v in per.items()}


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


def sections(context: sections_lib.Context, options: Options) -> list[sections_lib.Section]:
  """Fig. 4 over ``context.checkpoints``: evolution.npz, evolution_<layer>.png."""
  layers, maps = list(options.layers), list(options.maps)
  sec = sections_lib.Section("Feature evolution", "evolution")
  if not context.checkpoints:
    sec.paragraphs.append("No evolution checkpoints in this run (config.evolution_epochs).")
    return [sec]
  images = context.train_images(options.max_examples)
  epochs, g = grids(context.net, context.checkpoints, images, layers, maps, context.rule,
                    context.batch_size, progress=context.progress)
  np.savez_compressed(context.path("evolution.npz"), epochs=np.asarray(epochs),
                      maps=np.asarray(maps), **g)
  sec.paragraphs.append(
      f"Paper Fig. 4: for maps {', '.join(map(str, maps))} of each layer, the strongest "
      f"activation over the first {len(images)} training examples (centre crops), projected "
      f"with the {context.rule} rule and cropped to the receptive field, at each kept "
      f"checkpoint (epochs {', '.join(f'{e:g}' for e in epochs)}). Each tile is scaled on its "
      "own (zero = mid-grey). The image that wins may change from row to row.")
  for l in layers:
    plot_grid(epochs, g[l], maps, l, context.path(f"evolution_{l}.png"))
    sec.figures.append((f"evolution_{l}.png", f"{l}: rows = epochs, columns = maps."))
  return [sec]
