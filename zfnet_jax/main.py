r"""Command line: train and evaluate, then write the visual report.

  python -m zfnet_jax.main --config=experiments/quickstart.py --workdir=/tmp/qs
  python -m zfnet_jax.main --config=experiments/quickstart.py --workdir=/tmp/qs \
      --mode=report --config.report.rule=guided

Console: progress lines and warnings; ``--verbosity=0`` brings back the
libraries' INFO logging (Orbax, JAX).

Exit codes: 0 done; 1 crash (a bug: traceback), non-finite or diverging loss
(the last good checkpoint is kept); 2 bad input (config, data, paths), a workdir
in use by another training process, or a full disk (each a one-line
``error: ...``; after a full disk the last good checkpoint is kept: free space
and rerun); 75 stopped by SIGTERM, at any point (training: after saving a
checkpoint; evaluation or report: their work dropped, nothing half-written
left), rerun the same command to resume.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from zfnet_jax import conv

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the report.")
flags.DEFINE_enum("mode", "train", ["train", "report", "summary"],
                  "train: train, evaluate, then write the report; report: rebuild the "
                  "report from the workdir's latest checkpoint; summary: print the model.")
config_flags.DEFINE_config_file("config", None, "Experiment configuration file.",
                                lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv):
  try:
    run(argv)
  except (ValueError, OSError) as e:   # bad config, data or paths: no traceback
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  except FloatingPointError as e:      # non-finite loss: the last good checkpoint is kept
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


def _quiet_closed_loop(hook):
  """sys.excepthook without the "Event loop is closed" that TensorStore's callbacks
  print once Orbax has given up a save (after a full disk)."""
  def quiet(kind, value, tb):
    if not (kind is RuntimeError and str(value) == "Event loop is closed"):
      hook(kind, value, tb)
  return quiet


def run(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:   # library INFO chatter (Orbax, JAX) off by default
    logging.set_verbosity(logging.WARNING)
  # A full disk: Orbax's threads and tasks each log the error with a traceback (through
  # absl's handler); the run says it once.
  logging.get_absl_handler().addFilter(
      lambda r: not any(t in r.getMessage() for t in ("No space left", "os_error_code='28'")))
  sys.excepthook = _quiet_closed_loop(sys.excepthook)
  conv.configure_xla_cpu()   # before JAX starts (imported below)
  # pylint: disable=g-import-not-at-top
  from zfnet_jax import pipeline
  config = FLAGS.config
  if FLAGS.mode == "summary":
    print(pipeline.summary(config))
    return
  if FLAGS.workdir is None:
    raise app.UsageError("--workdir is required for --mode=train and --mode=report")
  out = pipeline.run(config, FLAGS.workdir, train_model=FLAGS.mode == "train",
                     write_report=config.report.enabled or FLAGS.mode == "report")
  if out.get("preempted"):
    sys.exit(pipeline.EXIT_PREEMPTED)
  if out.get("report"):
    logging.info("report: %s", out["report"])
    print(f"Report written to {out['report']}")


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main)
