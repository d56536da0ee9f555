"""The quickstart as a new user runs it: a fresh clone, ``bash launch/quickstart.sh`` N times.

  python benchmarks/quickstart_runs.py [--runs 3] [--load nice-jax]
                                       [--json benchmarks/results/quickstart_runs.json]
                                       [--keep docs/results/quickstart]

Clones this repository's HEAD into a temporary folder, starts the load (``--load``:
``nice-jax``, a second JAX process at nice 19, or ``none``; as in ``soak.py``), then
runs ``time bash launch/quickstart.sh wd<i>`` there ``--runs`` times in a row (each
run on its own workdir, so each trains from scratch).  Records per run: wall
seconds of the whole command (install step included), exit status, the test top-1
error (centre crop and 10 crops) and the phases of ``timings.json``; with
``--keep``, the last run's records (``results.json``, ``timings.json``,
``console.log``, the transfer tables) are copied there.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import soak

from zfnet_jax import rundir  # pylint: disable=wrong-import-order

RECORDS = ("results.json", "timings.json", "transfer.csv", "probes.csv")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--runs", type=int, default=3)
  p.add_argument("--load", default="nice-jax")
  p.add_argument("--json", default=None)
  p.add_argument("--keep", default=None, help="copy the last run's records here")
  args = p.parse_args(argv)
  scratch = tempfile.mkdtemp(prefix="zfnet_qs_")
  clone = os.path.join(scratch, "zfnet_jax")
  subprocess.run(["git", "clone", "-q", soak.ROOT, clone], check=True)
  commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True,
                          text=True, check=True).stdout.strip()
  load = soak.start_load([k for k in args.load.split(",") if k and k != "none"])
  runs = []
  try:
    for i in range(args.runs):
      wd = os.path.join(clone, f"wd{i}")
      t0 = time.time()
      with open(os.path.join(scratch, f"console{i}.log"), "w") as log:
        rc = subprocess.run(["bash", "launch/quickstart.sh", wd], cwd=clone, stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
                            ).returncode
      seconds = time.time() - t0
      res = json.load(open(os.path.join(wd, "results.json"))) if rc == 0 else {}
      tim = json.load(open(os.path.join(wd, "timings.json"))) if rc == 0 else {}
      runs.append({"run": i, "returncode": rc, "seconds": round(seconds, 1),
                   "top1_error": res.get("top1_error"),
                   "top1_error_10crop": res.get("top1_error_10crop"),
                   "phases": {k: round(v, 1) for k, v in tim.get("phases", {}).items()}})
      print(f"quickstart run {i + 1}/{args.runs}: exit {rc}, {seconds / 60:.1f} min, top-1 "
            f"error {res.get('top1_error')}", flush=True)
      if args.keep and i == args.runs - 1 and rc == 0:
        os.makedirs(args.keep, exist_ok=True)
        for name in RECORDS:
          if os.path.exists(os.path.join(wd, name)):
            shutil.copy(os.path.join(wd, name), args.keep)
        shutil.copy(os.path.join(scratch, f"console{i}.log"),
                    os.path.join(args.keep, "console.log"))
  finally:
    for q in load:
      q.kill()
  out = {"what": "bash launch/quickstart.sh from a fresh clone, runs in a row "
                 "(benchmarks/quickstart_runs.py)",
         "command": " ".join(["benchmarks/quickstart_runs.py"] + (argv or sys.argv[1:])),
         "commit": commit,
         "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "machine": rundir.machine(),
         "load": args.load, "runs": runs}
  print(json.dumps(out, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
      f.write("\n")
  shutil.rmtree(scratch, ignore_errors=True)
  return 0 if all(r["returncode"] == 0 for r in runs) else 1


if __name__ == "__main__":
  sys.exit(main())
