"""Is a change of the code a change of the results?  A reduced quickstart's fingerprint.

  python benchmarks/fingerprint.py run CHECKOUT WORKDIR     # train + report, then digest
  python benchmarks/fingerprint.py compare A.json B.json    # every difference, or none

``run`` trains the quickstart model for 0.3 epoch on one CPU device (three evolution
checkpoints, the Fig. 6 comparison model for 0.1 epoch, the digits transfer) from the
checkout CHECKOUT (so two commits can be compared from two worktrees), writes the report,
and saves WORKDIR.json: a SHA-256 of every array behind the results (each checkpoint's
restored TrainState, every ``.npy``/``.npz`` of the report: atlas, walk-through,
occlusion, invariance, evolution, diagnostics), of every CSV and PNG, and of every JSON
record with its times, paths and versions left out (wall-time records and checkpoint
manifests aside).  A refactoring that claims "no change
of behaviour" must give the same file.
"""
import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np

RUN = ["--config=quickstart", "--config.num_epochs=0.3", "--config.evolution_epochs=(0.1,0.2,0.3)",
       "--config.analyses.diagnostics.comparison_epochs=0.1",
       "--config.transfer.scratch_steps=20", "--config.analyses.evolution.max_examples=500",
       "--config.checkpoint_every_steps=50"]
# Keys of JSON records that change from run to run (times, machine, paths).
VOLATILE = re.compile(r"(time|second|_s$|date|utc|wall|elapsed|per_s|rate|speed|duration|host|"
                      r"path|dir|version|commit|machine|command|load)", re.I)


# Files that differ from run to run by design: wall times per phase, and the checkpoints'
# manifests (hashes of files that hold Orbax's timestamps; the states themselves count).
SKIPPED = ("timings.json", "zfnet_checksums.json")


def _sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()[:16]


def _scrub(o):
  if isinstance(o, dict):
    return {k: _scrub(v) for k, v in sorted(o.items()) if not VOLATILE.search(k)}
  if isinstance(o, list):
    return [_scrub(v) for v in o]
  return "<path>" if isinstance(o, str) and os.sep in o else o


def _state(step_dir: str) -> str:
  import jax  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with ocp.StandardCheckpointer() as c:
    state = c.restore(os.path.join(step_dir, "state"))
  leaves = jax.tree_util.tree_leaves_with_path(state)
  return _sha(b"".join(jax.tree_util.keystr(p).encode() + np.asarray(v).tobytes()
                       for p, v in leaves))


def digest(workdir: str) -> dict[str, str]:
  out = {}
  for folder, dirs, files in os.walk(workdir):
    dirs.sort()
    rel = os.path.relpath(folder, workdir)
    if os.path.basename(os.path.dirname(folder)) == "checkpoints" and "state" in dirs:
      out[os.path.join(rel, "state")] = _state(folder)
      dirs[:] = []
      continue
    for f in sorted(files):
      path, key = os.path.join(folder, f), os.path.normpath(os.path.join(rel, f))
      if f.endswith(".npy"):
        out[key] = _sha(np.load(path).tobytes())
      elif f.endswith(".npz"):
        with np.load(path) as z:
          out[key] = _sha(b"".join(k.encode() + z[k].tobytes() for k in sorted(z.files)))
      elif f.endswith((".csv", ".png")):
        with open(path, "rb") as fh:
          out[key] = _sha(fh.read())
      elif f.endswith(".json") and f not in SKIPPED:
        with open(path, encoding="utf-8") as fh:
          out[key] = _sha(json.dumps(_scrub(json.load(fh)), sort_keys=True).encode())
  return out


def main(argv):
  if len(argv) == 4 and argv[1] == "run":
    checkout, workdir = os.path.abspath(argv[2]), os.path.abspath(argv[3])
    env = dict(os.environ, PYTHONPATH=checkout)
    subprocess.run([sys.executable, "-m", "zfnet_jax.main", f"--workdir={workdir}", *RUN],
                   cwd=checkout, env=env, check=True)
    d = digest(workdir)
    with open(workdir.rstrip(os.sep) + ".json", "w", encoding="utf-8") as f:
      json.dump(d, f, indent=1, sort_keys=True)
    print(f"{len(d)} files digested -> {workdir.rstrip(os.sep)}.json")
  elif len(argv) == 4 and argv[1] == "compare":
    a, b = (json.load(open(p, encoding="utf-8")) for p in argv[2:])
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    for k in diff:
      print(f"differs: {k}: {a.get(k)} vs {b.get(k)}")
    print(f"{len(a)} vs {len(b)} files; {len(diff)} differ")
    return 1 if diff else 0
  else:
    print(__doc__)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
