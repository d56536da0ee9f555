"""The static HTML report of a run: <workdir>/report/index.html.

One page plus its PNG images, openable from disk: the model summary, the
config, results.json, the training curves, the first-layer filters, one
section per layer with its Fig. 2 atlas panels (``zfnet_jax.atlas``), and the
sections of ``zfnet_jax.analyses.report_sections`` when that module exists.

Safety: every piece of text from data, config or results is escaped
(``html.escape``); the page carries no script and a Content-Security-Policy
that forbids scripts and any load from the network.  The report is built in a
temporary directory next to the old one and swapped in at the end, so a failure
leaves the previous report as it was.
"""
from __future__ import annotations

import dataclasses
import html
import importlib
import json
import os
import re
import shutil
import tempfile
import time
import urllib.parse
from typing import Iterable, Mapping, Sequence

import jax
import numpy as np

from zfnet_jax import atlas as atlas_lib
from zfnet_jax import figures
from zfnet_jax import input_pipeline
from zfnet_jax import layers as layers_lib
from zfnet_jax import models

MAPS_PER_IMAGE = 16  # maps per panel PNG (a layer with more maps gets several)
FOLD_LINES = 40      # longer text blocks and tables start folded (<details>)
CSP = ("default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; "
       "base-uri 'none'; form-action 'none'")


@dataclasses.dataclass
class Section:
  """One section of the report, given as data (the report escapes all text).

  figures: (path, caption) pairs; a path relative to the workdir (or to the
    report directory, or absolute): the report copies the file into itself.
  tables: (header, rows) pairs; cells are plain strings.
  preformatted: blocks shown as monospaced text.
  """
  title: str
  anchor: str
  paragraphs: list[str] = dataclasses.field(default_factory=list)
  figures: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  tables: list[tuple[list[str], list[list[str]]]] = dataclasses.field(default_factory=list)
  preformatted: list[str] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------
# Options.
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Options:
  split: str
  layers: tuple[str, ...]
  num_maps: int
  top_k: int
  rule: str
  max_examples: int
  batch_size: int
  chunk_size: int


def options(config) -> Options:
  """config.report, checked (types, ranges, rule) -> Options.  Layer names are
  checked against the model by ``atlas.check_options``."""
  r = config.report
  def pos_int(name, allow_all=False):
    v = r[name]
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or (
        v < 1 and not (allow_all and v == -1)):
      raise ValueError(f"config.report.{name} must be a positive integer"
                       f"{' or -1 (all)' if allow_all else ''}, got {v!r}")
    return int(v)
  layers = r.layers
  if isinstance(layers, str):
    layers = tuple(l.strip() for l in layers.split(",") if l.strip())
  layers = tuple(layers)
  if not layers:
    raise ValueError("config.report.layers is empty; give at least one layer, e.g. conv1")
  if r.rule not in layers_lib.RULES:
    raise ValueError(f"config.report.rule {r.rule!r} unknown; allowed: "
                     f"{', '.join(layers_lib.RULES)}")
  split = r.split or config.dataset.eval_split
  return Options(split, layers, pos_int("num_maps", True), pos_int("top_k"), r.rule,
                 pos_int("max_examples", True), pos_int("batch_size"), pos_int("chunk_size"))


# ----------------------------------------------------------------------------
# Entry points.
# ----------------------------------------------------------------------------

def write_report(config, workdir: str) -> str:
  """Rebuild <workdir>/report from the workdir's latest checkpoint.

  The model and parameters come from the run (``train.load_trained``); the
  dataset and report options from ``config``.  Returns the path of index.html.
  """
  from zfnet_jax import train  # pylint: disable=g-import-not-at-top
  train.validate_config(config)
  opts = options(config)
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir!r} does not exist")
  model, variables, _ = train.load_trained(workdir)
  info = input_pipeline.dataset_info(config)
  atlas_lib.check_options(model, info.input_size, layers=opts.layers, k=opts.top_k,
                          rule=opts.rule, num_maps=opts.num_maps, chunk_size=opts.chunk_size)
  pixel_mean = input_pipeline.pixel_mean(config, workdir)
  batches = input_pipeline.create_eval_iterator(
      config, workdir, split=opts.split, batch_size=opts.batch_size,
      max_examples=opts.max_examples)
  total = info.num_eval if opts.split == config.dataset.eval_split else None
  if total is not None and opts.max_examples > 0:
    total = min(total, opts.max_examples)
  return render_report(config, workdir, model, variables, batches, pixel_mean,
                       class_names=info.class_names, total=total)


