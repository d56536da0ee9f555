"""Legibility of the atlas projections of trained runs (``zfnet_jax.analyses.legibility``).

  python benchmarks/legibility.py --run before=/tmp/qs_old --run after=/tmp/qs \
      [--rules deconvnet,guided] [--layers conv1,...,conv5] [--max_examples 10000]
      [--json docs/results/legibility.json] [--images docs/images]

For each run (a trained workdir: latest checkpoint, its own config; or a folder of
shipped weights) and rule:
the top-9 units of every map of each layer over the first ``max_examples``
evaluation images (``atlas.build``, all maps), their projections and
receptive-field patches, and the legibility per layer: mean match of each
projection's edge map with its patch's edge map, the mismatched-patch baseline,
and the score (match - baseline).  Writes the numbers, with machine, date,
command and package versions, to ``--json``; with ``--images``, a Fig. 2 tile
(the first 4 maps shown by the report, deconvnet) per run and layer:
``legibility_<run>_<layer>.png``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from zfnet_jax import rundir
from zfnet_jax.analyses import atlas
from zfnet_jax.analyses import legibility as legibility_lib
from zfnet_jax.data import iterators
from zfnet_jax.render import figures
from zfnet_jax.training import weights


def _load(workdir: str):
  """(model, variables, config): a run's newest checkpoint, or shipped weights (a folder
  with params.npz, e.g. zfnet_jax/shipped/quickstart)."""
  if os.path.exists(os.path.join(workdir, weights.PARAMS)):
    model, variables, config, _, _ = weights.load_shipped(workdir)
    return model, variables, config
  return weights.load_trained(workdir)


def measure(workdir: str, rules, layers, max_examples: int, image_prefix: str | None):
  model, variables, config = _load(workdir)
  mean = iterators.pixel_mean(config, workdir)
  batches = lambda: iterators.create_eval_iterator(
      config, workdir, batch_size=256, max_examples=max_examples)
  out = {}
  for rule in rules:
    t0 = time.time()
    maps, _ = atlas.build(model, variables, batches(), mean, layers=layers, k=9, num_maps=-1,
                          rule=rule, seed=config.seed, progress=False)
    out[rule] = {l: atlas.legibility(a, mean.shape[0]).as_dict() for l, a in maps.items()}
    print(f"{workdir} {rule} ({time.time() - t0:.0f} s):", flush=True)
    for l, d in out[rule].items():
      print(f"  {l}: {d}", flush=True)
    if image_prefix and rule == "deconvnet":
      for n, l in enumerate(layers):
        a = maps[l]
        shown = atlas.choose_maps(len(a.channels), config.report.num_maps, config.seed + n)[:4]
        img = figures.atlas_panel(a.projections[shown], a.patches[shown], a.channels[shown])
        figures.save_png(img, f"{image_prefix}_{l}.png")
  return {"workdir": workdir, "results": rundir.read_json(rundir.path(workdir, rundir.RESULTS)),
          "optimizer": config.optimizer, "learning_rate": config.learning_rate,
          "weight_decay": config.weight_decay, "num_epochs": config.num_epochs,
          "legibility": out}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--run", action="append", required=True, help="label=workdir")
  ap.add_argument("--rules", default="deconvnet,guided")
  ap.add_argument("--layers", default="conv1,conv2,conv3,conv4,conv5")
  ap.add_argument("--max_examples", type=int, default=10_000)
  ap.add_argument("--json", default="")
  ap.add_argument("--images", default="")
  args = ap.parse_args(argv)
  runs = dict(r.split("=", 1) for r in args.run)
  record = {"machine": rundir.machine(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
            "versions": rundir.versions(),
            "measure": legibility_lib.__doc__.strip().split("\n\n")[1].replace("\n", " "),
            "runs": {}}
  for label, wd in runs.items():
    prefix = os.path.join(args.images, f"legibility_{label}") if args.images else None
    record["runs"][label] = measure(wd, args.rules.split(","), args.layers.split(","),
                                    args.max_examples, prefix)
  if args.json:
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    rundir.write_json(args.json, record)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
