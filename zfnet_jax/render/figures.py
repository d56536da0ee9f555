"""Figures of the report as PNG files: Fig. 2-style atlas panels, the first-layer
filters (Fig. 6 style) and the training curves.

Panels and filter grids are drawn pixel-exact with NumPy and Pillow (every
tile is an integer nearest-neighbour upscaling of its data); curves use
matplotlib's Agg backend.  Tiles are float arrays in [0, 1], (t, t, C) with
C = 1 (grey) or 3 (RGB).
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

BACKGROUND = 255  # white page
GAP = 2           # pixels between tiles of a grid
GRID_GAP = 6      # between the projection grid and the patch grid of a map
MAP_GAP = 16      # between maps
LABEL_H = 14      # text line above each map's grids


def to_uint8_rgb(tile: np.ndarray) -> np.ndarray:
  """(h, w, C) float in [0, 1] (or uint8, kept), C in {1, 3} -> (h, w, 3) uint8."""
  tile = np.asarray(tile)
  tile = tile.astype(np.float32) / 255 if tile.dtype == np.uint8 else tile.astype(np.float32)
  if tile.ndim == 2:
    tile = tile[..., None]
  if tile.shape[-1] == 1:
    tile = np.repeat(tile, 3, -1)
  elif tile.shape[-1] != 3:
    tile = np.repeat(tile[..., :1], 3, -1)  # other channel counts: the first channel
  return np.round(np.clip(tile, 0, 1) * 255).astype(np.uint8)


def tile_scale(t: int, min_tile: int = 48) -> int:
  """Integer upscaling so a t-pixel tile shows at least ``min_tile`` pixels."""
  return max(1, math.ceil(min_tile / t))


def grid(tiles: np.ndarray, cols: int, scale: int = 1, gap: int = GAP) -> np.ndarray:
  """(n, h, w, C) tiles in [0, 1] -> uint8 (H, W, 3) grid, row-major, each tile
  upscaled ``scale`` times; tile n's top-left is at
  (n // cols * (h * scale + gap), n % cols * (w * scale + gap))."""
  n, h, w = tiles.shape[:3]
  rows = max(1, math.ceil(n / cols))
  th, tw = h * scale, w * scale
  out = np.full((rows * th + (rows - 1) * gap, cols * tw + (cols - 1) * gap, 3),
                BACKGROUND, np.uint8)
  for i in range(n):
    r, c = divmod(i, cols)
    big = to_uint8_rgb(tiles[i]).repeat(scale, 0).repeat(scale, 1)
    out[r * (th + gap):r * (th + gap) + th, c * (tw + gap):c * (tw + gap) + tw] = big
  return out


def atlas_panel(projections: np.ndarray, patches: np.ndarray, channels: Sequence[int],
                *, titles: Sequence[str] | None = None, maps_per_row: int = 4,
                scale: int | None = None) -> np.ndarray:
  """Fig. 2 panel: per map, a sqrt(k) x sqrt(k) grid of projections beside the
  grid of the corresponding image patches, labelled "map c" (or ``titles``).

  projections, patches: (M, k, t, t, C) in [0, 1] -> uint8 (H, W, 3).
  Map m sits in row m // maps_per_row, column m % maps_per_row of a block
  layout (see ``panel_origin``).
  """
  m, k, t = projections.shape[:3]
  cols = math.ceil(math.sqrt(k))
  scale = scale or tile_scale(t)
  blocks = []
  for i in range(m):
    left, right = grid(projections[i], cols, scale), grid(patches[i], cols, scale)
    blk = np.full((LABEL_H + left.shape[0], left.shape[1] * 2 + GRID_GAP, 3), BACKGROUND,
                  np.uint8)
    blk[LABEL_H:, :left.shape[1]] = left
    blk[LABEL_H:, left.shape[1] + GRID_GAP:] = right
    img = Image.fromarray(blk)
    title = titles[i] if titles is not None else f"map {int(channels[i])}"
    ImageDraw.Draw(img).text((0, 1), title, fill=(0, 0, 0))
    blocks.append(np.asarray(img))
  bh, bw = blocks[0].shape[:2]
  rows = math.ceil(m / maps_per_row)
  cols_m = min(m, maps_per_row)
  out = np.full((rows * bh + (rows - 1) * MAP_GAP, cols_m * bw + (cols_m - 1) * MAP_GAP, 3),
                BACKGROUND, np.uint8)
  for i, blk in enumerate(blocks):
    r, c = divmod(i, maps_per_row)
    y, x = r * (bh + MAP_GAP), c * (bw + MAP_GAP)
    out[y:y + bh, x:x + bw] = blk
  return out


def panel_origin(map_index: int, unit: int, which: str, t: int, k: int, *,
                 maps_per_row: int = 4, scale: int | None = None) -> tuple[int, int]:
  """Top-left (row, col) pixel of a tile in ``atlas_panel``'s output.

  which: "projection" (left grid) or "patch" (right grid); unit in [0, k).
  """
  scale = scale or tile_scale(t)
  cols = math.ceil(math.sqrt(k))
  rows = math.ceil(k / cols)
  ts = t * scale
  gw, gh = cols * ts + (cols - 1) * GAP, rows * ts + (rows - 1) * GAP
  bw, bh = 2 * gw + GRID_GAP, LABEL_H + gh
  r, c = divmod(map_index, maps_per_row)
  y = r * (bh + MAP_GAP) + LABEL_H + (unit // cols) * (ts + GAP)
  x = c * (bw + MAP_GAP) + (unit % cols) * (ts + GAP) + (gw + GRID_GAP if which == "patch" else 0)
  return y, x


def normalise_each(x: np.ndarray) -> np.ndarray:
  """(n, ...) -> each item min-max scaled to [0, 1] on its own (constant -> 0.5)."""
  x = np.asarray(x, np.float32)
  flat = x.reshape(len(x), -1)
  lo, hi = flat.min(1), flat.max(1)
  span = np.where(hi > lo, hi - lo, 1.0)
  out = (flat - lo[:, None]) / span[:, None]
  out[hi <= lo] = 0.5
  return out.reshape(x.shape)


def filter_grid(kernel: np.ndarray, *, cols: int | None = None, min_tile: int = 40
                ) -> np.ndarray:
  """First-layer filters, Fig. 6 style.  kernel (kh, kw, Cin, F) -> uint8 image
  of F tiles (F in a near-square grid), each filter normalised on its own."""
  kernel = np.asarray(kernel, np.float32)
  tiles = normalise_each(np.moveaxis(kernel, -1, 0))  # (F, kh, kw, Cin)
  f = tiles.shape[0]
  cols = cols or math.ceil(math.sqrt(f))
  return grid(tiles, cols, tile_scale(kernel.shape[0], min_tile), gap=GAP)


def save_png(array: np.ndarray, path: str) -> str:
  Image.fromarray(np.asarray(array, np.uint8)).save(path, optimize=True)
  return path


def pyplot():
  """matplotlib.pyplot on the Agg backend (files only): the one place it is configured."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def save_figure(fig, path: str) -> str:
  """Save a matplotlib figure as PNG (creating its folder) and close it."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=100, bbox_inches="tight")
  pyplot().close(fig)
  return path


def imshow(ax, image: np.ndarray, **kw):
  """Show a display image in [0, 1] (grey if 2-D) without axes."""
  if image.ndim == 2:
    ax.imshow(image, cmap="gray", vmin=0, vmax=1, **kw)
  else:
    ax.imshow(image, **kw)
  ax.set_xticks([])
  ax.set_yticks([])


def training_curves(records: Sequence[dict], path: str) -> str | None:
  """Loss and top-1/top-5 error against epoch for the train and eval splits.

  Returns the path written, or None when no record has the needed keys.
  """
  plt = pyplot()

  def series(split, key):
    pts = [(r.get("epoch", r.get("step")), r[key]) for r in records
           if r.get("split") == split and isinstance(r.get(key), (int, float))
           and isinstance(r.get("epoch", r.get("step")), (int, float))]
    return sorted(pts)

  panels = [("loss", ["loss"]), ("error", ["top1_error", "top5_error"])]
  if not any(series(s, k) for s in ("train", "eval") for _, ks in panels for k in ks):
    return None
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for ax, (title, keys) in zip(axes, panels):
    for split, style in (("train", "-"), ("eval", "o-")):
      for key in keys:
        pts = series(split, key)
        if pts:
          x, y = zip(*pts)
          ax.plot(x, y, style, ms=3, label=f"{split} {key}")
    ax.set_xlabel("epoch")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
