"""The files of a run directory (a "workdir"), and atomic writes.

A training run writes, in its workdir:

  config.json        the config it ran with (``CONFIG``)
  dataset_info.json  classes, channels, input size, split sizes (``DATASET_INFO``)
  evolution.json     steps per epoch, steps, [epoch, step] of the Fig. 4 checkpoints
  pixel_mean.npy     float32 (R, R, C) training mean after resize (``MEAN``)
  metrics.jsonl      one JSON row per log/eval: step, epoch, split, metrics
  results.json       final evaluation, with the package versions it ran with
  checkpoints/       Orbax checkpoints (``zfnet_jax.checkpoints``)
  report/            the HTML report (``zfnet_jax.report``)

Every file is written to a temporary name and renamed, so a reader (or a
killed writer) never leaves half a file.  Nothing here imports JAX.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
from typing import Any

CONFIG = "config.json"
TIMINGS = "timings.json"
DATASET_INFO = "dataset_info.json"
EVOLUTION = "evolution.json"
MEAN = "pixel_mean.npy"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
CHECKPOINTS = "checkpoints"
REPORT = "report"

# The packages whose versions a results file records (``versions``).
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "tensorflow-cpu",
            "tensorflow-datasets", "ml-collections", "scikit-learn")


def path(workdir: str, name: str) -> str:
  return os.path.join(workdir, name)


def write_text(file: str, text: str) -> None:
  """Write via a temporary file and a rename: a reader never sees half a file."""
  tmp = f"{file}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, file)


def replace_dir(tmp: str, final: str) -> None:
  """Replace the folder ``final`` by ``tmp`` (a sibling); the old one is removed only
  once the new one is in place."""
  old = None
  if os.path.exists(final):
    old = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(final))
    os.rename(final, os.path.join(old, os.path.basename(final)))
  os.chmod(tmp, 0o755)
  os.rename(tmp, final)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def write_json(file: str, obj: Any) -> None:
  write_text(file, json.dumps(obj, indent=2))


def read_json(file: str, what: str = "run directory") -> Any:
  """A JSON file; FileNotFoundError naming it (and what it belongs to) if missing."""
  if not os.path.exists(file):
    raise FileNotFoundError(f"{file} not found: {os.path.dirname(file)!r} is not a {what}")
  with open(file, encoding="utf-8") as f:
    return json.load(f)


def versions() -> dict[str, str]:
  """{package: version} of Python and ``PACKAGES`` (missing ones left out)."""
  out = {"python": platform.python_version()}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def machine() -> dict[str, object]:
  """{cpu, cores, platform}: the machine a figure was measured on (cpu from /proc/cpuinfo)."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
  except OSError:
    pass
  return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform()}


def read_metrics(file: str) -> tuple[list[dict], int]:
  """metrics.jsonl -> (records, number of unreadable lines skipped)."""
  if not os.path.exists(file):
    return [], 0
  records, bad = [], 0
  with open(file, encoding="utf-8", errors="replace") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        bad += 1
        continue
      if isinstance(row, dict):
        records.append(row)
      else:
        bad += 1
  return records, bad


def append_metrics(file: str, row: dict) -> None:
  with open(file, "a", encoding="utf-8") as f:
    f.write(json.dumps(row) + "\n")


def drop_metrics_after(file: str, step: int) -> None:
  """Forget rows past ``step`` (logged after the checkpoint a resumed run starts from)."""
  if not os.path.exists(file):
    return
  with open(file, encoding="utf-8") as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        keep.append(line)
    except (ValueError, KeyError, TypeError):   # a line cut short by a kill
      pass
  if len(keep) != len(lines):
    write_text(file, "".join(keep))


def evolution_checkpoints(workdir: str) -> list[tuple[float, int]]:
  """[(epoch, step)] of the feature-evolution checkpoints that exist, in order."""
  kept = read_json(path(workdir, EVOLUTION), "training workdir")["checkpoints"]
  ckpt = path(workdir, CHECKPOINTS)
  have = {int(d) for d in os.listdir(ckpt) if d.isdigit()} if os.path.isdir(ckpt) else set()
  return [(float(e), int(s)) for e, s in kept if int(s) in have]
