"""Sweeps: a list of config overrides -> one training run each -> one summary table.

A sweep file (e.g. ``experiments/table3_sweep.py``) defines ``get_sweep()``
returning a list of override dicts, built with ``grid``/``zip_`` or by hand:

  {"config": "experiments/alexnet.py:no_fc7",   # config file[:variant] (else CONFIG)
   "model.fc_features": 2048,                    # -> --config.model.fc_features=2048
   "_paper": "27.4 / 40.0 / 18.4"}               # "_" keys: table columns only

and may set ``CONFIG`` (the config file of runs without a "config" key),
take a variant (``--sweep=file.py:variant`` calls ``get_sweep(variant)``) and
define ``collect(planned, root, command)``, run after the summary.
``launch/sweep.py`` is the command line around these functions.
"""
from __future__ import annotations

import itertools
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time
from typing import Any, Sequence

from zfnet_jax import configs, rundir
from zfnet_jax.render import content

RESULT_KEYS = ("top1_error", "top5_error", "top1_error_10crop", "top5_error_10crop",
               "train_top1_error", "num_eval_examples", "steps", "train_seconds")


def grid(**axes: Sequence[Any]) -> list[dict]:
  """Cartesian product: grid(a=[1, 2], b=[3]) -> [{a: 1, b: 3}, {a: 2, b: 3}]."""
  keys = list(axes)
  return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


def zip_(**axes: Sequence[Any]) -> list[dict]:
  """Element-wise: zip_(a=[1, 2], b=[3, 4]) -> [{a: 1, b: 3}, {a: 2, b: 4}]."""
  lengths = {k: len(v) for k, v in axes.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f"zip_ needs axes of equal length, got {lengths}")
  keys = list(axes)
  return [dict(zip(keys, values)) for values in zip(*axes.values())]


def product(*sweeps: list[dict]) -> list[dict]:
  """Every combination of several sweeps' override dicts (later keys win)."""
  return [dict(itertools.chain.from_iterable(d.items() for d in combo))
          for combo in itertools.product(*sweeps)]


def _module(path: str):
  """The sweep file of ``path`` ("file.py" or "file.py:variant") as a module, and the variant."""
  path, _, variant = path.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"sweep file {path!r} does not exist")
  return configs.load_file(path, "sweep_file"), variant


def load_sweep(path: str) -> tuple[list[dict], str]:
  """Runs a sweep file's ``get_sweep()`` (``get_sweep(variant)`` for "file.py:variant")
  -> (override dicts, default config file)."""
  module, variant = _module(path)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"sweep file {path!r} defines no get_sweep()")
  runs = list(module.get_sweep(variant) if variant else module.get_sweep())
  if not runs or not all(isinstance(r, dict) for r in runs):
    raise ValueError(f"get_sweep() of {path!r} must return a non-empty list of dicts")
  return runs, getattr(module, "CONFIG", "")


def collect_hook(path: str):
  """The sweep file's ``collect(planned, root, command)`` (its own tables and pages after
  the summary), or None if it defines none."""
  return getattr(_module(path)[0], "collect", None)


