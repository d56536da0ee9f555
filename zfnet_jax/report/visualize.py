"""What a network sees in your own images: ``--mode=visualize --images=PATH``.

For each image (a JPEG/PNG/... file of any size, grey or colour, or an array of
0..255 pixels) it writes ``<out_dir>/<name>/``:

* ``index.html``: the top-5 prediction; for every layer the ``num_maps``
  strongest feature maps in this image, each unit's deconvnet projection (whole
  image and cropped to the unit's receptive field) beside the image patch it
  sees; the occlusion panels of Fig. 7 for the top class.  Rendered by
  ``zfnet_jax.render.pages`` (escaped, no script, CSP), like the report.
* ``arrays.npz``: the numbers behind every picture (keys: README, "Visualise
  your own images").

``images(net, variables, inputs, out_dir, preprocessing=...)`` works on any
network (our models, or a ``deconv.Network`` of any CNN) with its preprocessing;
``run(config, workdir, spec)`` is ``main``'s mode: the workdir's model (or the
shipped weights ``config.pretrained`` names) and its preprocessing, output in
``<workdir>/visualize/``.

Inputs: a file, a folder (its image files, not recursive), a glob, or a comma
separated list of these.  Every input is read before the long work; a missing
file, a file that is not an image, a corrupt one or an empty folder is
reported in one line naming the path and the others are still done (``run``
then raises ValueError: exit code 2).  Output folder names are the file's stem,
made unique within the batch (``a.jpg`` and ``a.png`` -> ``a-jpg`` and ``a-png``;
the same name in two folders -> ``a``, ``a-2``).  Images whose smaller side is
below the model's resize size are upscaled, with a one-line notice.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import tempfile
import time
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from zfnet_jax import console, deconv, rundir
from zfnet_jax.analyses import atlas, common, occlusion
from zfnet_jax.data import preprocessing as preprocessing_lib
from zfnet_jax.data import sources
from zfnet_jax.nn import rules
from zfnet_jax.render import content, figures, pages
from zfnet_jax.training import weights

AUTO = "auto"   # occlusion settings scaled from the paper's (56 px squares, stride 8 at 224)


@dataclasses.dataclass
class Batch:
  """done: {input: index.html path}; failed: [(input, one-line message)]."""
  done: dict[str, str]
  failed: list[tuple[str, str]]


# ----------------------------------------------------------------------------
# Inputs.
# ----------------------------------------------------------------------------

def resolve(spec: str | Sequence[Any]) -> tuple[list[Any], list[tuple[str, str]]]:
  """(inputs: paths or arrays, failed: [(item, message)]) of a PATH spec.

  spec: a file, folder, glob or comma-separated list of these; or a sequence
  of paths and arrays.  Folders give their image files (sorted, not recursive).
  """
  items = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
  if not items:
    raise ValueError(f"--images {spec!r} names no image: give a file, a folder, a glob or "
                     "a comma-separated list")
  out, failed = [], []
  for item in items:
    if not isinstance(item, (str, os.PathLike)):
      out.append(item)
      continue
    item = os.fspath(item)
    if os.path.isdir(item):
      files = sorted(os.path.join(item, f) for f in os.listdir(item)
                     if f.lower().endswith(sources.IMAGE_EXTENSIONS)
                     and os.path.isfile(os.path.join(item, f)))
      if not files:
        failed.append((item, f"{item}: folder has no image files (allowed: "
                             f"{', '.join(sources.IMAGE_EXTENSIONS)})"))
      out += files
    elif glob.has_magic(item) and not os.path.exists(item):
      files = sorted(f for f in glob.glob(item) if os.path.isfile(f))
      if not files:
        failed.append((item, f"{item}: no file matches this pattern"))
      out += files
    else:
      out.append(item)
  return out, failed


def output_names(inputs: Sequence[Any]) -> list[str]:
  """One folder name per input, unique in the batch: the file's stem; stem-extension
  when inputs share a stem with other extensions; then -2, -3... (arrays: image-<i>)."""
  def clean(s):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("._") or "image"
  stems, exts = [], []
  for i, x in enumerate(inputs):
    if isinstance(x, (str, os.PathLike)):
      stem, ext = os.path.splitext(os.path.basename(os.fspath(x)))
      stems.append(clean(stem))
      exts.append(clean(ext.lstrip(".")))
    else:
      stems.append(f"image-{i}")
      exts.append("")
  names, used = [], set()
  for stem, ext in zip(stems, exts):
    pairs = sum(1 for s, e in zip(stems, exts) if (s, e) == (stem, ext))
    name = f"{stem}-{ext}" if stems.count(stem) > pairs and ext else stem
    base, n = name, 1
    while name in used:
      n += 1
      name = f"{base}-{n}"
    used.add(name)
    names.append(name)
  return names


def read(inputs: Sequence[Any], channels: int) -> tuple[list[tuple[Any, np.ndarray]],
                                                         list[tuple[str, str]]]:
  """([(input, uint8 (H, W, channels))], failed) -- every file decoded, none skipped silently."""
  ok, failed = [], []
  for x in inputs:
    if isinstance(x, (str, os.PathLike)):
      try:
        ok.append((x, preprocessing_lib.read_image(os.fspath(x), channels)))
      except ValueError as e:
        failed.append((os.fspath(x), str(e)))
      continue
    a = np.asarray(x)
    a = a[..., None] if a.ndim == 2 else a
    if a.ndim != 3 or a.shape[-1] not in (1, 3) or a.size == 0:
      failed.append((f"array {len(ok) + len(failed)}", f"array {len(ok) + len(failed)}: shape "
                     f"{a.shape}; allowed (H, W), (H, W, 1) or (H, W, 3) pixels 0..255"))
      continue
    if a.shape[-1] != channels:
      a = a.mean(-1, keepdims=True) if channels == 1 else np.repeat(a, 3, -1)
    ok.append((x, a))
  return ok, failed


# ----------------------------------------------------------------------------
# One image.
# ----------------------------------------------------------------------------

def _check(net, size: int, layers: Sequence[str], num_maps: int, rule: str, occ) -> None:
  atlas.check_options(net, size, layers=layers, k=1, rule=rule, num_maps=num_maps)
  if num_maps == -1:
    raise ValueError("num_maps must be a positive integer (maps shown per layer), got -1")
  if occ is not None:
    occlusion.check(occ, net, size)


def default_occlusion(net, size: int, layer: str) -> occlusion.Settings:
  """The paper's occlusion (56 px squares, stride 8 at 224 px) scaled to ``size``."""
  del net
  return occlusion.Settings(max(1, round(common.default_size(-1, 56, size))),
                            max(1, round(common.default_size(-1, 8, size))), -1.0, layer, 128)


