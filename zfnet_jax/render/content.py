"""What a report is made of: sections, the context they are computed from, tables.

Everything that contributes to the report (the run's results and curves, the
atlas of each layer, each analysis, the transfer tables) follows one protocol,
a ``Contributor``:

  options = contributor.validate(config_subtree, net, data)   # before any work
  sections = contributor.sections(context, options)                 # list[Section]

``validate`` reads only its own part of the config and raises ValueError
naming a bad value and what is allowed; ``sections`` computes from the
``Context`` (a model and arrays, built once by ``zfnet_jax.report.report``), writes
its files into ``context.out_dir`` and returns Sections that name them by
paths relative to that folder.  The report owns the page: a contributor knows
no config, no workdir and no HTML.
"""
from __future__ import annotations

import csv
import dataclasses
import os
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np


@dataclasses.dataclass
class Section:
  """One section of the report, given as data (the report escapes all text).

  figures: (path, caption) pairs, paths relative to the report folder.
  tables: (header, rows) pairs; cells are plain strings.
  preformatted: blocks shown as monospaced text.
  """
  title: str
  anchor: str
  paragraphs: list[str] = dataclasses.field(default_factory=list)
  figures: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  tables: list[tuple[list[str], list[list[str]]]] = dataclasses.field(default_factory=list)
  preformatted: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Data:
  """The images the network sees: dataset ``name``, model input side ``input_size``
  (S, the crop), ``resize_size`` (R, before cropping), ``channels``."""
  name: str
  input_size: int
  resize_size: int
  channels: int


@dataclasses.dataclass
class Context:
  """What every contributor computes from; built once per report.

  net: the network (``zfnet_jax.deconv.Network``: named activations,
    projections, receptive fields); variables: its {"params": ...}.
  images: float32 (N, S, S, C) the analysed examples, mean-subtracted;
    labels int (N,); ids int (N,) (index in their split).
  pixel_mean: float32 (S, S, C); image + pixel_mean = display pixels 0..255.
  class_names: one name per class index.
  out_dir: the folder contributors write into (the report's, while it is built).
  data: the dataset's name and sizes.
  rule: the rule of every projection ("deconvnet", "guided", "backprop").
  seed: seeds random choices (maps shown); batch_size: forward passes per batch.
  split_batches: () -> a fresh iterator of the scanned split's batches
    ({"image", "label", "mask", "id"}); split_name, split_total: its name and size.
  examples: (ids=None, split=None, num=-1) -> (images, labels, ids): exactly the
    examples ``ids`` of ``split`` (default: the analysed split; ValueError if one is
    missing), or its first ``num``.
  train_batches: n -> an iterator of batches of the first n training examples (-1 =
    all; centre crops, as split_batches).
  checkpoints: [(epoch, () -> variables)] kept during training (Fig. 4).
  comparisons: {name: (net, variables, note)} other trained models (Fig. 6).
  results: the run's results (None if it has not finished); metrics: its
    metrics.jsonl records; bad_metrics: unreadable lines skipped.
  """
  net: Any
  variables: Any
  images: np.ndarray
  labels: np.ndarray
  ids: np.ndarray
  pixel_mean: np.ndarray
  class_names: Sequence[str]
  out_dir: str
  data: Data | None = None
  rule: str = "deconvnet"
  seed: int = 0
  batch_size: int = 64
  split_batches: Callable[[], Iterator[Mapping[str, np.ndarray]]] | None = None
  split_name: str = ""
  split_total: int | None = None
  examples: Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
  train_batches: Callable[[int], Iterator[Mapping[str, np.ndarray]]] | None = None
  checkpoints: Sequence[tuple[float, Callable[[], Any]]] = ()
  comparisons: Mapping[str, tuple[Any, Any, str]] = dataclasses.field(default_factory=dict)
  results: Mapping[str, Any] | None = None
  metrics: Sequence[Mapping[str, Any]] = ()
  bad_metrics: int = 0
  progress: bool = True

  def path(self, name: str) -> str:
    """A file in the output folder (its sub-folders created)."""
    full = os.path.join(self.out_dir, name)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    return full

  def class_name(self, label: int) -> str:
    label = int(label)
    return str(self.class_names[label]) if 0 <= label < len(self.class_names) else str(label)


class Contributor(Protocol):
  """A module (or object) that contributes sections to the report."""

  def validate(self, options: Any, net: Any, data: Data) -> Any: ...

  def sections(self, context: Context, options: Any) -> list[Section]: ...


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A GitHub markdown table ('|' in cells escaped)."""
  esc = lambda s: str(s).replace("|", "\\|")
  lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def write_table(header: Sequence[str], rows: Sequence[Sequence[str]], directory: str,
                stem: str) -> str:
  """<directory>/<stem>.csv and .md; returns the csv path."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f"{stem}.csv")
  with open(path, "w", newline="", encoding="utf-8") as f:
    csv.writer(f).writerows([list(header), *[list(r) for r in rows]])
  with open(os.path.join(directory, f"{stem}.md"), "w", encoding="utf-8") as f:
    f.write(markdown_table(header, rows))
  return path


def read_table(path: str) -> tuple[list[str], list[list[str]]]:
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f))
  return rows[0], rows[1:]
