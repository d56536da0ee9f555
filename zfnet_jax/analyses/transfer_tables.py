"""The tables of transfer and the probes (Tables 4-7): CSV and Markdown files, the
record ``transfer.json``, the report's section, and the command line's tables.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import ml_collections
import numpy as np

from zfnet_jax.analyses.transfer import (
  PAPER_TRANSFER,
  PAPER_VOC_AP,
  _check,
  _fmt,
  _paper_transfer,
  probe_layers,
  probes,
  transfer_curve,
  transfer_scores,
)
from zfnet_jax.data import iterators
from zfnet_jax.data.targets import TargetData, load_target
from zfnet_jax.render import content
from zfnet_jax.training import train_state, weights


def transfer_rows(result: dict, dataset: str) -> tuple[list[str], list[list[str]]]:
  """The Sec. 5.2 table (Tables 4, 5; VOC's mean) of ``transfer_scores``' result."""
  header = ["model"] + [f"{n}{'/class' if n != 'all' else ''} ({result['metric']} %)"
                        for n in result["scores"]]
  pre = ["pretrained, layers 1-7 frozen + softmax"]
  scratch = ["same architecture from scratch"]
  for by_model in result["scores"].values():
    pre.append(_fmt(by_model["pretrained"]))
    scratch.append("not run" if by_model["scratch"] is None else _fmt(by_model["scratch"]))
  paper = _paper_transfer(dataset)
  if paper:
    header.append(paper[0])
    pre.append(paper[1])
    scratch.append(paper[2])
  return header, [pre, scratch]


def per_class_ap_rows(result: dict) -> tuple[list[str], list[list[str]]]:
  """Table 6: AP % of each class (pretrained, scratch, the paper's) and their mean."""
  ap = result["per_class_ap"]
  cell = lambda v: "–" if v is None or np.isnan(v) else f"{100 * v:.1f}"
  header = ["class", "pretrained, layers 1-7 frozen + softmax (AP %)",
            "same architecture from scratch (AP %)", "paper Table 6 (test AP %)"]
  paper = list(PAPER_VOC_AP) if len(result["classes"]) == len(PAPER_VOC_AP) else []
  rows = []
  for k, name in enumerate(result["classes"]):
    rows.append([name] + [cell(None if ap[m] is None else ap[m][k])
                          for m in ("pretrained", "scratch")] + [str(paper[k]) if paper else "–"])
  mean = lambda m: None if ap[m] is None else float(np.nanmean(ap[m]))
  rows.append(["mean"] + [cell(mean(m)) for m in ("pretrained", "scratch")]
              + ["79.0" if paper else "–"])
  return header, rows


def transfer(net, variables, mean, data: TargetData, settings, input_size: int, seed: int = 0,
             clip_radius: float = 0.1) -> tuple[list[str], list[list[str]]]:
  """The Sec. 5.2 table of ``transfer_scores`` (header, rows)."""
  return transfer_rows(transfer_scores(net, variables, mean, data, settings, input_size, seed,
                                       clip_radius), settings.dataset)


def table_sections(directory: str, settings) -> list[content.Section]:
  """Report sections of the tables in ``directory`` (probes.csv, transfer.csv)."""
  out = []
  probes_csv, transfer_csv = (os.path.join(directory, f"{n}.csv") for n in ("probes", "transfer"))
  if os.path.exists(probes_csv):
    out.append(content.Section(
        "Per-layer linear probes (Table 7)", "probes",
        [f"Features of each layer on {settings.dataset} (conv outputs max-pooled over a "
         f"{settings.pool_grid}x{settings.pool_grid} grid, standardised), classified by a "
         "linear SVM and a softmax; mean ± std over random folds. The paper's column is "
         f"{'Caltech-256 at 60' if settings.dataset == 'caltech256' else 'Caltech-101 at 30'} "
         "images per class with ImageNet features: compare the trend over layers."],
        tables=[content.read_table(probes_csv)]))
  if os.path.exists(transfer_csv):
    section = content.Section(
        "Transfer: frozen features vs training from scratch (Sec. 5.2)", "transfer",
        [f"A new softmax on the frozen layers 1-7, against the same architecture trained from "
         f"a fresh initialisation on the same {settings.dataset} images."],
        tables=[content.read_table(transfer_csv)])
    ap_csv = os.path.join(directory, "per_class_ap.csv")
    if os.path.exists(ap_csv):
      section.paragraphs.append("Average precision of each class on the validation split "
                                "(Table 6; the paper's is on the test server's split).")
      section.tables.append(content.read_table(ap_csv))
    if os.path.exists(os.path.join(directory, "curve.png")):
      section.figures.append((os.path.join(os.path.basename(directory), "curve.png"),
                              "Score against training images per class, mean ± std over "
                              "folds (Fig. 9)" + ("; dashed: the paper's numbers."
                                                  if settings.dataset in PAPER_TRANSFER else ".")))
    out.append(section)
  return out


TABLES = ("probes", "transfer")


def write_tables(net, variables, mean, settings, input_size: int, resize_size: int, directory: str,
                 *, seed: int = 0, clip_radius: float = 0.1, which: Sequence[str] = TABLES
                 ) -> dict[str, tuple[list[str], list[list[str]]]]:
  """The ``which`` tables (probes: Table 7; transfer: Sec. 5.2) of a network on
  ``settings.dataset``, written to <directory>/<name>.csv and .md."""
  _check(settings)
  data = load_target(settings, input_size, resize_size, np.shape(mean)[-1])
  tables = {}
  if "probes" in which:
    tables["probes"] = probes(net, variables, mean, data, settings, input_size)
  if "transfer" in which:
    result = transfer_scores(net, variables, mean, data, settings, input_size, seed, clip_radius)
    tables["transfer"] = transfer_rows(result, settings.dataset)
    if data.multilabel:
      tables["per_class_ap"] = per_class_ap_rows(result)
    else:
      transfer_curve(result, settings.dataset, os.path.join(directory, "curve.png"))
    write_json(result, settings.dataset, os.path.join(directory, "transfer.json"))
  for stem, (header, rows) in tables.items():
    content.write_table(header, rows, directory, stem)
  return tables


def write_json(result: dict, dataset: str, path: str) -> str:
  """``transfer_scores``' result as JSON (scores in [0, 1]; NaN -> null), with the paper's."""
  plain = lambda v: [None if np.isnan(x) else float(x) for x in v] if isinstance(
      v, np.ndarray) else v
  out = {"dataset": dataset, **result}
  if "per_class_ap" in out:
    out["per_class_ap"] = {m: plain(v) for m, v in out["per_class_ap"].items()}
    out["paper_per_class_ap"] = list(PAPER_VOC_AP) if dataset == "voc2012" else None
  if dataset in PAPER_TRANSFER:
    out["paper"] = {m: {str(n): v for n, v in p.items()}
                    for m, p in PAPER_TRANSFER[dataset].items()}
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=1)
  return path


# -- the report ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Options:
  """``config.transfer`` (``settings``) and the clipping radius of the run's recipe."""
  settings: ml_collections.ConfigDict
  clip_radius: float


def validate(options, net, data: content.Data) -> Options:
  """``config.transfer`` plus ``clip_radius`` (added by the report), checked."""
  _check(options)
  probe_layers(net, data.input_size, options.layers)
  return Options(options, float(options.get("clip_radius", 0.1)))


def sections(context: content.Context, options: Options) -> list[content.Section]:
  """Table 7 probes and the Sec. 5.2 transfer of the report's network (transfer/*.csv)."""
  directory = context.path("transfer/probes.csv").rsplit(os.sep, 1)[0]
  write_tables(context.net, context.variables, context.pixel_mean, options.settings,
               context.data.input_size, context.data.resize_size, directory, seed=context.seed,
               clip_radius=options.clip_radius,
               which=TABLES if options.settings.scratch_steps > 0 else ("probes",))
  return table_sections(directory, options.settings)


# -- command line ----------------------------------------------------------------

def _source(config, workdir):
  """-> (model, variables, pixel mean (S,S,C), train config) of the model to transfer."""
  src = config.transfer.source_workdir or workdir
  model, variables, src_config = weights.load_trained(src)
  return model, variables, np.asarray(iterators.pixel_mean(src_config, src)), src_config


def _tables(config, workdir, which):
  model, variables, mean, src = _source(config, workdir)
  return write_tables(model, variables, mean, config.transfer, mean.shape[0],
                      src.dataset.resize_size, os.path.join(workdir, "transfer"),
                      seed=config.seed, clip_radius=train_state.clip_radius(src), which=which)


def probe_table(config, workdir: str) -> tuple[list[str], list[list[str]]]:
  """Per-layer probes of the model in ``config.transfer.source_workdir`` (or ``workdir``)
  on ``config.transfer.dataset``; writes <workdir>/transfer/probes.csv and .md."""
  return _tables(config, workdir, ("probes",))["probes"]


def transfer_table(config, workdir: str) -> tuple[list[str], list[list[str]]]:
  """Pretrained-frozen vs from-scratch; writes <workdir>/transfer/transfer.csv and .md."""
  return _tables(config, workdir, ("transfer",))["transfer"]

