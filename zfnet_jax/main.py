r"""Command line: train and evaluate, then write the visual report.

  python -m zfnet_jax.main --config=experiments/quickstart.py --workdir=/tmp/qs
  python -m zfnet_jax.main --config=experiments/quickstart.py --workdir=/tmp/qs \
      --mode=report --config.report.rule=guided
  python -m zfnet_jax.main --config=experiments/quickstart.py --workdir=/tmp/qs \
      --mode=visualize --images=photos/ --config.pretrained=quickstart   # no training needed
  python -m zfnet_jax.main --config=experiments/zfnet.py --workdir=/tmp/ens5 \
      --mode=ensemble --ensemble=/w/zf1,/w/zf2,/w/zf3,/w/zf4,/w/zf5   # Table 2: averaged softmax

Console: the plan, an estimate of the time left, one progress bar per long phase
(plain lines every 30 s when the output is not a terminal), warnings, and a summary
table with the report's path; ``--verbosity=0`` brings back the libraries' INFO
logging (Orbax, JAX).

Exit codes: 0 done; 1 crash (a bug: traceback), non-finite or diverging loss
(the last good checkpoint is kept); 2 bad input (config, data, paths), a workdir
in use by another training process, or a full disk (each a one-line
``error: ...``; after a full disk the last good checkpoint is kept: free space
and rerun); 75 stopped by SIGTERM, at any point (training: after saving a
checkpoint; evaluation or report: their work dropped, nothing half-written
left), rerun the same command to resume.
--mode=visualize also exits 2 when any input image was missing or unreadable, after
the others were done.  A process killed outright (SIGKILL, SIGABRT) loses only the steps
since the last checkpoint: the same command resumes and says from which step.

On a CPU everything runs on one JAX device; ``--config.cpu_host_devices=N`` splits it
into N (faster on some machines, but XLA's all-reduce between them can abort a run on a
loaded machine: ``zfnet_jax/conv.py``).
"""
import collections
import logging as std_logging
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from zfnet_jax import configs, conv

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


def _usage_error(msg: str):
  print(f"error: {msg}", file=sys.stderr, flush=True)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with bad flags as one line ``error: ...`` and exit 2.

  Before parsing: ``--config=NAME`` of a shipped experiment becomes its file, one that
  is neither a file nor such a name is refused with the names, and a
  ``--config.KEY`` given more than once is refused (absl would concatenate
  repeated tuple values).  While parsing: an unknown key and a value that does
  not parse as the key's type are named, with the expected type.
  """
  given = [m.group(2) for m in (re.match(r"^--?(no)?config\.([^=]+)", a) for a in argv[1:]) if m]
  repeated = [k for k, n in collections.Counter(given).items() if n > 1]
  if repeated:
    _usage_error(f"--config.{repeated[0]} is given {given.count(repeated[0])} times; give it "
                 f"once (a tuple as one value: --config.{repeated[0]}='(a, b, c)')")
  try:
    argv = configs.config_argv(argv)   # a shipped experiment's name stands for its file
  except ValueError as e:
    _usage_error(str(e))
  files = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
  try:
    return FLAGS(argv)
  except flags.Error as e:
    m = re.match(r"flag --([^=]+)=(.*?): (.*)", str(e), re.S)
    if m and m.group(1) == "config":   # absl hides why the file gave no config: say it
      path, _, variant = m.group(2).partition(":")
      try:
        configs.load_file(path).get_config(*([variant] if variant else []))
      except Exception as cause:  # pylint: disable=broad-except
        _usage_error(f"--config={m.group(2)}: {cause}")
    if m and m.group(1) in FLAGS:
      flag = FLAGS[m.group(1)]
      expected = getattr(flag.parser, "flag_type", lambda: "?")()
      _usage_error(f"--{m.group(1)}={m.group(2)}: expected {expected} (the type of "
                   f"{m.group(1)}), got {m.group(2)!r}")
    _usage_error(str(e).splitlines()[0] if str(e) else type(e).__name__)
  except (KeyError, AttributeError) as e:   # ml_collections: a key the config lacks
    name = str(e).strip("\"'")
    key = next((k for k in given if name in k.split(".")), name)
    _usage_error(f"--config.{key}: unknown config key {name!r} (not in the config "
                 f"{files[-1] if files else ''}; see --mode=summary or zfnet_jax/configs.py)")


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
  if not FLAGS["verbosity"].present:   # library chatter (Orbax, JAX) off by default
    logging.set_verbosity(logging.WARNING)
    logging.get_absl_logger().addFilter(_no_orbax_warnings)
  # A full disk: Orbax's threads and tasks each log the error with a traceback (through
  # absl's handler); the run says it once.
  logging.get_absl_handler().addFilter(
      lambda r: not any(t in r.getMessage() for t in ("No space left", "os_error_code='28'")))
  sys.excepthook = _quiet_closed_loop(sys.excepthook)
  config = FLAGS.config
  if config.cpu_host_devices != 1:   # before JAX starts (imported below); opt-in, at a risk
    n = conv.set_host_devices(config.cpu_host_devices)
    print(f"warning: cpu_host_devices={n}: the CPU is split into {n} JAX devices; on a "
          "loaded machine XLA's all-reduce between them can abort the run (rerun to resume "
          "from the last checkpoint); 1 is the safe default", file=sys.stderr, flush=True)
  try:   # pylint: disable=g-import-not-at-top
    from zfnet_jax import pipeline
  except ModuleNotFoundError as e:
    if e.name != "tensorflow":
      raise
    _usage_error("TensorFlow is not installed (tf.data and the TensorBoard logs need it): "
                 "pip install 'zfnet_jax[cpu]' (or tensorflow-cpu)")
  if FLAGS.mode == "summary":
    print(pipeline.summary(config))
    return
  if FLAGS.workdir is None:
    raise app.UsageError("--workdir is required for --mode=train, report, visualize and "
                         "ensemble")
  if FLAGS.mode == "ensemble":
    from zfnet_jax import console, train
    res = train.evaluate_ensemble(config, (FLAGS.ensemble or "").split(","), FLAGS.workdir)
    console.say(f"ensemble of {len(res['members'])} on {res['num_eval_examples']} images: top-1 "
                f"error {res['top1_error']:.4f}, top-5 error {res['top5_error']:.4f} -> "
                f"{os.path.join(FLAGS.workdir, train.ENSEMBLE_RESULTS)}")
    return
  if FLAGS.mode == "explore":
    from zfnet_jax import explore
    try:
      explore.require_gradio()
    except ImportError as e:
      _usage_error(str(e))
    explore.run(config, FLAGS.workdir, host=FLAGS.host, port=FLAGS.port)
    return
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
  app.run(main, flags_parser=parse_flags)
