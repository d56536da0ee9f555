r"""Runs a sweep of training runs and tabulates their results.

  python launch/sweep.py --sweep=experiments/table3_sweep.py --root=workdirs/table3 --dry_run
  python launch/sweep.py --sweep=experiments/table3_sweep.py --root=workdirs/table3 \
      --parallel=2 --devices_per_run=4 -- --config.dataset.data_dir=$HOME/tensorflow_datasets

Every run gets its own workdir <root>/<name from its overrides>; arguments
after "--" are added to every command.  Finished runs (results.json present)
are skipped, so re-running the command resumes a sweep.  At the end every
results.json is collected into <root>/summary.csv and <root>/summary.md, and a
sweep file's own collect() (if any) writes its tables and pages.
Run from the repository root (config paths in sweep files are relative to it).
"""
import json
import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from zfnet_jax.render import content
from zfnet_jax.studies import sweeps

FLAGS = flags.FLAGS
flags.DEFINE_string("sweep", None, "Sweep file defining get_sweep() (file.py[:variant]).")
flags.DEFINE_string("root", None, "Directory holding one workdir per run.")
flags.DEFINE_integer("parallel", 1, "Runs at a time.")
flags.DEFINE_integer("devices_per_run", 0,
                     "If > 0, give each concurrent run its own CUDA_VISIBLE_DEVICES slice.")
flags.DEFINE_bool("dry_run", False, "Print the commands and stop.")
flags.DEFINE_bool("collect_only", False, "Only collect existing results.json files.")
flags.DEFINE_bool("rerun", False, "Run again even where results.json exists.")
flags.DEFINE_string("python", sys.executable, "Python interpreter of the runs.")
flags.mark_flags_as_required(["sweep", "root"])


def main(argv):
  runs, default_config = sweeps.load_sweep(FLAGS.sweep)
  planned = sweeps.expand(runs, FLAGS.root, default_config, argv[1:], FLAGS.python)
  if FLAGS.dry_run:
    for run in planned:
      print(sweeps.format_command(run["command"]))
    return
  status = None
  if not FLAGS.collect_only:
    os.makedirs(FLAGS.root, exist_ok=True)
    with open(os.path.join(FLAGS.root, "sweep.json"), "w") as f:
      json.dump([{k: run[k] for k in ("name", "workdir", "command")} for run in planned], f,
                indent=1, default=str)
    status = sweeps.execute(planned, FLAGS.parallel, FLAGS.devices_per_run, FLAGS.rerun)
  header, rows = sweeps.collect(planned, FLAGS.root, status)
  print(content.markdown_table(header, rows))
  print(f"Summary: {os.path.join(FLAGS.root, 'summary.csv')} and summary.md")
  hook = sweeps.collect_hook(FLAGS.sweep)
  if hook is not None:
    logging.set_verbosity(logging.ERROR)   # Orbax's notices while the hook reads checkpoints
    out = hook(planned, FLAGS.root, sweeps.format_command(["python", *sys.argv]))
    if out:
      print(f"Sweep report: {out}")
  failed = [r[0] for r in rows if r[-1] != "ok"]
  if failed:
    print(f"{len(failed)} run(s) without results: {', '.join(failed)}")
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
