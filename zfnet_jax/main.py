r"""Command line: train and evaluate, then write the visual report.

  python -m zfnet_jax.main --config=experiments/quickstart.py --workdir=/tmp/qs
  python -m zfnet_jax.main --config=experiments/quickstart.py --workdir=/tmp/qs \
      --mode=report --config.report.rule=guided

Exit codes: 0 done; 1 crash (a bug: traceback) or non-finite loss; 2 bad input
(config, data, paths: a one-line ``error: ...``); 75 stopped by SIGTERM after
saving a checkpoint (rerun the same command to resume).
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

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
    _main(argv)
  except (ValueError, OSError) as e:   # bad config, data or paths: no traceback
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  except FloatingPointError as e:      # non-finite loss: the last good checkpoint is kept
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  if FLAGS.mode == "summary":
    from zfnet_jax import models
    from zfnet_jax import input_pipeline
    try:
      info = input_pipeline.dataset_info(config)
      num_classes, channels = info.num_classes, info.channels
    except (ValueError, OSError):  # data not prepared here: the paper's ImageNet head
      num_classes, channels = 1000, 3
      print(f"({config.dataset.name} is not available: 1000 classes, 3 channels)")
    print(models.summary(models.from_config(config.model, num_classes),
                         config.dataset.crop_size, channels))
    return
  if FLAGS.workdir is None:
    raise app.UsageError("--workdir is required for --mode=train and --mode=report")
  from zfnet_jax import report, train
  train.validate_config(config)
  if FLAGS.mode == "train":
    if train.train_and_evaluate(config, FLAGS.workdir).get("preempted"):
      sys.exit(train.EXIT_PREEMPTED)
  if config.report.enabled or FLAGS.mode == "report":
    path = report.write_report(config, FLAGS.workdir)
    logging.info("report: %s", path)
    print(f"Report written to {path}")


if __name__ == "__main__":
  app.run(main)
