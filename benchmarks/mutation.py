"""Mutation testing of the core modules: do the fast tests notice a wrong number?

  python benchmarks/mutation.py --sample 0.05 --json benchmarks/results/mutation.json
  python benchmarks/mutation.py                  # every mutant (several hours on 2 cores)

runs mutmut (configured in setup.cfg's ``[mutmut]``: the modules in ``only_mutate``,
the fast tests in ``pytest_add_cli_args_test_selection``) on every mutant or on a seeded
random sample of each module's mutants, then writes the record.  ``--record-only``
rewrites the record from an earlier run's ``mutants/``.  Run again after a change: it
tests the sampled mutants that have no verdict yet (new, or in a changed function) and
re-tests the survivors; a killed mutant stays killed.

mutmut changes one operator, constant, argument or call at a time and runs the tests
that reach the changed function; a mutant is *killed* when one fails (or the tests time
out).  A survivor is either killed by a new or a stronger test, or listed in
``benchmarks/mutation_equivalent.json`` ({mutant: why no result can change}; see a
mutant with ``mutmut show NAME``).  The score is killed / (mutants - equivalent).

mutmut forks one process per mutant from a server that has imported JAX but not
started it (``process_isolation = forkserver``): a started XLA runtime does not
survive a fork.
"""
import argparse
import collections
import configparser
import datetime
import json
import math
import os
import random
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from zfnet_jax import rundir  # noqa: E402  pylint: disable=wrong-import-position

EQUIVALENT = os.path.join(ROOT, "benchmarks", "mutation_equivalent.json")
DETECTED = ("killed", "timeout", "caught by type check")
CHEAP = "zfnet_jax.analyses.legibility.x_legibility__mutmut_1"   # a mutant of fast tests


def mutant_names() -> list[str]:
  """Every mutant mutmut made of the configured modules (mutants/**/*.meta)."""
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(ROOT, "setup.cfg"))
  names = []
  for path in cfg.get("mutmut", "only_mutate").split():
    with open(os.path.join(ROOT, "mutants", path + ".meta"), encoding="utf-8") as f:
      names += json.load(f)["exit_code_by_key"]
  return sorted(names)


def sample(names: list[str], fraction: float, seed: int) -> list[str]:
  """ceil(fraction x n) mutants of each module, drawn with ``seed``."""
  by_module = collections.defaultdict(list)
  for n in names:
    by_module[module_of(n)].append(n)
  rng = random.Random(seed)
  return sorted(n for m in sorted(by_module) for n in
                rng.sample(by_module[m], math.ceil(fraction * len(by_module[m]))))


def results() -> dict[str, str]:
  """{mutant name: status} of every mutant in mutants/ (mutmut results --all)."""
  out = subprocess.run(["mutmut", "results", "--all", "true"], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout
  return dict(re.findall(r"^\s+(\S+): (.+?)\s*$", out, re.M))


def module_of(mutant: str) -> str:
  """zfnet_jax.nn.rules.xǁGuidedǁbackward__mutmut_8 -> zfnet_jax.nn.rules."""
  return re.split(r"\.x[_ǁ]", mutant, maxsplit=1)[0]


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def record(status: dict[str, str], equivalent: dict[str, str], passes: list[dict],
           of: int, fraction: float, seed: int) -> dict:
  """The record of ``status`` ({mutant: mutmut's verdict}); ``passes``: [{date_utc,
  seconds}] of the runs that made it (the first, then re-runs after new tests)."""
  per_module = collections.defaultdict(collections.Counter)
  for name, s in status.items():
    per_module[module_of(name)]["equivalent" if name in equivalent and s not in DETECTED
                                else s] += 1
  total = collections.Counter()
  for counts in per_module.values():
    total.update(counts)
  detected = sum(total[s] for s in DETECTED)
  scored = sum(total.values()) - total["equivalent"]
  survivors = sorted(n for n, s in status.items()
                     if s not in DETECTED and n not in equivalent)
  return {
      "what": "mutmut run on the core modules against the fast tests (setup.cfg [mutmut])",
      "command": "python benchmarks/mutation.py --json benchmarks/results/mutation.json",
      "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip(),
      "date_utc": _now(),
      "machine": rundir.machine(),
      "seconds": round(sum(p["seconds"] for p in passes), 1),
      "passes": passes,
      "mutants_made": of,
      "sample": {"fraction": fraction, "seed": seed, "per": "module"},
      "mutants": sum(total.values()),
      "killed": detected,
      "equivalent": total["equivalent"],
      "survived_unexplained": len(survivors),
      "score": round(detected / max(scored, 1), 4),
      "by_status": dict(sorted(total.items())),
      "by_module": {m: dict(sorted(c.items())) for m, c in sorted(per_module.items())},
      "equivalent_mutants": {n: why for n, why in sorted(equivalent.items()) if n in status},
      "unexplained_survivors": survivors,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", default="")
  parser.add_argument("--max-children", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--sample", type=float, default=1.0, help="fraction of each module's")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--record-only", action="store_true")
  args = parser.parse_args()
  if not 0 < args.sample <= 1:
    parser.error(f"--sample {args.sample} not allowed: 0 < fraction <= 1")
  run = ["mutmut", "run", "--max-children", str(args.max_children)]
  with open(EQUIVALENT, encoding="utf-8") as f:
    equivalent = json.load(f)
  t0 = time.time()
  if not args.record_only and args.sample == 1:
    subprocess.run(run, cwd=ROOT, check=True)
  elif not args.record_only:
    # One cheap mutant first: makes (or brings up to date) the mutants and the stats.
    subprocess.run(run + [CHEAP], cwd=ROOT, check=True)
    status = results()
    todo = [n for n in sample(mutant_names(), args.sample, args.seed)
            if status.get(n) not in DETECTED and n not in equivalent]
    if todo:      # not run yet, changed since, or survived: (re)tested with today's tests
      subprocess.run(run + todo, cwd=ROOT, check=True)
  passes = []
  if args.json and os.path.exists(args.json):          # the earlier passes of this record
    with open(args.json, encoding="utf-8") as f:
      passes = json.load(f).get("passes", [])
  if not args.record_only:
    passes.append({"date_utc": _now(), "seconds": round(time.time() - t0, 1)})
  names = mutant_names()
  chosen = set(sample(names, args.sample, args.seed))
  status = {n: s for n, s in results().items() if n in chosen}
  rec = record(status, equivalent, passes, len(names), args.sample, args.seed)
  text = json.dumps(rec, indent=1, ensure_ascii=False)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      f.write(text + "\n")
  print(f"{rec['mutants']} mutants: {rec['killed']} killed, {rec['equivalent']} equivalent, "
        f"{rec['survived_unexplained']} survivors unexplained; score {rec['score']:.1%}")


if __name__ == "__main__":
  main()
