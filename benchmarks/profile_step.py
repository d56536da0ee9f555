"""Where the quickstart's train step spends its time: a profile per XLA op (fusion).

  python benchmarks/profile_step.py [--steps 20] [--top 25] [--json FILE]

Traces ``--steps`` steps of experiments/quickstart.py's own train step (as
``benchmarks/run.py --only quickstart`` runs it: one CPU device unless ``XLA_FLAGS``
says otherwise, the package's compiler options, synthetic 32 px grey images, batch
128) with ``jax.profiler``, reads the trace back (``jax.profiler.ProfileData``) and
sums the time of every XLA op event (thunks: fusions, convolutions, YNNPACK calls)
by name, per step.  Prints the top ``--top`` and writes all of them to ``--json``,
with the step's median wall time.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import glob
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench  # pylint: disable=g-import-not-at-top,wrong-import-position

from zfnet_jax import rundir, xla
from zfnet_jax.nn import models


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  config = bench.quickstart_config()
  model = models.from_config(config.model, 10)
  size = config.dataset.crop_size
  step, state, data = bench.setup_train(config, model, config.batch_size,
                                        xla.compiler_options(), input_size=size, channels=1)
  for _ in range(3):                                  # compile and warm up
    state, m = step(state, data)
  jax.block_until_ready(m)
  walls = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, m = step(state, data)
    jax.block_until_ready(m)
    walls.append(time.perf_counter() - t0)
  trace_dir = tempfile.mkdtemp(prefix="zfnet_profile_")
  with jax.profiler.trace(trace_dir):
    for _ in range(args.steps):
      state, m = step(state, data)
      jax.block_until_ready(m)
  xplane = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
  prof = jax.profiler.ProfileData.from_file(xplane)
  per_op = collections.Counter()
  count = collections.Counter()
  for plane in prof.planes:
    if not plane.name.startswith("/host:CPU"):
      continue
    for line in plane.lines:
      if "XLA Ops" not in line.name and "xla ops" not in line.name.lower():
        continue
      for ev in line.events:
        per_op[ev.name] += ev.duration_ns / 1e6 / args.steps
        count[ev.name] += 1
  if not per_op:   # no "XLA Ops" line on this jaxlib: every host event but Python's
    for plane in prof.planes:
      for line in plane.lines:
        if "python" in line.name.lower():
          continue
        for ev in line.events:
          per_op[ev.name] += ev.duration_ns / 1e6 / args.steps
          count[ev.name] += 1
  # The executor's own spans (its wait for asynchronous work) are not ops: convolutions run
  # asynchronously on Eigen's pool, whose threads record no events, so their time is the
  # part of the step that no op event covers.
  for name in [k for k in per_op if k.startswith(("ThunkExecutor", "SlinkyThreadPool"))]:
    del per_op[name]
  total = sum(per_op.values())
  rows = [{"op": k, "ms_per_step": round(v, 3), "share": round(v / total, 4),
           "calls_per_step": count[k] / args.steps} for k, v in per_op.most_common()]
  wall = statistics.median(walls) * 1e3
  convs = sum(v for k, v in per_op.items() if "conv" in k)
  print(f"quickstart train step: median {wall:.1f} ms wall; op events {total:.1f} ms per step "
        f"(fusions, copies, YNNPACK dots and reductions, convolution launches {convs:.1f} ms); "
        f"not covered by an op event (Eigen's asynchronous convolutions): "
        f"{max(wall - total, 0):.1f} ms")
  for r in rows[:args.top]:
    print(f"  {r['ms_per_step']:8.2f} ms  {100 * r['share']:5.1f}%  {r['op']}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"what": "per-op profile of the quickstart's train step "
                         "(benchmarks/profile_step.py)",
                 "command": " ".join(["benchmarks/profile_step.py"] + (argv or sys.argv[1:])),
                 "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
                     timespec="seconds"),
                 "machine": rundir.machine(), "devices": len(jax.devices()),
                 "compiler_options": xla.compiler_options(),
                 "load_average": os.getloadavg(), "median_step_ms": round(wall, 2),
                 "op_events_ms_per_step": round(total, 2),
                 "not_covered_ms_per_step": round(max(wall - total, 0), 2),
                 "ops": rows}, f, indent=1)
      f.write("\n")


if __name__ == "__main__":
  main()
