"""Peak resident memory of the top-k scan and of the report phase, at N and 2N images.

  python benchmarks/memory.py [--json FILE] [--cases scan224,scan64,report]
                              [--scan224 256] [--scan64 25000] [--report 2500]

Each case runs twice, in a fresh child process each time, at N and at 2N images;
the child reports its peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``,
which covers everything the process ever held: imports, compilation, the scan).
Memory is bounded when the 2N peak is the N peak within noise: nothing kept per
image.

* scan224: ``atlas.scan`` (top-9 of every map of conv1..conv5) of full-size ZFNet
  at 224x224 over a stream of synthetic batches (64 images each, made one at a
  time by a generator, as the input pipeline hands them over).  A 50,000-image
  scan at 224 px takes hours on 2 CPU cores, so N defaults to 256 (2N = 512): the
  same code path, batch shapes and state; what grows with the image count would
  grow here too.
* scan64: the same scan of the quickstart's model (ZFNetLowRes with its widths)
  at 64 px, N = 25,000 and 2N = 50,000 images (batches of 256): the scan size of
  a large atlas, at the quickstart's resolution.
* report: ``python -m zfnet_jax.main --mode=report`` of a tiny trained workdir
  (made first, once; ``tests/helpers.tiny_config``'s model and recipe on
  Fashion-MNIST) with ``report.max_examples`` = N and 2N from the training split
  (default 2,500 / 5,000): the whole report phase, scan, projections, analyses and
  pages.  Needs the Fashion-MNIST IDX files (``dataset.fashion_mnist_dir``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CASES = ("scan224", "scan64", "report")


def peak_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def child_scan(model_name: str, size: int, n: int, batch: int) -> dict:
  """Runs in the child: scan n synthetic images, return peak RSS and timings."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from zfnet_jax.analyses import atlas
  from zfnet_jax.nn import geometry, models
  if model_name == "quickstart":
    sys.path.insert(0, HERE)
    import run  # pylint: disable=g-import-not-at-top
    model = models.from_config(run.quickstart_config().model, 10)
  else:
    model = models.create_model(model_name)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))

  def batches():
    rng = np.random.default_rng(0)
    for s in range(0, n, batch):
      b = min(batch, n - s)
      img = np.zeros((batch, size, size, 3), np.float32)
      img[:b] = rng.normal(0, 50, (b, size, size, 3))
      yield {"image": img, "id": np.arange(s, s + batch), "mask": np.arange(batch) < b,
             "label": np.zeros(batch, np.int32)}
  before = peak_mib()
  t = time.perf_counter()
  out = atlas.scan(model, variables, batches(), layers=list(geometry.CONV_NAMES), k=9,
                   progress=False)
  jax.block_until_ready(out.topk["conv5"].values)
  return {"images": n, "seconds": time.perf_counter() - t, "peak_rss_mib": peak_mib(),
          "peak_rss_before_scan_mib": before}


def run_child(args: list[str]) -> dict:
  out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *args],
                       capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT + os.pathsep +
                            os.environ.get("PYTHONPATH", "")}, check=False)
  if out.returncode:
    raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def report_case(n: int, tmp: str) -> dict:
  """The report phase of a tiny trained workdir with report.max_examples = n."""
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  workdir = os.path.join(tmp, "tiny")
  cfg = os.path.join(tmp, "tiny_config.py")
  if not os.path.exists(cfg):
    with open(cfg, "w") as f:
      f.write("import sys\nsys.path.insert(0, %r)\nfrom helpers import tiny_config\n\n"
              "def get_config():\n  c = tiny_config()\n  c.report.split = 'train'\n"
              "  c.report.batch_size = 256\n  return c\n" % os.path.join(ROOT, "tests"))
    subprocess.run([sys.executable, "-m", "zfnet_jax.main", f"--config={cfg}",
                    f"--workdir={workdir}"], cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": ROOT})
  t = time.perf_counter()
  cmd = [sys.executable, "-c",
         "import resource, sys, runpy; sys.argv = sys.argv[1:];"
         "code = 0\ntry:\n  runpy.run_module('zfnet_jax.main', run_name='__main__')\n"
         "except SystemExit as e:\n  code = e.code or 0\n"
         "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
         "sys.exit(code)",
         "zfnet_jax.main", f"--config={cfg}", f"--workdir={workdir}", "--mode=report",
         f"--config.report.max_examples={n}"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False,
                       env={**os.environ, "PYTHONPATH": ROOT})
  if out.returncode:
    raise RuntimeError(f"report with {n} examples failed:\n{out.stderr[-3000:]}")
  peak = float(out.stdout.strip().splitlines()[-1].split()[1])
  return {"images": n, "seconds": time.perf_counter() - t, "peak_rss_mib": peak}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--json", default="")
  ap.add_argument("--cases", default=",".join(CASES))
  ap.add_argument("--scan224", type=int, default=256, help="N of the 224 px scan")
  ap.add_argument("--scan64", type=int, default=25_000, help="N of the 64 px scan")
  ap.add_argument("--report", type=int, default=2_500, help="N of the report phase")
  ap.add_argument("--child", nargs=4, metavar=("MODEL", "SIZE", "N", "BATCH"),
                  help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.child:
    m, size, n, batch = args.child
    print(json.dumps(child_scan(m, int(size), int(n), int(batch))))
    return
  cases = args.cases.split(",")
  if not set(cases) <= set(CASES):
    ap.error(f"--cases has {sorted(set(cases) - set(CASES))}; allowed: {', '.join(CASES)}")
  sys.path.insert(0, ROOT)
  from zfnet_jax import rundir
  meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
          "machine": rundir.machine(), "versions": rundir.versions(),
          "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
          "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
          "measure": "peak resident set size of a fresh child process (ru_maxrss), MiB"}
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for case in cases:
      for mult in (1, 2):
        if case == "scan224":
          r = run_child(["ZFNet", "224", str(args.scan224 * mult), "64"])
          what = "atlas.scan, ZFNet 224 px, synthetic stream, batches of 64"
        elif case == "scan64":
          r = run_child(["quickstart", "64", str(args.scan64 * mult), "256"])
          what = "atlas.scan, the quickstart's ZFNetLowRes 64 px, batches of 256"
        else:
          r = report_case(args.report * mult, tmp)
          what = "--mode=report of a tiny trained workdir, report.max_examples"
        rows.append({"case": case, "what": what, **r})
        print(f"  {case:<8} {r['images']:>7,} images  peak RSS {r['peak_rss_mib']:8.1f} MiB"
              f"  ({r['seconds']:.0f} s)  {what}", flush=True)
      a, b = rows[-2]["peak_rss_mib"], rows[-1]["peak_rss_mib"]
      print(f"  {case:<8} 2N / N peak: {b / a:.3f} ({b - a:+.1f} MiB for "
            f"{rows[-1]['images'] - rows[-2]['images']:,} more images)", flush=True)
  meta["load_average_end"] = os.getloadavg()
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
