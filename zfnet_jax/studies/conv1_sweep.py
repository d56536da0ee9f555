"""The first-layer sweep: measures per run, a record, a page, a table.

A sweep (``experiments/conv1_sweep.py``) trains the same network with the
first layer's (kernel, stride) varied.  ``collect`` reads every finished
workdir of it and writes, under the sweep's root:

  conv1_measures.json     the record: machine, date, command, and per run its
                          overrides, results.json and ``spectra.first_layer_measures``
  conv1_report/           index.html (its own page), conv1_table.md, conv1_vs_stride.png
                          (mid-band share and aliasing against the stride),
                          conv1_filters.png (the filter grids side by side), filters.npz

``readme_table`` renders the README's table from a record alone (e.g. the one
committed under docs/results/), so the README's numbers come from the record.
"""
from __future__ import annotations

import json
import os
import time
from typing import Sequence

import numpy as np

from zfnet_jax import rundir
from zfnet_jax.analyses import spectra
from zfnet_jax.data import iterators
from zfnet_jax.nn import geometry
from zfnet_jax.render import content, figures, pages
from zfnet_jax.training import checkpoints, weights

NUM_IMAGES = 64          # eval images for the aliasing measures (conv1 response, conv2 projections)
RECORD = "conv1_measures.json"
REPORT = "conv1_report"
# Scalars of ``spectra.first_layer_measures`` kept in the record.
MEASURES = ("kernel_size", "stride", "pad", "conv1_out", "dead_fraction", "filter_low",
            "filter_mid", "filter_high", "conv1_aliased", "aliasing_grid", "aliasing_mean",
            "conv1_params", "conv1_flops", "conv2_params", "conv2_flops")


