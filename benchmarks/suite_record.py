"""The suite's record: how long ``.ci/run`` took from a fresh clone, and its slowest tests.

  git clone . /tmp/fresh && (cd /tmp/fresh && CI=true bash -c 'time bash .ci/run') \
      > /tmp/ci.log 2>&1
  python benchmarks/suite_record.py /tmp/ci.log --commit "$(git -C /tmp/fresh rev-parse HEAD)" \
      --json benchmarks/results/suite.json

Reads pytest's summary line ("N passed ... in S s"), bash's ``real`` time (the install
step included) and the ``--durations`` table from the log; names the CPU.  Run the clone
on a quiet machine: anything beside it counts in its time.
"""
import argparse
import datetime
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zfnet_jax import rundir  # noqa: E402  pylint: disable=wrong-import-position


def parse(text: str) -> dict:
  summary = re.findall(r"^=*\s*(.*?) in ([\d.]+)s(?: \([\d:]+\))?\s*=*$", text, re.M)
  if not summary:
    raise ValueError("no pytest summary line in the log")
  counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|"
                                            r"xpassed|deselected)", summary[-1][0])}
  real = re.findall(r"^real\s+(\d+)m([\d.]+)s$", text, re.M)
  slowest = [{"seconds": float(s), "phase": p, "test": t} for s, p, t in
             re.findall(r"^([\d.]+)s (call|setup|teardown)\s+(\S+)$", text, re.M)]
  return {"counts": counts, "pytest_seconds": float(summary[-1][1]),
          "seconds": (int(real[-1][0]) * 60 + float(real[-1][1])) if real else None,
          "slowest": slowest}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("log")
  parser.add_argument("--commit", default="")
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  with open(args.log, encoding="utf-8", errors="replace") as f:
    record = {"what": "CI=true bash .ci/run from a fresh clone (install, then the suite)",
              "commit": args.commit,
              "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds"),
              "machine": rundir.machine(), **parse(f.read())}
  text = json.dumps(record, indent=1)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  main()
