"""Test set-up: 4 fake CPU devices (set before JAX is imported), no GPU, no downloads."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TFDS_DISABLE_GCS", "1")

import pytest  # noqa: E402

from helpers import make_fmnist, tiny_config  # noqa: E402


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  """In CI (CI=true) a skipped test is a failure: a missing Chromium, nbclient or other
  test dependency must not pass silently."""
  del item, call
  outcome = yield
  report = outcome.get_result()
  if os.environ.get("CI", "").lower() in ("1", "true") and report.skipped and \
      not getattr(report, "wasxfail", None):
    report.outcome = "failed"
    report.longrepr = f"skipped in CI, where every test must run: {report.longrepr}"


def pytest_collection_modifyitems(config, items):
  """Under mutmut (benchmarks/mutation.py) a mutant's tests run fastest first, by the
  durations mutmut measured: with -x, a killed mutant stops at its first failing test."""
  del config
  if "__mutmut_" not in os.environ.get("MUTANT_UNDER_TEST", ""):
    return
  import json  # pylint: disable=import-outside-toplevel
  try:
    with open("mutmut-stats.json", encoding="utf-8") as f:     # mutmut runs in mutants/
      seconds = json.load(f)["duration_by_test"]
  except (OSError, ValueError, KeyError):
    return
  items.sort(key=lambda item: seconds.get(item.nodeid, float("inf")))


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
  """Path of a workdir with a finished tiny run: checkpoints at epochs 1, 2, 3, results.json,
  and the Fig. 4 TensorBoard panels of the pipeline's training hooks."""
  from zfnet_jax import job
  from zfnet_jax.training import loop
  config = tiny_config()
  if not os.path.exists(os.path.join(config.dataset.fashion_mnist_dir,
                                     "train-images-idx3-ubyte.gz")):
    # No Debian package here: random IDX files (tests never download).
    d = str(tmp_path_factory.mktemp("fmnist"))
    make_fmnist(d, n_train=1024, n_test=256)
    config.dataset.fashion_mnist_dir = d
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  loop.train_and_evaluate(config, workdir, hooks=job.training_hooks(config, workdir))
  return workdir