def matched_pad(input_size: int, kernel: int, stride: int, baseline=(7, 2, 0)) -> int:
  """conv1 padding p in 0..(kernel - 1) // 2 whose output side is closest to the
  ``baseline`` (kernel, stride, pad)'s at ``input_size`` (ties: the smaller p), so later
  layers keep the baseline's sizes where a stride allows it.  At most "same" padding:
  more would make the border a larger part of the map."""
  target = geometry.conv_out(input_size, *baseline)[0]
  pads = range((kernel - 1) // 2 + 1)
  return min(pads, key=lambda p: (abs(geometry.conv_out(input_size, kernel, stride, p)[0]
                                      - target), p))


def images_per_second(records: Sequence[dict]) -> float | None:
  """Median training throughput of a run's metrics.jsonl rows (None if none logged)."""
  rates = [r.get("images_per_second", (r.get("metrics") or {}).get("images_per_second"))
           for r in records if r.get("split") == "train"]
  rates = [float(v) for v in rates if v is not None]
  return float(np.median(rates)) if rates else None


def workdir_measures(workdir: str, num_images: int = NUM_IMAGES) -> tuple[dict, np.ndarray]:
  """(record entry {results, measures}, conv1 kernel (k, k, C, F)) of a finished run:
  its newest checkpoint, the first ``num_images`` centre crops of its eval split."""
  config = checkpoints.load_config(workdir)
  loaded = weights.load_model(config, workdir)
  images = iterators.load_examples(loaded.config, workdir, num=num_images)[0]
  d = loaded.config.analyses.diagnostics
  m = spectra.first_layer_measures(
      loaded.model, loaded.variables, images, dead_threshold=d.dead_threshold,
      fft_size=d.fft_size, high_freq=d.high_freq, rule=loaded.config.report.rule)
  measures = {k: (float(m[k]) if isinstance(m[k], (float, np.floating)) else int(m[k]))
              for k in MEASURES}
  records, _ = rundir.read_metrics(rundir.path(workdir, rundir.METRICS))
  measures["images_per_second"] = images_per_second(records)
  measures["num_images"] = int(len(images))
  results = rundir.read_json(rundir.path(workdir, rundir.RESULTS))
  return {"results": results, "measures": measures, "seed": int(loaded.config.seed)}, m["kernel"]


def _cell(values: list, fmt: str) -> str:
  vals = [v for v in values if v is not None]
  if not vals:
    return "-"
  if all(v == vals[0] for v in vals):
    return format(vals[0], fmt)
  fmt = fmt.replace("d", ".0f")
  return f"{format(float(np.mean(vals)), fmt)} ± {format(float(np.std(vals)), fmt)}"


# (header, where the value is, format): one column of the table.
COLUMNS = (
    ("pad", "pad", "d"), ("conv1 out", "conv1_out", "d"),
    ("top-1 err", "top1_error", ".4f"), ("top-1 err 10-crop", "top1_error_10crop", ".4f"),
    ("filter low", "filter_low", ".3f"), ("filter mid", "filter_mid", ".3f"),
    ("filter high", "filter_high", ".3f"), ("dead", "dead_fraction", ".3f"),
    ("conv1 aliased", "conv1_aliased", ".3f"), ("conv2 grid", "aliasing_grid", ".4f"),
    ("conv2 high", "aliasing_mean", ".3f"),
    ("conv1 params", "conv1_params", ",d"), ("conv1 MFLOPs", "conv1_mflops", ".2f"),
    ("conv2 params", "conv2_params", ",d"), ("conv2 MFLOPs", "conv2_mflops", ".2f"),
    ("images/s", "images_per_second", ".0f"),
)


def _value(run: dict, key: str):
  m, r = run["measures"], run["results"]
  if key.endswith("_mflops"):
    return m[key.replace("_mflops", "_flops")] / 1e6
  return m[key] if key in m else r.get(key)


def rows_by_geometry(record: dict) -> dict[tuple[int, int], list[dict]]:
  """{(kernel, stride): [runs]} in order of stride, then kernel."""
  out: dict[tuple[int, int], list[dict]] = {}
  for run in record["runs"]:
    out.setdefault((run["measures"]["kernel_size"], run["measures"]["stride"]), []).append(run)
  return dict(sorted(out.items(), key=lambda kv: (kv[0][1], kv[0][0])))


def table(record: dict) -> tuple[list[str], list[list[str]]]:
  """One row per (kernel, stride): mean ± std (population) over its runs (seeds) where
  they differ, else the value."""
  header = ["conv1", "runs"] + [c[0] for c in COLUMNS]
  rows = []
  for (k, s), runs in rows_by_geometry(record).items():
    rows.append([f"{k}x{k}/{s}", str(len(runs))]
                + [_cell([_value(r, key) for r in runs], fmt) for _, key, fmt in COLUMNS])
  return header, rows


def readme_table(record_path: str) -> str:
  """The README's markdown table from a record (``conv1_measures.json``)."""
  record = rundir.read_json(record_path, "conv1 sweep record")
  header, rows = table(record)
  return content.markdown_table(header, rows)


TABLE_MARKERS = ("<!-- conv1-table: generated by launch/conv1_table.py -->", "<!-- /conv1-table -->")


def replace_table(text: str, table_md: str) -> str:
  """``text`` (the README) with what lies between ``TABLE_MARKERS`` replaced by
  ``table_md``; ValueError if the markers are missing."""
  start, end = TABLE_MARKERS
  i, j = text.find(start), text.find(end)
  if i < 0 or j < i:
    raise ValueError(f"no table markers {start!r} ... {end!r} in the text")
  return text[:i + len(start)] + "\n" + table_md + text[j:]


def plot_vs_stride(record: dict, path: str) -> str:
  """Mid-band share of the conv1 filters, and the aliasing measures, against the stride;
  one marker per (kernel, stride), mean over seeds."""
  plt = figures.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  groups = rows_by_geometry(record)
  kernels = sorted({k for k, _ in groups})
  for i, k in enumerate(kernels):
    pts = [(s, runs) for (kk, s), runs in groups.items() if kk == k]
    strides = [s for s, _ in pts]
    mean = lambda key: [float(np.mean([_value(r, key) for r in runs])) for _, runs in pts]
    kw = dict(color=f"C{i % 10}")
    axes[0].plot(strides, mean("filter_mid"), marker="o", label=f"{k}x{k}", **kw)
    axes[1].plot(strides, mean("conv1_aliased"), marker="o", label=f"{k}x{k} conv1 aliased",
                 **kw)
    axes[1].plot(strides, mean("aliasing_grid"), marker="s", ls="--",
                 label=f"{k}x{k} conv2 grid", **kw)
  for ax in axes:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({s for _, s in groups}))
    ax.set_xticklabels([str(s) for s in sorted({s for _, s in groups})])
    ax.set_xlabel("conv1 stride (px)")
    ax.legend(fontsize=7)
  lo, hi = spectra.BAND_EDGES
  axes[0].set_ylabel(f"share of filter energy at {lo:g}..{hi:g} cycles/px")
  axes[0].set_title("mid-frequency share of conv1 filters (live ones)", fontsize=9)
  axes[1].set_ylabel("share of energy")
  axes[1].set_title("aliasing: conv1 response folded back; conv2 projections at the "
                    "stride's grid", fontsize=9)
  fig.tight_layout()
  return figures.save_figure(fig, path)