def _flag_value(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  return str(value)


def _name_part(key: str, value: Any) -> str:
  if key == "config":
    path, _, variant = str(value).partition(":")
    text = pathlib.Path(path).stem + (f"-{variant}" if variant else "")
  else:
    v = "-".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
    text = f"{key.split('.')[-1]}={v}"
  return re.sub(r"[^A-Za-z0-9._=+-]", "", text.replace(" ", ""))


def run_name(overrides: dict) -> str:
  """Workdir name from the overrides, e.g. 'alexnet-no_fc7__fc_features=2048'."""
  parts = [_name_part(k, v) for k, v in overrides.items() if not k.startswith("_")]
  return "__".join(p for p in parts if p) or "default"


def expand(runs: list[dict], root: str, default_config: str = "", extra_args: Sequence[str] = (),
           python: str = sys.executable) -> list[dict]:
  """Override dicts -> [{name, workdir, command (argv list), overrides, meta}].

  Keys may be written "model.x" or "config.model.x"; "config" picks the
  config file[:variant]; keys starting with "_" are kept as table columns.
  """
  planned, seen = [], {}
  for overrides in runs:
    overrides = {(k[len("config."):] if k.startswith("config.") else k): v
                 for k, v in overrides.items()}
    config = str(overrides.get("config", default_config))
    if not config:
      raise ValueError(f"run {overrides} names no config file and the sweep sets no CONFIG")
    config_path = config.partition(":")[0]
    if not os.path.isfile(config_path):
      raise FileNotFoundError(f"config file {config_path!r} of run {overrides} does not exist "
                              f"(paths are relative to the current directory: {os.getcwd()})")
    name = run_name(overrides)
    seen[name] = seen.get(name, 0) + 1
    if seen[name] > 1:
      name = f"{name}__{seen[name]}"
    workdir = os.path.join(root, name)
    flags = [f"--config.{k}={_flag_value(v)}" for k, v in overrides.items()
             if k != "config" and not k.startswith("_")]
    command = [python, "-m", "zfnet_jax.main", f"--config={config}", f"--workdir={workdir}",
               *flags, *extra_args]
    planned.append(dict(name=name, workdir=workdir, command=command,
                        overrides={k: v for k, v in overrides.items() if not k.startswith("_")},
                        meta={k[1:]: v for k, v in overrides.items() if k.startswith("_")}))
  return planned


def format_command(command: Sequence[str]) -> str:
  return shlex.join(command)


def execute(planned: list[dict], parallel: int = 1, devices_per_run: int = 0,
            rerun: bool = False) -> dict[str, int]:
  """Runs the planned commands, ``parallel`` at a time; -> {name: exit code}.

  Each run logs to <workdir>/sweep.log.  Runs whose results.json exists are
  skipped unless ``rerun``.  ``devices_per_run`` > 0 gives each concurrent
  run its own CUDA_VISIBLE_DEVICES slice (slot i gets devices i*k..i*k+k-1).
  """
  if parallel < 1:
    raise ValueError(f"parallel must be >= 1, got {parallel}")
  todo = [p for p in planned
          if rerun or not os.path.exists(rundir.path(p["workdir"], rundir.RESULTS))]
  status = {p["name"]: 0 for p in planned if p not in todo}
  for name in status:
    print(f"[sweep] {name}: results.json exists, skipped", flush=True)
  running: dict[int, tuple[dict, subprocess.Popen, Any, float]] = {}
  queue = list(todo)
  started = 0
  while queue or running:
    for slot in range(parallel):
      if slot not in running and queue:
        run = queue.pop(0)
        os.makedirs(run["workdir"], exist_ok=True)
        env = dict(os.environ)
        if devices_per_run > 0:
          env["CUDA_VISIBLE_DEVICES"] = ",".join(
              str(slot * devices_per_run + i) for i in range(devices_per_run))
        log = open(os.path.join(run["workdir"], "sweep.log"), "w")
        started += 1
        print(f"[sweep] start {started}/{len(todo)} {run['name']}: "
              f"{format_command(run['command'])}", flush=True)
        proc = subprocess.Popen(run["command"], stdout=log, stderr=subprocess.STDOUT, env=env)
        running[slot] = (run, proc, log, time.time())
    for slot, (run, proc, log, t0) in list(running.items()):
      if proc.poll() is not None:
        log.close()
        status[run["name"]] = proc.returncode
        what = "done" if proc.returncode == 0 else (
            f"FAILED (exit {proc.returncode}, see {run['workdir']}/sweep.log)")
        print(f"[sweep] {run['name']}: {what} in {time.time() - t0:.0f}s", flush=True)
        del running[slot]
    if running:
      time.sleep(0.5)
  return status


def collect(planned: list[dict], root: str,
            status: dict[str, int] | None = None) -> tuple[list[str], list[list[str]]]:
  """Every run's results.json -> one table; writes <root>/summary.csv and .md."""
  results = {}
  for run in planned:
    path = rundir.path(run["workdir"], rundir.RESULTS)
    if os.path.exists(path):
      with open(path) as f:
        results[run["name"]] = json.load(f)
  override_keys = list(dict.fromkeys(k for r in planned for k in r["overrides"]))
  meta_keys = list(dict.fromkeys(k for r in planned for k in r["meta"]))
  found = set(k for res in results.values() for k, v in res.items()
              if isinstance(v, (int, float, str)) and not isinstance(v, bool))
  result_keys = [k for k in RESULT_KEYS if k in found]
  header = ["run", *override_keys, *meta_keys, *result_keys, "status"]
  rows = []
  for run in planned:
    res = results.get(run["name"])
    code = (status or {}).get(run["name"])
    state = "ok" if res is not None else ("failed" if code else "missing")
    cells = [run["name"]]
    cells += [_flag_value(run["overrides"].get(k, "")) for k in override_keys]
    cells += [str(run["meta"].get(k, "")) for k in meta_keys]
    for k in result_keys:
      v = (res or {}).get(k, "")
      cells.append(f"{v:.4f}" if isinstance(v, float) else str(v))
    rows.append(cells + [state])
  content.write_table(header, rows, root, "summary")
  return header, rows

