"""Correspondence analysis (paper Sec. 4.3, Table 1).

For images i = 1..N of one class and a part (e.g. left eye), each image is
occluded at that part's box and eps_i = f_l(x_i) - f_l(x~_i) is the change of
the layer-l feature vector.  Delta_l = mean over ordered pairs i != j of
H(sign(eps_i), sign(eps_j)) / D, the normalised Hamming distance (the fraction
of the D components whose sign differs; sign(0) = 0 is a sign of its own).
Lower = the part is represented more consistently across images.

Random control (the paper's "random" row, Fig. 8's random columns): a box of
the parts' mean size at ONE uniformly random place, the same place in every
image (as a part box is one place on every aligned object), drawn afresh for
each of ``repeats`` repeats from ``default_rng(seed)``.

"±" (every row alike): the std of the normalised Hamming distances over the
N(N-1) ordered pairs i != j; for the random row the pairs of all repeats are
pooled (R N(N-1) values), so its mean is the mean over repeats of Delta.

Box file (JSON; ``load_boxes`` reads it, ``write_boxes`` writes one):
  {"dataset": "imagenet2012",   # optional: the TFDS name (or fashion_mnist_idx, folder)
                                # it is for; a run on another dataset skips the analysis
   "split": "validation",       # optional: the split the ids index ("" = analyses.split
                                # or the eval split)
   "units": "input_pixels",     # input_pixels (default) | input_fraction | source_pixels
   "input_size": 224,           # optional, input_pixels: the crop side the boxes were drawn
                                # at; boxes are scaled to the run's crop side
   "source_size": 28,           # source_pixels: the source image's side, or [height, width];
                                # may instead be given per box entry
   "description": "...",        # optional, shown in the report
   "boxes": [{"image": 17, "part": "left eye", "box": [row0, col0, row1, col1]}, ...]}
``image`` is the example's index in the split (the order of TFDS's
``as_dataset(split, shuffle_files=False)``, the ids the report shows); a box is
[row0, col0, row1, col1) with row1/col1 exclusive, rows down, columns right,
"left"/"right" as seen in the image.  Every part needs a box in every image; at
least 2 images.  ``input_pixels``: pixels of the model's S x S input (the
centre crop); ``input_fraction``: the same divided by S; ``source_pixels``:
pixels of the image as stored, mapped as evaluation maps images: the smaller
side resized to ``resize_size`` R, the centre R x R square, the centre S x S
crop.  Boxes are rounded and clipped to the input; an empty box is an error.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os

import matplotlib.patches
import numpy as np

from zfnet_jax import configs, deconv, rundir
from zfnet_jax.analyses import common, occlusion
from zfnet_jax.nn import geometry
from zfnet_jax.render import content, figures

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


def validate(options, net, data: content.Data) -> Options:
  """Resolved and validated options from ``config.analyses.correspondence`` plus ``fill``
  (the occlusion analysis's fill).  The box file is read and checked here when it is for
  ``data.name`` (or names no dataset)."""
  net = deconv.as_network(net)
  layers = tuple(options.layers)
  for layer in layers:
    geometry.check_layer(net, data.input_size, layer, "correspondence layer")
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


def pair_distances(eps: np.ndarray) -> np.ndarray:
  """eps (N, ...) -> (N(N-1),) normalised Hamming distances of the signs, ordered pairs i != j."""
  s = np.sign(np.asarray(eps, np.float64).reshape(len(eps), -1))
  n = len(s)
  if n < 2:
    raise ValueError(f"Delta needs at least 2 images, got {n}")
  h = (s[:, None, :] != s[None, :, :]).mean(-1)
  return h[~np.eye(n, dtype=bool)]


def delta(eps: np.ndarray) -> tuple[float, float]:
  """eps (N, ...) -> (Delta, ±): mean and std of ``pair_distances``."""
  d = pair_distances(eps)
  return float(d.mean()), float(d.std())


def _resolve(path: str) -> str:
  """``path``, or the shipped box file of that name (``experiments/...``: any directory)."""
  path = configs.data_file(path)
  if not os.path.exists(path):
    raise ValueError(f"correspondence box file {path!r} does not exist")
  return path


def box_file_dataset(path: str) -> str | None:
  """The ``dataset`` a box file is for (None if it does not say)."""
  with open(_resolve(path)) as f:
    return json.load(f).get("dataset")


def _source_to_input(box: np.ndarray, source_size, resize: int, crop: int) -> np.ndarray:
  """[r0, c0, r1, c1] in pixels of a (h, w) source -> input pixels, as evaluation maps the
  image: smaller side to ``resize`` R, centre R x R, centre ``crop`` x ``crop``."""
  h, w = (source_size, source_size) if np.ndim(source_size) == 0 else source_size
  scale = resize / min(h, w)
  nh, nw = max(resize, round(h * scale)), max(resize, round(w * scale))
  off = (resize - crop) // 2
  shift = np.array([(nh - resize) // 2, (nw - resize) // 2] * 2, np.float64) + off
  return box * scale - shift


def load_boxes(path: str, input_size: int, resize_size: int | None = None) -> dict:
  """Read a box file (module docstring) -> {"ids": [N], "parts": {part: (N, 4) int input
  pixels}, **the file's other keys}; ``resize_size``: the data's R (default input_size)."""
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
      src = e.get("source_size", doc.get("source_size"))
      if src is None or np.shape(src) not in ((), (2,)):
        raise ValueError(f"{path}: units source_pixels need source_size (a side or [height, "
                         f"width]) in the file or in the entry of image {e['image']}")
      box = _source_to_input(box, src, resize_size or input_size, input_size)
    elif units == "input_fraction":
      box = box * input_size
    elif doc.get("input_size"):
      box = box * input_size / float(doc["input_size"])
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


def write_boxes(path: str, ids, parts: dict, input_size: int, *, dataset: str | None = None,
                split: str | None = None, description: str = "") -> str:
  """Write a box file (units input_pixels) that ``load_boxes`` reads back unchanged.

  ids: N >= 2 distinct example indices in ``split``; parts: {name: (N, 4) boxes [r0, c0,
  r1, c1) in pixels of the input_size x input_size model input, row k for ids[k]};
  dataset, split: what the ids index (None: any dataset, the analysed split).
  ValueError naming the bad value before anything is written.  Returns ``path``.
  """
  ids = [int(i) for i in ids]
  if len(ids) < 2 or len(set(ids)) != len(ids):
    raise ValueError(f"box file ids {ids}: need at least 2 distinct image ids")
  if not parts:
    raise ValueError("box file needs at least one part")
  entries = []
  for name, boxes in parts.items():
    b = np.asarray(boxes)
    if b.shape != (len(ids), 4) or not np.array_equal(b, np.round(b)):
      raise ValueError(f"part {name!r}: boxes of shape {b.shape}; need integer "
                       f"({len(ids)}, 4) [row0, col0, row1, col1], one per id")
    bad = [k for k, (r0, c0, r1, c1) in enumerate(b)
           if not (0 <= r0 < r1 <= input_size and 0 <= c0 < c1 <= input_size)]
    if bad:
      raise ValueError(f"part {name!r}: box {b[bad[0]].tolist()} of image {ids[bad[0]]} is "
                       f"empty or outside the {input_size}x{input_size} input")
    entries += [{"image": i, "part": str(name), "box": [int(v) for v in box]}
                for i, box in zip(ids, b)]
  doc = {"description": description, "dataset": dataset, "split": split,
         "units": "input_pixels", "input_size": int(input_size),
         "box_format": "[row0, col0, row1, col1] in pixels of the input_size x input_size "
                       "model input; row1, col1 exclusive", "boxes": entries}
  rundir.write_json(path, {k: v for k, v in doc.items() if v is not None})
  return path


def occlude(images: np.ndarray, boxes: np.ndarray, fill: np.ndarray) -> np.ndarray:
  """images (N,S,S,C), boxes (N,4) [r0,c0,r1,c1) -> copies with each box set to ``fill`` (S,S,C)."""
  out = np.array(images, np.float32, copy=True)
  for x, (r0, c0, r1, c1) in zip(out, boxes):
    x[r0:r1, c0:c1] = fill[r0:r1, c0:c1]
  return out


def random_boxes(rng: np.random.Generator, height: int, width: int, size: int,
                 repeats: int) -> np.ndarray:
  """(repeats, 4) boxes of height x width, each at a uniformly random place inside a
  size x size image (the random control uses box k in every image of repeat k)."""
  r = rng.integers(0, size - height + 1, repeats)
  c = rng.integers(0, size - width + 1, repeats)
  return np.stack([r, c, r + height, c + width], 1)


def measure(net, variables, images: np.ndarray, parts: dict[str, np.ndarray], layers,
            fill: np.ndarray | None = None, repeats: int = 10, seed: int = 0,
            batch_size: int = 64) -> dict:
  """Table 1: {part or "random": {layer: (Delta, ±)}} (see the module docstring).

  net: a ``deconv.Network`` (or one of our models); images (N, S, S, C) in input space;
  parts: {part: (N, 4) boxes [r0, c0, r1, c1) in input pixels}; fill: (S, S, C) occluder
  content in input space (default zeros = the mean).
  """
  net = deconv.as_network(net)
  size = images.shape[1]
  for layer in layers:
    geometry.check_layer(net, size, layer, "correspondence layer")
  _check_repeats(repeats)
  fill = np.zeros(images.shape[1:], np.float32) if fill is None else fill
  f0 = common.activations(net, variables, images, layers, batch_size)

  def distances(boxes):
    f = common.activations(net, variables, occlude(images, boxes, fill), layers, batch_size)
    return {l: pair_distances(f0[l] - f[l]) for l in layers}

  runs = {p: distances(b) for p, b in parts.items()}
  hw = np.mean([b[:, 2:] - b[:, :2] for b in parts.values()], axis=(0, 1)).round().astype(int)
  drawn = random_boxes(np.random.default_rng(seed), hw[0], hw[1], size, repeats)
  pooled = [distances(np.repeat(box[None], len(images), 0)) for box in drawn]
  runs["random"] = {l: np.concatenate([r[l] for r in pooled]) for l in layers}
  return {p: {l: (float(d[l].mean()), float(d[l].std())) for l in layers}
          for p, d in runs.items()}


def table(results: dict, layers) -> tuple[list[str], list[list[str]]]:
  """Header and rows of Table 1: "Delta ± std" per layer for each part and "random"."""
  header = ["occluded"] + [f"Delta {l}" for l in layers]
  rows = [[p] + [f"{r[l][0]:.3f} ± {r[l][1]:.3f}" for l in layers] for p, r in results.items()]
  return header, rows


def write_tables(results: dict, layers, prefix: str) -> None:
  """<prefix>.md (markdown) and <prefix>.csv (mean and std columns)."""
  header, rows = table(results, layers)
  with open(prefix + ".md", "w", encoding="utf-8") as f:
    f.write(content.markdown_table(header, rows))
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


def sections(context: content.Context, options: Options) -> list[content.Section]:
  """Table 1 on the box file's images: correspondence.md/.csv, correspondence_boxes.png,
  one Section (a note only when the box file is for another dataset)."""
  sec = content.Section("Correspondence analysis", "correspondence")
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
      "paper Table 1). Random: a box of the parts' mean size at one random place, the same in "
      f"every image, drawn afresh in each of {options.repeats} repeats. ±: std over the image "
      "pairs (for random, the pairs of all repeats pooled). Tables: correspondence.md and .csv."]
  sec.figures.append(("correspondence_boxes.png", "Images and part boxes."))
  sec.tables.append((header, rows))
  return [sec]
