"""Feature evolution during training (paper Fig. 4).

At each kept evolution checkpoint (``train.evolution_checkpoints``), for the
chosen maps of each layer: find the strongest activation of the map over a
sample of the training split (the first ``max_examples`` examples, centre
crops), project it to pixels with the deconvnet and crop the projection to the
unit's receptive field.  One grid per layer: rows = epochs, columns = maps.

``tensorboard_panel`` draws the same tiles for the current weights (rows =
layers, columns = maps) as one uint8 image; the training loop writes it every
``analyses.evolution.tensorboard_every_steps`` steps, so features can be
watched while they form.
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zfnet_jax.analyses import common

TILE = 48  # side of a tile in pixels (receptive-field crops are resized to it)


def check(model, input_size: int, layers: Sequence[str], maps: Sequence[int]) -> None:
  """ValueError for an unknown/non-spatial layer or a map out of range in any layer."""
  if not layers or not maps:
    raise ValueError(f"evolution needs layers and maps, got layers={list(layers)} "
                     f"maps={list(maps)}")
  for layer in layers:
    common.check_layer(model, input_size, layer, "evolution layer",
                       common.spatial_layers(model, input_size))
    common.check_channels(model, input_size, layer, maps, "evolution map")


def strongest(model, variables, images: np.ndarray, layers: Sequence[str], maps: Sequence[int],
              batch_size: int = 64) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """{layer: (image index (M,), position (M, 2), value (M,))} of each map's strongest
  activation over ``images`` (first in (image, row, col) order on ties)."""
  maps = np.asarray(maps, np.int32)

  @jax.jit
  def batch_max(v, x):
    f = model.apply(v, x, method="features")
    out = {}
    for layer in layers:
      a = f[layer][..., maps]                               # (B, H, W, M)
      flat = a.reshape(-1, len(maps))
      out[layer] = (flat.max(0), jnp.argmax(flat, 0), jnp.asarray(a.shape[1:3]))
    return out

  best = {l: (np.full(len(maps), -np.inf), np.zeros(len(maps), int), np.zeros((len(maps), 2), int))
          for l in layers}
  bs = max(1, min(batch_size, len(images)))
  for start in range(0, len(images), bs):
    x = images[start:start + bs]
    pad = bs - len(x)
    if pad:      # pad by repeating the first image of the batch: never a new maximum
      x = np.concatenate([x, np.repeat(x[:1], pad, 0)])
    res = jax.device_get(batch_max(variables, jnp.asarray(x)))
    for l, (val, arg, hw) in res.items():
      b, i, j = np.unravel_index(arg, (bs, hw[0], hw[1]))
      better = val > best[l][0]
      best[l][0][better] = val[better]
      best[l][1][better] = start + b[better]
      best[l][2][better] = np.stack([i, j], 1)[better]
  return {l: (idx, pos, val) for l, (val, idx, pos) in best.items()}


def tiles(model, variables, images: np.ndarray, layers: Sequence[str], maps: Sequence[int],
          rule: str = "deconvnet", batch_size: int = 64, tile: int | None = TILE
          ) -> dict[str, np.ndarray]:
  """{layer: (M, t, t, C) in [0, 1]}: per map, the projection of its strongest activation
  over ``images``, cropped to the receptive field (t = its size; parts outside the image
  mid-grey) and resized to ``tile`` x ``tile`` (nearest up, bilinear down; None = not)."""
  from zfnet_jax import deconv
  check(model, images.shape[1], layers, maps)
  best = strongest(model, variables, images, layers, maps, batch_size)
  m = len(maps)
  req_img = np.concatenate([best[l][0] for l in layers])
  req_pos = np.concatenate([best[l][1] for l in layers]).astype(np.int32)
  names = [l for l in layers for _ in range(m)]
  proj = np.asarray(deconv.project_many(model, variables, images[req_img], layer=names,
                                        channels=np.tile(np.asarray(maps, np.int32), len(layers)),
                                        positions=req_pos, rule=rule))
  out = {l: [] for l in layers}
  for p, layer, pos in zip(proj, names, req_pos):
    crop = deconv.to_image(deconv.receptive_patch(model, p, layer, tuple(pos), fill=0.0))
    out[layer].append(crop if tile is None else _resize(crop, tile))
  return {l: np.stack(v) for l, v in out.items()}


def _resize(image: np.ndarray, tile: int) -> np.ndarray:
  from PIL import Image
  method = Image.NEAREST if image.shape[0] <= tile else Image.BILINEAR
  chans = [np.asarray(Image.fromarray(np.float32(image[..., c])).resize((tile, tile), method))
           for c in range(image.shape[-1])]
  return np.stack(chans, -1).astype(np.float32)


def tensorboard_panel(model, variables, images, layers: Sequence[str], maps: Sequence[int],
                      rule: str = "deconvnet", tile: int = TILE) -> np.ndarray:
  """uint8 (H, W, 3) image for TensorBoard: rows = layers, columns = maps; each tile the
  deconvnet projection of the map's strongest activation over ``images`` (mean-subtracted
  (N, S, S, C)), cropped to the receptive field.  For the training loop, e.g.
  ``writer.write_images(step, {"evolution": panel[None]})``."""
  from zfnet_jax import figures
  t = tiles(model, variables, np.asarray(images, np.float32), layers, maps, rule, tile=tile)
  return figures.grid(np.concatenate([t[l] for l in layers]), len(maps), 1, gap=2)


def tensorboard_hook(config, workdir: str, model, num_images: int = 64):
  """For the training loop: None when ``analyses.evolution.tensorboard_every_steps`` is 0,
  else ``hook(step, params, writer)`` that writes ``tensorboard_panel`` of the first
  ``num_images`` training examples (maps ``tensorboard_maps`` of ``evolution.layers``) as
  the image "evolution/projections" every that many steps (a clu metric writer)."""
  ec = config.analyses.evolution
  every = int(ec.tensorboard_every_steps)
  if every <= 0:
    return None
  layers, maps = list(ec.layers), [int(m) for m in ec.tensorboard_maps]
  check(model, config.dataset.crop_size, layers, maps)
  images, _, _ = common.load_examples(config, workdir, num_images,
                                      split=config.dataset.train_split)

  def hook(step: int, params, writer) -> None:
    if step % every:
      return
    panel = tensorboard_panel(model, {"params": jax.device_get(params)}, images, layers, maps,
                              config.report.rule)
    writer.write_images(int(step), {"evolution/projections": panel[None]})
    writer.flush()
  return hook


def grids(workdir: str, images: np.ndarray, layers: Sequence[str], maps: Sequence[int],
          rule: str = "deconvnet", batch_size: int = 64, tile: int | None = TILE
          ) -> tuple[list[float], dict[str, np.ndarray]]:
  """(epochs, {layer: (E, M, t, t, C) tiles}) over the evolution checkpoints of a run
  (``tiles`` at each checkpoint's weights)."""
  from zfnet_jax import train
  ckpts = train.evolution_checkpoints(workdir)
  if not ckpts:
    raise ValueError(f"no evolution checkpoints kept in {workdir}")
  epochs, per = [], {l: [] for l in layers}
  try:
    import tqdm
    it = tqdm.tqdm(ckpts, desc="feature evolution", unit="checkpoint")
  except ImportError:
    it = ckpts
  for epoch, step in it:
    model, variables, _ = train.load_trained(workdir, step)
    t = tiles(model, variables, images, layers, maps, rule, batch_size, tile)
    for l in layers:
      per[l].append(t[l])
    epochs.append(epoch)
  return epochs, {l: np.stack(v) for l, v in per.items()}


def plot_grid(epochs, tiles_: np.ndarray, maps, layer: str, path: str) -> str:
  """Fig. 4 for one layer: rows = epochs (labelled), columns = maps."""
  plt = common.pyplot()
  from zfnet_jax import figures
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
  return common.save(fig, path)


def section(config, workdir: str, model, variables, out_dir: str):
  from zfnet_jax import report, train
  ec = config.analyses.evolution
  layers, maps = list(ec.layers), [int(m) for m in ec.maps]
  size = config.dataset.crop_size
  check(model, size, layers, maps)
  sec = report.Section("Feature evolution", "evolution")
  try:
    ckpts = train.evolution_checkpoints(workdir)
  except FileNotFoundError:
    ckpts = []
  if not ckpts:
    sec.paragraphs.append("No evolution checkpoints in this workdir (config.evolution_epochs).")
    return sec
  images, _, _ = common.load_examples(config, workdir, ec.max_examples,
                                      split=config.dataset.train_split)
  epochs, g = grids(workdir, images, layers, maps, config.report.rule, config.analyses.batch_size)
  np.savez_compressed(os.path.join(out_dir, "evolution.npz"), epochs=np.asarray(epochs),
                      maps=np.asarray(maps), **g)
  sec.paragraphs.append(
      f"Paper Fig. 4: for maps {', '.join(map(str, maps))} of each layer, the strongest "
      f"activation over the first {len(images)} training examples (centre crops), projected "
      f"with the {config.report.rule} rule and cropped to the receptive field, at each kept "
      f"checkpoint (epochs {', '.join(f'{e:g}' for e in epochs)}). Each tile is scaled on its "
      "own (zero = mid-grey). The image that wins may change from row to row.")
  for l in layers:
    path = plot_grid(epochs, g[l], maps, l, os.path.join(out_dir, f"evolution_{l}.png"))
    sec.figures.append((common.ref(path, workdir), f"{l}: rows = epochs, columns = maps."))
  return sec