def plot_filters(kernels: dict[str, np.ndarray], path: str) -> str:
  """The conv1 filter grids of the runs side by side (each filter scaled on its own)."""
  plt = figures.pyplot()
  names = list(kernels)
  cols = min(len(names), 4)
  nrows = -(-len(names) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.8 * nrows), squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  for ax, name in zip(axes.ravel(), names):
    ax.imshow(figures.filter_grid(kernels[name]), interpolation="nearest")
    ax.set_title(name, fontsize=9)
  fig.tight_layout()
  return figures.save_figure(fig, path)


def _label(entry: dict) -> str:
  m = entry["measures"]
  return f"{m['kernel_size']}x{m['kernel_size']}/{m['stride']} seed {entry['seed']}"


def write_report(record: dict, kernels: dict[str, np.ndarray], out_dir: str) -> str:
  """<out_dir>/index.html (its own page), conv1_table.md, the two figures, filters.npz."""
  os.makedirs(out_dir, exist_ok=True)
  header, rows = table(record)
  content.write_table(header, rows, out_dir, "conv1_table")
  np.savez_compressed(os.path.join(out_dir, "filters.npz"), **kernels)
  plot_vs_stride(record, os.path.join(out_dir, "conv1_vs_stride.png"))
  plot_filters(kernels, os.path.join(out_dir, "conv1_filters.png"))
  lo, hi = spectra.BAND_EDGES
  n = {r["measures"]["num_images"] for r in record["runs"]}
  sec = content.Section(
      "First layer: kernel and stride", "conv1-sweep",
      paragraphs=[
          "The same network and recipe with conv1's (kernel, stride) varied; padding chosen "
          "so conv1's output side is as close as possible to the 7x7/2 run's (at most "
          "'same' padding). Numbers are means (± std over seeds where several).",
          f"Filter bands: share of each live filter's |FFT|^2 (zero-padded, radius in "
          f"cycles/px) below {lo:g} (kept by stride 4), {lo:g}..{hi:g} (kept by stride 2, "
          f"folded by stride 4), above {hi:g} (folded by stride 2); averaged over filters. "
          "Dead: filter RMS below 0.05 x the largest.",
          f"conv1 aliased: share of conv1's response energy (stride 1, before ReLU, to "
          f"{'/'.join(map(str, sorted(n)))} eval images) at frequencies >= 1/(2 stride), "
          "which sampling at the stride folds back. conv2 grid: share of the energy of the "
          "deconvnet projections of the strongest activation of 16 conv2 maps at the "
          "stride's grid frequencies (i/s, j/s) (0 for stride 1; a period-s pattern scores 1). "
          "conv2 high: the diagnostics section's indicator, their energy >= 0.25 cycles/px.",
          "FLOPs per image (a multiply-add is 2), from the layer table; images/s: median "
          "training throughput of the run's log.",
          f"Machine: {record.get('machine')}; date: {record.get('date')}; command: "
          f"{record.get('command')}."],
      figures=[("conv1_vs_stride.png", "Mid-frequency share and aliasing against the stride."),
               ("conv1_filters.png", "conv1 filters of every run.")],
      tables=[(header, rows)])
  path = os.path.join(out_dir, "index.html")
  rundir.write_text(path, pages.render("conv1 sweep", [sec]))
  return path


def collect(planned: Sequence[dict], root: str, command: str = "",
            num_images: int = NUM_IMAGES) -> str | None:
  """Measures of every finished run of a sweep (``sweeps.expand``'s planned runs) ->
  <root>/conv1_measures.json and <root>/conv1_report/; returns the page (None if no
  run has finished)."""
  runs, kernels = [], {}
  for run in planned:
    if not os.path.exists(rundir.path(run["workdir"], rundir.RESULTS)):
      continue
    entry, kernel = workdir_measures(run["workdir"], num_images)
    entry = {"name": run["name"], "overrides": run["overrides"], **entry}
    runs.append(entry)
    kernels[_label(entry)] = kernel
  if not runs:
    return None
  record = {"machine": rundir.machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": command, "band_edges": list(spectra.BAND_EDGES), "runs": runs}
  rundir.write_text(os.path.join(root, RECORD), json.dumps(record, indent=1, default=str))
  return write_report(record, kernels, os.path.join(root, REPORT))
