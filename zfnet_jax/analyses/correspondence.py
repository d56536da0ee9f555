"""Correspondence analysis (paper Sec. 4.3, Table 1).

For images i = 1..N of one class and a part (e.g. left eye), each image is
occluded at that part's box and eps_i = f_l(x_i) - f_l(x~_i) is the change of
the layer-l feature vector.  Delta_l = mean over ordered pairs i != j of
H(sign(eps_i), sign(eps_j)) / D, the normalised Hamming distance (the fraction
of the D components whose sign differs; sign(0) = 0 is a sign of its own).
Lower = the part is represented more consistently across images.  The control
occludes a random box of the same size (the parts' mean size) at an
independent, uniformly random place in each image, repeated ``repeats`` times.

Table: parts give Delta +- std over the N(N-1) pairs; the random control gives
the mean +- std of Delta over the repeats (the paper's "+-" is not defined).

Box file (JSON), e.g. ``experiments/correspondence_fashion_mnist.json``:
  {"dataset": ..., "split": ..., "units": "source_pixels" | "input_pixels" | "input_fraction",
   "source_size": 28,  # for source_pixels: side of the dataset's own image
   "boxes": [{"image": <id in split>, "part": <name>, "box": [row0, col0, row1, col1]}, ...]}
row1/col1 exclusive.  ``source_pixels`` are mapped like the evaluation
pipeline maps images: resize to the data's ``resize_size``, centre crop ``input_size``.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os

import matplotlib.patches
import numpy as np

from zfnet_jax import deconv, figures, models
from zfnet_jax import sections as sections_lib
from zfnet_jax.analyses import common, occlusion

UNITS = ("source_pixels", "input_pixels", "input_fraction")


@dataclasses.dataclass(frozen=True)
class Options:
  """boxes: ``load_boxes`` of ``boxes_path`` in input pixels, or None when the box file is
  for another dataset (``dataset``, the one it names); layers: where Delta is measured;
  repeats: of the random-box control; fill: occlusion pixel value 0..255, < 0 for the mean."""
  boxes: dict | None
  boxes_path: str
  layers: tuple[str, ...]
  repeats: int
  fill: float
  dataset: str | None = None


def validate(options, net, data: sections_lib.Data) -> Options:
  """Resolved and validated options from ``config.analyses.correspondence`` plus ``fill``
  (the occlusion analysis's fill).  The box file is read and checked here when it is for
  ``data.name`` (or names no dataset)."""
  net = deconv.as_network(net)
  layers = tuple(options.layers)
  for layer in layers:
    models.check_layer(net, data.input_size, layer, "correspondence layer")
  repeats = _check_repeats(options.repeats)
  fill = float(options.fill)
  if fill > 255:
    raise ValueError(f"correspondence fill {fill} not allowed: a pixel value 0..255, "
                     "or -1 (mean)")
  path = str(options.boxes)
  for_dataset = box_file_dataset(path)
  boxes = None
  if for_dataset in (None, data.name):
    boxes = load_boxes(path, data.input_size, data.resize_size)
  return Options(boxes, path, layers, repeats, fill, for_dataset)


def _check_repeats(repeats) -> int:
  if repeats < 1:
    raise ValueError(f"correspondence repeats {repeats} not allowed: >= 1")
  return int(repeats)


def delta(eps: np.ndarray) -> tuple[float, float]:
  """eps (N, ...) -> (Delta = mean normalised Hamming distance of signs over pairs i != j, std)."""
  s = np.sign(np.asarray(eps, np.float64).reshape(len(eps), -1))
  n = len(s)
  if n < 2:
    raise ValueError(f"Delta needs at least 2 images, got {n}")
  h = (s[:, None, :] != s[None, :, :]).mean(-1)
  off = h[~np.eye(n, dtype=bool)]
  return float(off.mean()), float(off.std())


def _resolve(path: str) -> str:
  """``path``, or the same relative path inside the repository (works from any directory)."""
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if not os.path.exists(path) and not os.path.isabs(path) and \
      os.path.exists(os.path.join(repo, path)):
    return os.path.join(repo, path)
  if not os.path.exists(path):
    raise ValueError(f"correspondence box file {path!r} does not exist")
  return path


def box_file_dataset(path: str) -> str | None:
  """The ``dataset`` a box file is for (None if it does not say)."""
  with open(_resolve(path)) as f:
    return json.load(f).get("dataset")


def load_boxes(path: str, input_size: int, resize_size: int | None = None) -> dict:
  """Read a box file -> {"ids": [N], "parts": {part: (N, 4) int input pixels}, **meta}.

  Every part must have a box in every image.
  """
  path = _resolve(path)
  with open(path) as f:
    doc = json.load(f)
  units = doc.get("units", "input_pixels")
  if units not in UNITS:
    raise ValueError(f"unknown box units {units!r} in {path}; allowed: {', '.join(UNITS)}")
  entries = doc.get("boxes", [])
  ids = list(dict.fromkeys(int(e["image"]) for e in entries))
  parts = list(dict.fromkeys(str(e["part"]) for e in entries))
  if len(ids) < 2 or not parts:
    raise ValueError(f"{path}: need boxes in at least 2 images, got images {ids}, parts {parts}")
  table = {p: {} for p in parts}
  for e in entries:
    box = np.asarray(e["box"], np.float64)
    if box.shape != (4,):
      raise ValueError(f"{path}: box {e['box']} of image {e['image']} is not "
                       "[row0, col0, row1, col1]")
    if units == "source_pixels":
      src = float(doc["source_size"])
      scale = (resize_size or input_size) / src
      box = box * scale - ((resize_size or input_size) - input_size) / 2.0
    elif units == "input_fraction":
      box = box * input_size
    box = np.clip(np.round(box), 0, input_size).astype(int)
    if box[2] <= box[0] or box[3] <= box[1]:
      raise ValueError(f"{path}: box {e['box']} of image {e['image']} is empty in the "
                       f"{input_size}x{input_size} input")
    table[str(e["part"])][int(e["image"])] = box
  for p in parts:
    missing = [i for i in ids if i not in table[p]]
    if missing:
      raise ValueError(f"{path}: part {p!r} has no box in images {missing}")
  meta = {k: v for k, v in doc.items() if k != "boxes"}
  return dict(meta, ids=ids, parts={p: np.stack([table[p][i] for i in ids]) for p in parts})


def occlude(images: np.ndarray, boxes: np.ndarray, fill: np.ndarray) -> np.ndarray:
  """images (N,S,S,C), boxes (N,4) [r0,c0,r1,c1) -> copies with each box set to ``fill`` (S,S,C)."""
  out = np.array(images, np.float32, copy=True)
  for x, (r0, c0, r1, c1) in zip(out, boxes):
    x[r0:r1, c0:c1] = fill[r0:r1, c0:c1]
  return out


def random_boxes(rng: np.random.Generator, n: int, height: int, width: int,
                 size: int) -> np.ndarray:
  """(n, 4) boxes of height x width at uniformly random places inside a size x size image."""
  r = rng.integers(0, size - height + 1, n)
  c = rng.integers(0, size - width + 1, n)
  return np.stack([r, c, r + height, c + width], 1)


def measure(net, variables, images: np.ndarray, parts: dict[str, np.ndarray], layers,
            fill: np.ndarray | None = None, repeats: int = 10, seed: int = 0,
            batch_size: int = 64) -> dict:
  """Table 1: {part or "random": {layer: (mean, std)}} (see the module docstring).

  net: a ``deconv.Network`` (or one of our models); images (N, S, S, C) in input space;
  parts: {part: (N, 4) boxes [r0, c0, r1, c1) in input pixels}; fill: (S, S, C) occluder
  content in input space (default zeros = the mean).
  """
  net = deconv.as_network(net)
  size = images.shape[1]
  for layer in layers:
    models.check_layer(net, size, layer, "correspondence layer")
  _check_repeats(repeats)
  fill = np.zeros(images.shape[1:], np.float32) if fill is None else fill
  f0 = common.activations(net, variables, images, layers, batch_size)

  def deltas(boxes):
    f = common.activations(net, variables, occlude(images, boxes, fill), layers, batch_size)
    return {l: delta(f0[l] - f[l]) for l in layers}

  out = {p: deltas(b) for p, b in parts.items()}
  hw = np.mean([b[:, 2:] - b[:, :2] for b in parts.values()], axis=(0, 1)).round().astype(int)
  rng = np.random.default_rng(seed)
  runs = [deltas(random_boxes(rng, len(images), hw[0], hw[1], size)) for _ in range(repeats)]
  out["random"] = {}
  for l in layers:
    d = [r[l][0] for r in runs]
    out["random"][l] = (float(np.mean(d)), float(np.std(d)))
  return out


def table(results: dict, layers) -> tuple[list[str], list[list[str]]]:
  """Header and rows of Table 1: "Delta ± std" per layer for each part and "random"."""
  header = ["occluded"] + [f"Delta {l}" for l in layers]
  rows = [[p] + [f"{r[l][0]:.3f} ± {r[l][1]:.3f}" for l in layers] for p, r in results.items()]
  return header, rows


def write_tables(results: dict, layers, prefix: str) -> None:
  """<prefix>.md (markdown) and <prefix>.csv (mean and std columns)."""
  header, rows = table(results, layers)
  with open(prefix + ".md", "w", encoding="utf-8") as f:
    f.write(sections_lib.markdown_table(header, rows))
  with open(prefix + ".csv", "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["occluded"] + [f"{l}_{s}" for l in layers for s in ("mean", "std")])
    for p, r in results.items():
      w.writerow([p] + [f"{v:.6f}" for l in layers for v in r[l]])


def plot_boxes(displays: np.ndarray, ids, parts: dict[str, np.ndarray], path: str) -> str:
  """The display images (N, S, S[, 3]) in a row with each part's box outlined."""
  plt = figures.pyplot()
  fig, axes = plt.subplots(1, len(displays), figsize=(2 * len(displays), 2.2), squeeze=False)
  colours = plt.get_cmap("tab10")
  for k, (ax, d) in enumerate(zip(axes[0], displays)):
    figures.imshow(ax, d)
    ax.set_title(f"image {ids[k]}", fontsize=8)
    for c, (p, b) in enumerate(parts.items()):
      r0, c0, r1, c1 = b[k]
      ax.add_patch(matplotlib.patches.Rectangle((c0 - .5, r0 - .5), c1 - c0, r1 - r0,
                                                fill=False, ec=colours(c), lw=1.5, label=p))
  axes[0, -1].legend(loc="center left", bbox_to_anchor=(1, .5), fontsize=8)
  return figures.save_figure(fig, path)


def sections(context: sections_lib.Context, options: Options) -> list[sections_lib.Section]:
  """Table 1 on the box file's images: correspondence.md/.csv, correspondence_boxes.png,
  one Section (a note only when the box file is for another dataset)."""
  sec = sections_lib.Section("Correspondence analysis", "correspondence")
  if options.boxes is None:
    this_run = context.data.name if context.data is not None else None
    sec.paragraphs.append(f"Skipped: the box file {options.boxes_path} is for dataset "
                          f"{options.dataset!r}, this run uses {this_run!r} "
                          "(set analyses.correspondence.boxes).")
    return [sec]
  doc = options.boxes
  layers = list(options.layers)
  images, _, ids = context.examples(doc["ids"], split=doc.get("split") or None)
  fill = occlusion.fill_image(options.fill, context.pixel_mean, images.shape[1:])
  res = measure(context.net, context.variables, images, doc["parts"], layers, fill,
                options.repeats, context.seed, context.batch_size)
  write_tables(res, layers, context.path("correspondence"))
  plot_boxes(common.to_display(images, context.pixel_mean), [int(i) for i in ids],
             doc["parts"], context.path("correspondence_boxes.png"))
  header, rows = table(res, layers)
  sec.paragraphs += [
      f"{doc.get('description', '')} Boxes: {options.boxes_path}.",
      "Each part is occluded in every image (same fill as the occlusion analysis); "
      "eps_i = features(original) - features(occluded); Delta = mean over pairs i != j of the "
      "fraction of components where sign(eps_i) and sign(eps_j) differ (lower = more consistent, "
      "paper Table 1). Parts: Delta ± std over image pairs; random: a box of the parts' mean size "
      f"at a random place in each image, mean ± std of Delta over {options.repeats} repeats. "
      "Tables: correspondence.md and .csv."]
  sec.figures.append(("correspondence_boxes.png", "Images and part boxes."))
  sec.tables.append((header, rows))
  return [sec]
