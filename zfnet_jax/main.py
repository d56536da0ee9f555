r"""Command line: train and evaluate, then write the visual report (``job.run_mode``).

  python -m zfnet_jax.main --config=quickstart --workdir=/tmp/qs
  python -m zfnet_jax.main --config=quickstart --workdir=/tmp/qs --mode=report
  python -m zfnet_jax.main --config=quickstart --workdir=/tmp/qs --mode=visualize \
      --images=photos/ --config.pretrained=quickstart   # no training needed
  python -m zfnet_jax.main --config=zfnet --workdir=/tmp/ens5 --mode=ensemble \
      --ensemble=/w/zf1,/w/zf2,/w/zf3   # Table 2: averaged softmax

Exit codes: 0 done; 1 a crash (traceback) or a non-finite loss (the last good
checkpoint is kept); 2 bad input, a workdir in use or a full disk (one line
``error: ...``); 75 stopped by SIGTERM (rerun the same command to resume).
``--verbosity=0`` brings back the libraries' INFO logging.  On a CPU everything runs
on one JAX device; ``--config.cpu_host_devices=N`` splits it, at a risk (``xla``).
"""
import sys

from absl import app, flags
from ml_collections import config_flags

from zfnet_jax import configs, xla

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the report.")
flags.DEFINE_enum("mode", "train", ["train", "report", "visualize", "summary", "ensemble",
                                    "explore"],
                  "train: train, evaluate, then write the report; report: rebuild the "
                  "report from the workdir's latest checkpoint; visualize: what the model "
                  "sees in --images (pages in <workdir>/visualize/); summary: print the model; "
                  "ensemble: evaluate the --ensemble runs' averaged softmax on the config's "
                  "eval split (<workdir>/ensemble_results.json); explore: the interactive "
                  "deconvnet explorer in the browser (--host, --port).")
flags.DEFINE_string("host", "127.0.0.1", "--mode=explore: the address to listen on.")
flags.DEFINE_integer("port", 7860, "--mode=explore: the port to listen on.")
flags.DEFINE_string("ensemble", None, "--mode=ensemble: comma-separated workdirs of finished "
                    "training runs (at least 2).")
flags.DEFINE_string("images", None, "--mode=visualize: an image file, a folder, a glob or a "
                    "comma-separated list of these (JPEG/PNG, any size, grey or colour).")
config_flags.DEFINE_config_file("config", None, "Experiment configuration file.",
                                lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  if config.cpu_host_devices != 1:   # before JAX starts: opt-in, at a risk
    n = xla.set_host_devices(config.cpu_host_devices)
    print(f"warning: cpu_host_devices={n}: the CPU is split into {n} JAX devices; on a "
          "loaded machine XLA's all-reduce between them can abort the run (rerun to resume "
          "from the last checkpoint); 1 is the safe default", file=sys.stderr, flush=True)
  try:
    from zfnet_jax import console, job  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as e:
    if e.name != "tensorflow":
      raise
    print("error: TensorFlow is not installed (tf.data and the TensorBoard logs need it): "
          "pip install 'zfnet_jax[cpu]' (or tensorflow-cpu)", file=sys.stderr, flush=True)
    sys.exit(2)
  console.quiet_libraries(verbose=FLAGS["verbosity"].present)
  sys.exit(job.run_mode(FLAGS.mode, config, FLAGS.workdir, images=FLAGS.images,
                        members=FLAGS.ensemble, host=FLAGS.host, port=FLAGS.port))


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: configs.parse_flags(FLAGS, argv))
