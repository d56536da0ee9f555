r"""Command line: train and evaluate, then write the visual report.

  python -m zfnet_jax.main --config=experiments/quickstart.py --workdir=/tmp/qs
  python -m zfnet_jax.main --config=experiments/quickstart.py --workdir=/tmp/qs \
      --mode=report --config.report.rule=guided
  python -m zfnet_jax.main --config=experiments/quickstart.py --workdir=/tmp/qs \
      --mode=visualize --images=photos/ --config.pretrained=quickstart   # no training needed

Console: the plan, an estimate of the time left, one progress bar per long phase
(plain lines every 30 s when the output is not a terminal), warnings, and a summary
table with the report's path; ``--verbosity=0`` brings back the libraries' INFO
logging (Orbax, JAX).

Exit codes: 0 done; 1 crash (a bug: traceback) or non-finite loss; 2 bad input
(config, data, paths: a one-line ``error: ...``; --mode=visualize: also when any input
image was missing or unreadable, after the others were done); 75 stopped by SIGTERM after
saving a checkpoint (rerun the same command to resume).
"""
import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from zfnet_jax import conv

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the report.")
flags.DEFINE_enum("mode", "train", ["train", "report", "visualize", "summary"],
                  "train: train, evaluate, then write the report; report: rebuild the "
                  "report from the workdir's latest checkpoint; visualize: what the model "
                  "sees in --images (pages in <workdir>/visualize/); summary: print the model.")
flags.DEFINE_string("images", None, "--mode=visualize: an image file, a folder, a glob or a "
                    "comma-separated list of these (JPEG/PNG, any size, grey or colour).")
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


def _no_orbax_warnings(record) -> bool:
  """Orbax warns on every read-only restore ("Given directory is read only"): errors only."""
  return record.levelno >= std_logging.ERROR or f"{os.sep}orbax{os.sep}" not in record.pathname


def run(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:   # library chatter (Orbax, JAX) off by default
    logging.set_verbosity(logging.WARNING)
    logging.get_absl_logger().addFilter(_no_orbax_warnings)
  conv.configure_xla_cpu()   # before JAX starts (imported below)
  # pylint: disable=g-import-not-at-top
  from zfnet_jax import pipeline
  config = FLAGS.config
  if FLAGS.mode == "summary":
    print(pipeline.summary(config))
    return
  if FLAGS.workdir is None:
    raise app.UsageError("--workdir is required for --mode=train, report and visualize")
  if FLAGS.mode == "visualize":
    if not FLAGS.images:
      raise app.UsageError("--mode=visualize needs --images=PATH (a file, folder, glob or "
                           "comma-separated list)")
    from zfnet_jax import console, visualize
    batch = visualize.run(config, FLAGS.workdir, FLAGS.images)
    for page in batch.done.values():
      console.say(f"visualize: {page}")
    if batch.failed:
      raise ValueError(f"{len(batch.failed)} of {len(batch.failed) + len(batch.done)} inputs "
                       f"failed: {'; '.join(m for _, m in batch.failed)}")
    return
  out = pipeline.run(config, FLAGS.workdir, train_model=FLAGS.mode == "train",
                     write_report=config.report.enabled or FLAGS.mode == "report")
  if out.get("preempted"):
    sys.exit(pipeline.EXIT_PREEMPTED)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")     # TensorFlow's C++ INFO lines
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")   # its oneDNN notice (tf.data only here)
  app.run(main)
