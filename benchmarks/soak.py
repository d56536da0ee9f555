"""Soak: the quickstart's training, run again and again under load; counts aborts and hangs.

  python benchmarks/soak.py [--runs 20] [--parallel 2] [--steps 0] [--devices 1]
                            [--load nice-jax,busy] [--hang-seconds 180]
                            [--json benchmarks/results/soak.json]

Each run is the main command itself, ``python -m zfnet_jax.main
--config=experiments/quickstart.py --workdir=<temp> --config.report.enabled=False``
(the quickstart's config, data pipeline, train step, checkpoints and final
evaluation; no report), with ``--config.num_train_steps`` when ``--steps`` > 0
(0: the quickstart's full length) and ``--config.cpu_host_devices`` from
``--devices``.  ``--parallel`` runs go at once (each is load for the others).

Load, for the whole soak (``--load``, comma-separated): ``nice-jax``, a second JAX
process at nice 19 running convolutions and matmuls in a loop; ``busy``, a Python
busy loop at normal priority.

Per run the record has: exit status, the signal that ended it (an abort is a run
ended by a signal this tool did not send), a hang (no output line for
``--hang-seconds``: this tool then kills it), the last training step seen, wall
seconds, the training steps/s from ``metrics.jsonl``, the stall warnings it
printed, the top-1 error, and the tail of its output when it failed.  The record
also names the CPU, the load averages seen, the versions and the command.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_RE = re.compile(r"training \S+:.*?(\d+)/(\d+) \[")
NICE_JAX = """
import jax, jax.numpy as jnp
x = jnp.ones((64, 32, 32, 16)); w = jnp.ones((3, 3, 16, 32)); a = jnp.ones((512, 512))
f = jax.jit(lambda x, w, a: (jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC")).sum(), (a @ a).sum()))
while True:
  jax.block_until_ready(f(x, w, a))
"""
LOADS = {"nice-jax": ["nice", "-n", "19", sys.executable, "-c", NICE_JAX],
         "busy": [sys.executable, "-c", "while True: pass"]}


class Run:
  """One child: the main command on a fresh workdir, its output read line by line."""

  def __init__(self, index: int, args, workdir: str):
    self.index, self.workdir, self.args = index, workdir, args
    cmd = [sys.executable, "-m", "zfnet_jax.main", "--config=experiments/quickstart.py",
           f"--workdir={workdir}", "--config.report.enabled=False",
           f"--config.cpu_host_devices={args.devices}"]
    if args.steps > 0:
      cmd.append(f"--config.num_train_steps={args.steps}")
    env = {**os.environ, "ZFNET_PROGRESS_SECONDS": "5", "PYTHONUNBUFFERED": "1"}
    self.t0 = self.last = time.time()
    self.step, self.lines, self.stalls, self.killed = 0, [], 0, False
    self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    self.reader = threading.Thread(target=self._read, daemon=True)
    self.reader.start()

  def _read(self):
    for line in self.proc.stdout:
      line = line.rstrip("\n")
      self.lines = (self.lines + [line])[-40:]
      if "has not finished after" in line:
        self.stalls += 1
        continue
      self.last = time.time()
      m = STEP_RE.search(line)
      if m:
        self.step = max(self.step, int(m.group(1)))

  def poll(self) -> bool:
    """True when the run has ended (or was killed as hung)."""
    if self.proc.poll() is not None:
      return True
    if time.time() - self.last > self.args.hang_seconds:
      self.killed = True
      self.proc.kill()
      self.proc.wait()
      return True
    return False

  def record(self) -> dict:
    self.reader.join(timeout=10)
    rc = self.proc.returncode
    rows = []
    log = os.path.join(self.workdir, "metrics.jsonl")
    if os.path.exists(log):
      rows = [json.loads(l) for l in open(log) if l.strip()]
    train_rows = [r for r in rows if r.get("split") == "train"]
    results = {}
    if os.path.exists(os.path.join(self.workdir, "results.json")):
      results = json.load(open(os.path.join(self.workdir, "results.json")))
    steps = max([r["step"] for r in train_rows] + [self.step])
    sps = [r["steps_per_second"] for r in train_rows[1:] if "steps_per_second" in r]
    out = {"run": self.index, "returncode": rc,
           "signal": signal.Signals(-rc).name if rc is not None and rc < 0 else None,
           "abort": bool(rc is not None and rc < 0 and not self.killed),
           "hang": self.killed, "steps": steps, "seconds": round(time.time() - self.t0, 1),
           "steps_per_second": round(statistics.median(sps), 2) if sps else None,
           "stall_warnings": self.stalls, "top1_error": results.get("top1_error")}
    if rc != 0:
      out["output_tail"] = self.lines[-25:]
    return out


def start_load(kinds):
  procs = []
  for kind in kinds:
    if kind not in LOADS:
      raise SystemExit(f"error: --load {kind!r}; allowed: {', '.join(LOADS)} (comma-separated)")
    procs.append(subprocess.Popen(LOADS[kind], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL))
  return procs


def write_record(args, argv, started, t0, loadavg, records, done: bool) -> dict:
  """The record so far (``done``: the soak has ended) to ``--json``; returns its summary."""
  import jax  # pylint: disable=g-import-not-at-top,multiple-imports
  import jaxlib

  from zfnet_jax import rundir  # pylint: disable=g-import-not-at-top
  sps = [r["steps_per_second"] for r in records if r["steps_per_second"]]
  summary = {"runs": len(records), "aborts": sum(r["abort"] for r in records),
             "hangs": sum(r["hang"] for r in records),
             "other_failures": sum(r["returncode"] != 0 and not r["abort"] and not r["hang"]
                                   for r in records),
             "stall_warnings": sum(r["stall_warnings"] for r in records),
             "steps": sum(r["steps"] for r in records),
             "median_steps_per_second": round(statistics.median(sps), 2) if sps else None,
             "wall_minutes": round((time.time() - t0) / 60, 1), "finished": done}
  kinds = [k for k in args.load.split(",") if k and k != "none"]
  out = {"what": "soak of the quickstart's training (benchmarks/soak.py)",
         "command": " ".join(["benchmarks/soak.py"] + (argv or sys.argv[1:])),
         "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                  text=True).stdout.strip(),
         "started_utc": started.isoformat(timespec="seconds"),
         "machine": {**rundir.machine(), "python": platform.python_version(),
                     "jax": jax.__version__,
                     "jaxlib": jaxlib.__version__},
         "settings": {"runs": args.runs, "parallel": args.parallel,
                      "steps": args.steps or "quickstart (num_epochs)",
                      "cpu_host_devices": args.devices, "load": kinds,
                      "hang_seconds": args.hang_seconds},
         "load_average_1min": {"min": min(loadavg, default=None),
                               "max": max(loadavg, default=None)},
         "summary": summary, "runs": records}
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json + ".tmp", "w") as f:
      json.dump(out, f, indent=1)
      f.write("\n")
    os.replace(args.json + ".tmp", args.json)
  return summary


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--runs", type=int, default=20)
  p.add_argument("--parallel", type=int, default=1)
  p.add_argument("--steps", type=int, default=0, help="0: the quickstart's full length")
  p.add_argument("--devices", type=int, default=1, help="--config.cpu_host_devices")
  p.add_argument("--load", default="nice-jax,busy", help="nice-jax, busy, both or none")
  p.add_argument("--hang-seconds", type=float, default=180.0)
  p.add_argument("--json", default=None, help="write the record here")
  args = p.parse_args(argv)
  for name in ("runs", "parallel", "devices"):
    if getattr(args, name) < 1:
      p.error(f"--{name}={getattr(args, name)}; allowed: a positive int")
  kinds = [k for k in args.load.split(",") if k and k != "none"]
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # through `finally`: kill the runs
  scratch = tempfile.mkdtemp(prefix="zfnet_soak_")
  load = start_load(kinds)
  started = datetime.datetime.now(datetime.timezone.utc)
  records, running, loadavg, next_index = [], [], [], 0
  t0 = time.time()
  try:
    while next_index < args.runs or running:
      while next_index < args.runs and len(running) < args.parallel:
        running.append(Run(next_index, args, os.path.join(scratch, f"run{next_index}")))
        next_index += 1
      time.sleep(1)
      if int(time.time() - t0) % 30 == 0:
        loadavg.append(round(os.getloadavg()[0], 2))
      for r in [r for r in running if r.poll()]:
        running.remove(r)
        rec = r.record()
        records.append(rec)
        shutil.rmtree(r.workdir, ignore_errors=True)
        print(f"soak: run {rec['run'] + 1}/{args.runs}: exit {rec['returncode']}"
              f"{' ABORT ' + str(rec['signal']) if rec['abort'] else ''}"
              f"{' HANG' if rec['hang'] else ''}, {rec['steps']} steps in {rec['seconds']} s, "
              f"{rec['steps_per_second']} steps/s, top-1 error {rec['top1_error']}",
              flush=True)
        write_record(args, argv, started, t0, loadavg, records, done=False)
  finally:
    for r in running:
      r.proc.kill()
    for q in load:
      q.kill()
    shutil.rmtree(scratch, ignore_errors=True)
  summary = write_record(args, argv, started, t0, loadavg, records, done=True)
  print(json.dumps(summary, indent=1))
  return 1 if summary["aborts"] or summary["hangs"] else 0


if __name__ == "__main__":
  sys.exit(main())