def _box(display: np.ndarray, window) -> np.ndarray:
  """The image (S, S, C) in [0, 1] as RGB uint8 with the [r0, r1) x [c0, c1) window outlined."""
  img = Image.fromarray(figures.to_uint8_rgb(display))
  r0, r1, c0, c1 = window
  ImageDraw.Draw(img).rectangle((c0, r0, max(c0, c1 - 1), max(r0, r1 - 1)), outline=(255, 0, 0))
  return np.asarray(img, np.float32) / 255.0


def strongest_maps(act: np.ndarray, num_maps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(channels (M,), values (M,), positions (M, 2)) of the ``num_maps`` maps of one
  activation (H, W, C) with the largest maxima (ties: lower map), each at its
  strongest unit (``deconv.strongest_in``)."""
  (rows, cols), top = deconv.strongest_in(np.moveaxis(act, -1, 0), 2)
  channels = np.argsort(-top, kind="stable")[:num_maps]
  return (channels.astype(np.int64), top[channels],
          np.stack([rows[channels], cols[channels]], 1).astype(np.int32))


def image(net, variables, pixels: np.ndarray, out_dir: str, *,
          preprocessing: preprocessing_lib.Preprocessing, class_names: Sequence[str] | None = None,
          layers: Sequence[str] | None = None, num_maps: int = 9, rule: str = "deconvnet",
          occlusion_settings: occlusion.Settings | str | None = AUTO, top: int = 5,
          chunk_size: int = 32, title: str = "image", notes: Sequence[str] = ()) -> dict:
  """Write ``out_dir/index.html`` and ``arrays.npz`` for one image; returns the arrays.

  pixels: (H, W, C) 0..255, C = preprocessing.channels.  layers: spatial layers
  (default every conv layer of the network's table).  occlusion_settings: "auto"
  (the paper's, scaled, on the last of ``layers``), None (no occlusion) or
  ``occlusion.Settings``.  ``out_dir`` is replaced as a whole once complete.
  """
  net = deconv.as_network(net)
  size = preprocessing.crop_size
  if layers is None:
    layers = [s.name for s in net.layer_table(size) if s.kind == "conv"]
  layers = list(layers)
  occ = (default_occlusion(net, size, layers[-1]) if isinstance(occlusion_settings, str)
         else occlusion_settings)
  _check(net, size, layers, num_maps, rule, occ)
  x = preprocessing(pixels)[None]                                    # (1, S, S, C)
  display = preprocessing.display(x[0])
  feats = common.activations(net, variables, x, layers)
  arrays: dict[str, np.ndarray] = {"input": x[0], "display": display}
  name = lambda c: str(class_names[c]) if class_names is not None and c < len(class_names) \
      else str(c)
  page = [_prediction(feats, arrays, preprocessing, title, notes, top, name, out_dir)]

  # Strongest maps per layer, projected in one call (grouped by layer, chunked).
  chosen = {l: strongest_maps(np.asarray(feats[l][0], np.float32), num_maps) for l in layers}
  names = [l for l in layers for _ in chosen[l][0]]
  chans = np.concatenate([chosen[l][0] for l in layers])
  poss = np.concatenate([chosen[l][2] for l in layers])
  proj = np.asarray(net.project(variables, jnp.asarray(np.repeat(x, len(names), 0)),
                                layer=names, channels=chans, positions=poss, rule=rule,
                                chunk_size=chunk_size), np.float32)
  try:
    fields = net.receptive_fields(size)
  except ValueError:
    fields = {}
  start = 0
  for l in layers:
    m = len(chosen[l][0])
    page.append(_layer(l, chosen[l], proj[start:start + m], fields.get(l),
                       np.asarray(feats[l][0]), display, rule, arrays, out_dir))
    start += m
  if occ is not None and "logits" in feats:
    page.append(_occlusion(net, variables, x, display, occ, preprocessing, rule, arrays,
                           class_names, name, out_dir))
  np.savez_compressed(os.path.join(out_dir, "arrays.npz"), **arrays)
  with open(os.path.join(out_dir, "index.html"), "w", encoding="utf-8") as f:
    f.write(pages.render(f"zfnet_jax: what {net.name} sees in {title}", page,
                         f"Written {time.strftime('%Y-%m-%d %H:%M:%S')}. Arrays behind every "
                         "picture: arrays.npz."))
  return arrays


def _prediction(feats, arrays, preprocessing, title, notes, top, name, out_dir
                ) -> content.Section:
  """The input as the model sees it and its top classes (into ``arrays``)."""
  size, display = preprocessing.crop_size, arrays["display"]
  section = content.Section(f"Prediction for {title}", "prediction", list(notes))
  figures.save_png(figures.grid(display[None], 1, figures.tile_scale(size, 256)),
                   os.path.join(out_dir, "input.png"))
  section.figures.append(("input.png", f"The model's input: {size}x{size} px, "
                          f"{preprocessing.channels} channel(s), after resize and crop."))
  if "logits" in feats:
    probs = common.softmax(feats["logits"][0].astype(np.float64)).astype(np.float32)
    order = np.argsort(-probs, kind="stable")[:top]
    arrays.update(probabilities=probs, top_classes=order.astype(np.int64),
                  top_probabilities=probs[order])
    section.tables.append((["rank", "class", "name", "probability"],
                           [[str(r + 1), str(int(c)), name(int(c)), f"{probs[c]:.4f}"]
                            for r, c in enumerate(order)]))
  else:
    section.paragraphs.append("The network has no 'logits' output: no prediction.")
  return section


def _layer(l, chosen, p, rf, act, display, rule, arrays, out_dir) -> content.Section:
  """One layer's strongest maps: projections ``p`` (M, S, S, C) beside the patches their
  units see (``rf`` None: the whole image), into ``arrays`` and two panels."""
  channels, values, pos = chosen
  m, size = len(channels), display.shape[0]
  shown = deconv.to_image(p)                                       # (M, S, S, C)
  if rf is not None:
    crops = deconv.crop_receptive_field(shown, rf, pos)
    patches = deconv.crop_receptive_field(np.repeat(display[None], m, 0), rf, pos)
    windows = np.array([rf.window(int(i), int(j), size) for i, j in pos], np.int32)
    arrays[f"{l}/receptive_field"] = np.array([rf.size, rf.stride, rf.offset], np.int32)
  else:
    crops, patches = shown, np.repeat(display[None], m, 0)
    windows = np.tile(np.array([0, size, 0, size], np.int32), (m, 1))
  arrays.update({f"{l}/channels": channels, f"{l}/values": values, f"{l}/positions": pos,
                 f"{l}/activations": np.moveaxis(act[..., channels], -1, 0),
                 f"{l}/projections": p, f"{l}/projection_crops": crops,
                 f"{l}/patches": patches, f"{l}/windows": windows})
  titles = [f"map {int(c)}: {v:.3g}" for c, v in zip(channels, values)]
  figures.save_png(figures.atlas_panel(crops[:, None], patches[:, None], channels,
                                       titles=titles, maps_per_row=3),
                   os.path.join(out_dir, f"{l}_receptive_fields.png"))
  boxed = np.stack([_box(display, w) for w in windows])
  figures.save_png(figures.atlas_panel(shown[:, None], boxed[:, None], channels, titles=titles,
                                       maps_per_row=3, scale=figures.tile_scale(size, 128)),
                   os.path.join(out_dir, f"{l}_projections.png"))
  what = (f"receptive field {rf.size} px, stride {rf.stride}" if rf is not None else
          "receptive fields unknown: whole image")
  s = content.Section(f"Layer {l}", f"layer-{l}", [
      f"The {m} feature maps of {l} with the strongest activation in this image, best first, "
      f"each at its strongest unit, projected to pixels with the {rule} rule (each scaled on "
      f"its own, zero = grey) beside the part of the image that unit sees ({what})."])
  s.figures += [(f"{l}_receptive_fields.png", f"{l}: projection (left) and image patch "
                 "(right) under each unit's receptive field."),
                (f"{l}_projections.png", f"{l}: the whole projection (left) and the image "
                 "with the receptive field outlined in red (right).")]
  s.tables.append((["map", "activation", "unit (row, col)", "window rows", "window cols"],
                   [[str(int(c)), f"{v:.4g}", f"({int(i)}, {int(j)})", f"{w[0]}..{w[1] - 1}",
                     f"{w[2]}..{w[3] - 1}"] for c, v, (i, j), w in
                    zip(channels, values, pos, windows)]))
  return s


def _occlusion(net, variables, x, display, occ, preprocessing, rule, arrays, class_names,
               name, out_dir) -> content.Section:
  """Fig. 7 for the top class of the image ``x`` (1, S, S, C) (into ``arrays``)."""
  label = int(arrays["top_classes"][0])
  fill = np.zeros(x.shape[1:], np.float32) if occ.fill < 0 else np.broadcast_to(
      (occ.fill - np.asarray(preprocessing.mean, np.float32)) /
      np.asarray(preprocessing.std, np.float32), x.shape[1:])
  r = occlusion.scan(net, variables, x[0], label, occ, fill=fill)
  p = net.project(variables, jnp.asarray(x), layer=occ.layer,
                  channels=np.array([int(r["channel"])]), positions=None, rule=rule)
  r["projection"] = np.asarray(deconv.to_image(p))[0]
  arrays.update({f"occlusion/{k}": np.asarray(v) for k, v in r.items()})
  disp = display[..., 0] if display.shape[-1] == 1 else display
  pr = r["projection"][..., 0] if r["projection"].shape[-1] == 1 else r["projection"]
  occlusion.plot(r, disp, pr, class_names, os.path.join(out_dir, "occlusion.png"),
                 label_kind="top class")
  return content.Section("Occlusion (Fig. 7)", "occlusion", [
      f"A {occ.size}x{occ.size} px square (the mean pixel) slides over the input on a "
      f"{occ.stride} px grid. Per position: (b) total activation of the {occ.layer} map "
      f"strongest on the whole image (map {int(r['channel'])}), (c) its projection, (d) the "
      f"probability of the top class {name(label)}, (e) the most probable class."],
      [("occlusion.png", f"Occlusion panels for the top class {name(label)}.")],
      [(["top class", "p unoccluded", "min p occluded", "fraction of positions still top"],
        [[name(label), f"{float(r['prob_true0']):.3f}", f"{float(r['prob_true'].min()):.3f}",
          f"{float((r['top_class'] == label).mean()):.2f}"]])])


# ----------------------------------------------------------------------------
# A batch of images.
# ----------------------------------------------------------------------------

def images(net, variables, inputs: str | Sequence[Any], out_dir: str, *,
           preprocessing: preprocessing_lib.Preprocessing, class_names: Sequence[str] | None = None,
           layers: Sequence[str] | None = None, num_maps: int = 9, rule: str = "deconvnet",
           occlusion_settings: occlusion.Settings | str | None = AUTO, top: int = 5,
           chunk_size: int = 32, progress: bool = True) -> Batch:
  """``image`` for every input into ``out_dir/<name>/``; bad inputs reported, not fatal.

  inputs: a PATH spec (file, folder, glob, comma list) or a sequence of paths and
  (H, W[, C]) pixel arrays.  Options are checked and every input is read before
  any projection; each bad input gets one line (``console.say(warn=True)``) and
  an entry in ``Batch.failed``.  ValueError if no input is readable.
  """
  net = deconv.as_network(net)
  size = preprocessing.crop_size
  check_layers = list(layers) if layers is not None else [
      s.name for s in net.layer_table(size) if s.kind == "conv"]
  occ = (default_occlusion(net, size, check_layers[-1]) if isinstance(occlusion_settings, str)
         else occlusion_settings)
  _check(net, size, check_layers, num_maps, rule, occ)
  found, failed = resolve(inputs)
  ok, bad = read(found, preprocessing.channels)
  failed += bad
  for _, msg in failed:
    console.say(msg, warn=True)
  if not ok:
    raise ValueError(f"no readable image in {inputs!r}" +
                     (f": {failed[0][1]}" if failed else ""))
  os.makedirs(out_dir, exist_ok=True)
  done = {}
  names = output_names([x for x, _ in ok])
  for (x, pixels), name in console.progress(list(zip(ok, names)), desc="visualize",
                                            unit="image", disable=not progress):
    label = os.fspath(x) if isinstance(x, (str, os.PathLike)) else name
    h, w = pixels.shape[:2]
    notes = [f"Input: {label} ({w}x{h} px)."]
    if min(h, w) < preprocessing.resize_size:
      msg = (f"{label}: {w}x{h} px is smaller than the model's {preprocessing.resize_size} px: "
             "upscaled")
      console.say(msg)
      notes.append(msg + ".")
    final = os.path.join(out_dir, name)
    tmp = tempfile.mkdtemp(prefix=f".{name}-tmp-", dir=out_dir)
    try:
      image(net, variables, pixels, tmp, preprocessing=preprocessing, class_names=class_names,
            layers=check_layers, num_maps=num_maps, rule=rule, occlusion_settings=occ, top=top,
            chunk_size=chunk_size, title=os.path.basename(label), notes=notes)
      rundir.replace_dir(tmp, final)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    done[label] = os.path.join(final, "index.html")
  return Batch(done, failed)


def run(config, workdir: str, spec: str) -> Batch:
  """``--mode=visualize``: the model of ``workdir`` (or ``config.pretrained``), the
  options of ``config.visualize``, ``report.rule`` and ``analyses.occlusion``;
  pages in ``<workdir>/visualize/<name>/``."""
  v = config.visualize
  rules.get(config.report.rule, "config.report.rule")
  if isinstance(v.num_maps, bool) or not isinstance(v.num_maps, int) or v.num_maps < 1:
    raise ValueError(f"config.visualize.num_maps must be a positive integer, got {v.num_maps!r}")
  if not config.get("pretrained") and not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir!r} does not exist: train first, or use shipped "
                            f"weights (--config.pretrained=NAME; shipped: "
                            f"{', '.join(weights.shipped_names())})")
  loaded = weights.load_model(config, workdir)
  prep = preprocessing_lib.preprocessing(loaded.config, loaded.pixel_mean)
  size = prep.crop_size
  layers = tuple(v.layers) or tuple(config.report.layers)
  occ = None
  if v.occlusion:
    o = config.analyses.occlusion
    occ = occlusion.validate(o, loaded.model, content.Data("", size, prep.resize_size,
                                                                prep.channels))
  return images(loaded.model, loaded.variables, spec, os.path.join(workdir, "visualize"),
                preprocessing=prep, class_names=loaded.class_names, layers=layers,
                num_maps=int(v.num_maps), rule=config.report.rule, occlusion_settings=occ,
                chunk_size=int(config.report.chunk_size))