def render_report(config, workdir: str, model: models.PaperNet, variables,
                  batches: Iterable[Mapping[str, np.ndarray]], pixel_mean: np.ndarray, *,
                  class_names: Sequence[str] | None = None, total: int | None = None,
                  progress: bool = True, extra_sections: bool = True) -> str:
  """Write <workdir>/report from a model, its variables and a split's batches.

  batches: as ``input_pipeline.create_eval_iterator`` yields them; pixel_mean
  float32 (S, S, C): image + pixel_mean = display pixels in 0..255.
  ``extra_sections``: add ``zfnet_jax.analyses.report_sections`` if it exists.
  Returns the path of index.html.
  """
  opts = options(config)
  pixel_mean = np.asarray(pixel_mean, np.float32)
  size, channels = pixel_mean.shape[0], pixel_mean.shape[-1]
  atlas_lib.check_options(model, size, layers=opts.layers, k=opts.top_k, rule=opts.rule,
                          num_maps=opts.num_maps, chunk_size=opts.chunk_size)
  analyses = _analyses_module() if extra_sections else None
  if analyses is not None and hasattr(analyses, "validate") and _analyses_enabled(config):
    analyses.validate(config, model)  # their settings, before any long work
  final = os.path.join(workdir, "report")
  tmp = tempfile.mkdtemp(prefix=".report-tmp-", dir=workdir)
  try:
    t0 = time.time()
    run = _run_sections(config, workdir, model, variables, tmp)
    sections = run[:1] + [_overview(config, workdir, model, size, channels, class_names)]
    sections += run[1:]
    with input_pipeline.single_thread_blas():  # the batches' resizes run beside the scan
      sections += _atlas_sections(config, opts, model, variables, batches, pixel_mean,
                                  class_names, total, progress, tmp)
    if analyses is not None:
      for s in _analyses_sections(analyses, config, workdir, model, variables):
        sections.append(_adopt_figures(s, final, workdir, tmp))
    if extra_sections and config.transfer.in_report:
      from zfnet_jax import transfer  # Table 7 probes and Sec. 5.2 transfer, offline data
      sections += transfer.report_sections(config, workdir, compute=True)
    title = f"zfnet_jax report: {config.model.name} on {config.dataset.name}"
    note = (f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} in {time.time() - t0:.0f} s "
            f"from {os.path.abspath(workdir)}.")
    with open(os.path.join(tmp, "index.html"), "w", encoding="utf-8") as f:
      f.write(render_html(title, sections, note))
    _swap(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return os.path.join(final, "index.html")


def _swap(tmp: str, final: str) -> None:
  """Replace ``final`` by ``tmp``; the old directory is removed only once the
  new one is in place."""
  old = None
  if os.path.exists(final):
    old = tempfile.mkdtemp(prefix=".report-old-", dir=os.path.dirname(final))
    os.rename(final, os.path.join(old, "report"))
  os.chmod(tmp, 0o755)
  os.rename(tmp, final)
  if old:
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------
# Sections.
# ----------------------------------------------------------------------------

def _overview(config, workdir, model, size, channels, class_names) -> Section:
  s = Section("Model and configuration", "overview")
  s.paragraphs.append(f"{type(model).__name__} with input {size}x{size}x{channels}; "
                      f"dataset {config.dataset.name}.")
  s.preformatted.append(models.summary(model, size, channels))
  if class_names is not None:
    s.tables.append((["class", "name"], [[str(i), str(n)] for i, n in enumerate(class_names)]))
  s.preformatted.append(config.to_json_best_effort(indent=2, sort_keys=True))
  return s


def _flatten(d, prefix=""):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _flatten(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def _run_sections(config, workdir, model, variables, out_dir) -> list[Section]:
  """Results, training curves and the first-layer filters."""
  s = Section("Results and training curves", "results")
  path = os.path.join(workdir, "results.json")
  if os.path.exists(path):
    try:
      with open(path) as f:
        results = json.load(f)
      rows = [[k, json.dumps(v) if not isinstance(v, str) else v]
              for k, v in _flatten(results if isinstance(results, dict) else {"results": results})]
      s.tables.append((["key", "value"], rows))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      s.paragraphs.append(f"results.json could not be read: {e}")
  else:
    s.paragraphs.append("No results.json in the workdir (training has not finished).")
  records, bad = figures.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  if bad:
    s.paragraphs.append(f"{bad} unreadable line(s) of metrics.jsonl skipped.")
  if figures.training_curves(records, os.path.join(out_dir, "curves.png")):
    s.figures.append(("curves.png", "Loss (left) and top-1/top-5 error (right) against epoch, "
                      "training and evaluation."))
  elif not bad:
    s.paragraphs.append("No training metrics found (metrics.jsonl).")
  sections = [s]
  params = variables["params"]
  if "conv1" in params:
    kernel = np.asarray(jax.device_get(params["conv1"]["kernel"]))
    figures.save_png(figures.filter_grid(kernel), os.path.join(out_dir, "filters_conv1.png"))
    f = Section("First-layer filters", "filters")
    f.figures.append(("filters_conv1.png",
                      f"The {kernel.shape[-1]} conv1 filters ({kernel.shape[0]}x{kernel.shape[1]}"
                      f"x{kernel.shape[2]}), each scaled to its own range (Fig. 6 style)."))
    sections.append(f)
  return sections


def _atlas_sections(config, opts, model, variables, batches, pixel_mean, class_names, total,
                    progress, out_dir) -> list[Section]:
  atlas, scan = atlas_lib.build(
      model, variables, batches, pixel_mean, layers=opts.layers, k=opts.top_k,
      num_maps=opts.num_maps, rule=opts.rule, chunk_size=opts.chunk_size, seed=config.seed,
      total=total, progress=progress)
  name = lambda label: (str(class_names[label]) if class_names is not None
                        and 0 <= label < len(class_names) else str(label))
  sections = []
  for layer, a in atlas.items():
    s = Section(f"Layer {layer}", f"layer-{layer}")
    topk = scan.topk[layer]
    dead = int(np.sum(topk.values[:, 0] <= 0))
    s.paragraphs.append(
        f"Top {opts.top_k} activations over {scan.num_examples} examples of the "
        f"{opts.split!s} split, for {len(a.channels)} of the {topk.values.shape[0]} feature "
        f"maps. Per map: the projections to pixels with the {opts.rule} rule (left, "
        f"each scaled on its own, zero = grey) beside the image patches under the "
        f"receptive field ({a.receptive_field.size} px, stride {a.receptive_field.stride}; "
        f"tiles {a.projections.shape[2]} px) (right). Best first, row by row.")
    s.paragraphs.append(f"{dead} of the {topk.values.shape[0]} maps never fire (maximum <= 0) "
                        f"on these examples.")
    k = a.projections.shape[1]
    for p, start in enumerate(range(0, len(a.channels), MAPS_PER_IMAGE)):
      sl = slice(start, start + MAPS_PER_IMAGE)
      titles = [f"map {int(c)}" + (" (never fires)" if v <= 0 else "")
                for c, v in zip(a.channels[sl], a.values[sl, 0])]
      img = figures.atlas_panel(a.projections[sl], a.patches[sl], a.channels[sl], titles=titles)
      fname = f"atlas_{layer}_{p}.png"
      figures.save_png(img, os.path.join(out_dir, fname))
      chans = a.channels[sl]
      s.figures.append((fname, f"{layer}, maps {', '.join(str(int(c)) for c in chans)}."))
    rows = [[str(int(c)), f"{a.values[i, 0]:.4g}", f"{a.values[i, -1]:.4g}",
             ", ".join(f"{int(e)} ({name(int(l))})" for e, l in zip(a.ids[i], a.labels[i])
                       if e >= 0)]
            for i, c in enumerate(a.channels)]
    s.tables.append((["map", "top value", f"value #{k}", "examples (class), best first"], rows))
    sections.append(s)
  return sections


def _analyses_module():
  """zfnet_jax.analyses, or None if it does not exist (its own import errors raise)."""
  try:
    return importlib.import_module("zfnet_jax.analyses")
  except ModuleNotFoundError as e:
    if e.name == "zfnet_jax.analyses":
      return None
    raise


def _analyses_enabled(config) -> bool:
  a = config.get("analyses")
  return a is None or bool(a.get("enabled", True))


def _analyses_sections(mod, config, workdir, model, variables) -> list[Section]:
  """Sections of ``mod.report_sections`` if that function exists."""
  fn = getattr(mod, "report_sections", None)
  if fn is None:
    return []
  sections = list(fn(config, workdir, model, variables))
  for s in sections:
    if not isinstance(s, Section) and not all(hasattr(s, a) for a in ("title", "anchor")):
      raise TypeError(f"analyses.report_sections returned {type(s).__name__}, not a Section")
  return sections


def _adopt_figures(section, final: str, workdir: str, out_dir: str) -> Section:
  """Copy a section's figures into the new report directory.

  A figure path is looked up relative to the workdir, then the (old) report
  directory (or taken as is if absolute); it keeps its relative path when that
  stays inside the report, else it goes to extra/<name>.
  """
  figs = []
  for rel, caption in getattr(section, "figures", []):
    rel = os.fspath(rel)
    candidates = [rel] if os.path.isabs(rel) else [
        os.path.normpath(os.path.join(workdir, rel)), os.path.normpath(os.path.join(final, rel))]
    src = next((c for c in candidates if os.path.isfile(c)), None)
    if src is None:
      raise FileNotFoundError(f"figure {rel!r} of report section {section.title!r} not found "
                              f"(looked in {candidates})")
    norm = os.path.normpath(rel)
    if os.path.isabs(rel) or norm.startswith(".."):
      norm = os.path.join("extra", os.path.basename(rel))
    dst = os.path.join(out_dir, norm)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if not os.path.exists(dst):
      shutil.copyfile(src, dst)
    figs.append((norm.replace(os.sep, "/"), caption))
  return Section(str(section.title), str(section.anchor),
                 list(getattr(section, "paragraphs", [])), figs,
                 list(getattr(section, "tables", [])), list(getattr(section, "preformatted", [])))


# ----------------------------------------------------------------------------
# HTML.
# ----------------------------------------------------------------------------

_STYLE = """
body { font-family: sans-serif; margin: 0 2em 2em 16em; max-width: 80em; color: #222; }
nav { position: fixed; top: 0; left: 0; width: 14em; height: 100%; overflow: auto;
      background: #f4f4f4; padding: 1em; box-sizing: border-box; }
nav ul { padding-left: 1em; } section { border-top: 1px solid #ccc; padding-top: .5em; }
figure { margin: 1em 0; } img { max-width: 100%; image-rendering: pixelated; }
figcaption { font-size: 90%; color: #444; } pre { background: #f8f8f8; padding: .5em;
overflow: auto; max-height: 30em; } table { border-collapse: collapse; font-size: 90%; }
td, th { border: 1px solid #ccc; padding: 2px 6px; text-align: left; vertical-align: top; }
"""


def _e(text) -> str:
  return html.escape(str(text), quote=True)


def _anchor(text: str, used: set[str]) -> str:
  base = re.sub(r"[^A-Za-z0-9_-]+", "-", str(text)).strip("-") or "section"
  a, n = base, 1
  while a in used:
    n += 1
    a = f"{base}-{n}"
  used.add(a)
  return a


def _src(rel: str) -> str:
  """A relative figure path as a safe URL (no scheme, no '..')."""
  rel = str(rel).replace(os.sep, "/")
  if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", rel) or rel.startswith("/") or ".." in rel.split("/"):
    raise ValueError(f"figure path {rel!r} must be relative to the report directory")
  return _e(urllib.parse.quote(rel))


def render_html(title: str, sections: Sequence[Section], note: str = "") -> str:
  """The page: a table of contents and one <section> per Section, all text escaped."""
  used = {"top", "contents"}
  anchors = [_anchor(s.anchor, used) for s in sections]
  out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
         f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',  # a constant
         '<meta name="referrer" content="no-referrer">',
         f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
         '<nav id="contents"><strong>Contents</strong><ul>']
  out += [f'<li><a href="#{a}">{_e(s.title)}</a></li>' for s, a in zip(sections, anchors)]
  out += ["</ul></nav>", f'<h1 id="top">{_e(title)}</h1>']
  if note:
    out.append(f"<p>{_e(note)}</p>")
  for s, a in zip(sections, anchors):
    out.append(f'<section id="{a}"><h2>{_e(s.title)}</h2>')
    out += [f"<p>{_e(p)}</p>" for p in s.paragraphs]
    for p in getattr(s, "preformatted", []):
      block = f"<pre>{_e(p)}</pre>"
      lines = str(p).count("\n") + 1
      out.append(block if lines <= FOLD_LINES else
                 f"<details><summary>show ({lines} lines)</summary>{block}</details>")
    for rel, caption in s.figures:
      src = _src(rel)
      out.append(f'<figure><a href="{src}"><img src="{src}" alt="{_e(caption)}" '
                 f'loading="eager"></a><figcaption>{_e(caption)}</figcaption></figure>')
    for header, rows in s.tables:
      fold = len(rows) > FOLD_LINES
      if fold:
        out.append(f"<details><summary>show table ({len(rows)} rows)</summary>")
      out.append("<table><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header)
                 + "</tr></thead><tbody>")
      out += ["<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows]
      out.append("</tbody></table>" + ("</details>" if fold else ""))
    out.append('<p><a href="#top">back to top</a></p></section>')
  out.append("</body></html>")
  return "\n".join(out) + "\n"
