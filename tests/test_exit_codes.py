"""What a user's shell sees from ``python -m zfnet_jax.main``: exit codes and signals.

0 done; 1 a non-finite or diverging loss (the last good checkpoint kept); 2 bad input or a
full disk, in one line ``error: ...``; 75 SIGTERM, in every mode and during start-up, with
nothing half-written left.  Each runs the real command in a subprocess
(``helpers.start_main``, faults injected by its ``setup`` lines).
"""
import os
import shutil
import subprocess
import textwrap

import jax
import numpy as np
import pytest
from PIL import Image

from zfnet_jax.training import loop

import helpers

REPORT = "c.report.enabled = True\nc.analyses.enabled = False\n"


@pytest.fixture(scope="module")
def fm(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("fm"))
  helpers.make_fmnist(d, n_train=64, n_test=8)
  return d


@pytest.fixture(scope="module")
def finished(fm, tmp_path_factory):
  """A workdir with a finished 8-step run (no report)."""
  wd = str(tmp_path_factory.mktemp("finished"))
  loop.train_and_evaluate(helpers.reliability_config(fm, steps=8), wd,
                          devices=jax.devices()[:1])
  return wd


def main(tmp_path, fm, wd, *, setup="", overrides="", flags=(), name="run"):
  overrides = textwrap.dedent(overrides).strip("\n") + "\n"
  p = helpers.start_main(tmp_path, fm, wd, setup=setup, overrides=overrides, flags=flags,
                         name=name)
  out = p.communicate(timeout=300)[0]
  return p.returncode, out


def steps_on_disk(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def error_line(out):
  """The one ``error:`` line of a failed run (and no traceback)."""
  errors = [l for l in out.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in out, out[-3000:]
  return errors[0]


def test_bad_data_exits_2_in_one_line_before_anything_is_written(fm, tmp_path):
  wd = str(tmp_path / "wd")
  code, out = main(tmp_path, fm, wd, overrides="c.dataset.fashion_mnist_dir = '/no/such/dir'")
  assert code == 2, out[-3000:]
  assert "/no/such/dir" in error_line(out)
  assert not os.path.exists(os.path.join(wd, "checkpoints"))


@pytest.mark.slow   # a training run in a subprocess
def test_divergence_exits_1_and_keeps_the_last_good_checkpoint(fm, tmp_path):
  wd = str(tmp_path / "wd")
  code, out = main(tmp_path, fm, wd, overrides="""
      c.optimizer, c.learning_rate, c.weight_decay = "adam", 1e6, 0.0
      c.checkpoint_every_steps, c.max_loss, c.model.dropout_rate = 1, 1e4, 0.0
      """)
  assert code == 1, out[-3000:]
  assert error_line(out).startswith("error: training diverged at step 2")
  assert steps_on_disk(wd) == [1]
  assert not os.path.exists(os.path.join(wd, "results.json"))


@pytest.mark.slow   # three runs in subprocesses
@pytest.mark.parametrize("mode,module,name", [
    ("train", "loop", "prepare_run"),          # start-up: before the first step
    ("report", "report.pages", "render"),      # --mode=report on its own
    ("visualize", "visualize.pages", "render"),
])
def test_sigterm_in_each_mode_exits_75_and_leaves_nothing_half_written(
    fm, finished, tmp_path, mode, module, name):
  wd = str(tmp_path / "wd")
  shutil.copytree(finished, wd)
  before = sorted(os.listdir(wd))
  photo = str(tmp_path / "photo.png")
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40), np.uint8)).save(photo)
  flags = [f"--mode={mode}"] + ([f"--images={photo}"] if mode == "visualize" else [])
  code, out = main(tmp_path, fm, wd, setup=helpers.kill_in(module, name),
                   overrides=REPORT, flags=flags, name=mode)
  assert code == 75, out[-3000:]
  assert "SIGTERM" in out and "Traceback" not in out
  empty = lambda f: os.path.isdir(os.path.join(wd, f)) and not os.listdir(os.path.join(wd, f))
  after = sorted(f for f in os.listdir(wd) if f not in before and not empty(f))
  assert after == [] and set(before) <= set(os.listdir(wd))   # no page, no temporary left
  assert steps_on_disk(wd) == steps_on_disk(finished)


@pytest.mark.slow   # a training run in a subprocess
def test_a_real_full_disk_exits_2_in_one_line_and_keeps_the_last_checkpoint(fm, tmp_path):
  """A tmpfs too small for the run (root only: CI runs as root), not a simulated error."""
  if os.geteuid() != 0:
    pytest.skip("mounting a small tmpfs needs root")
  disk = tmp_path / "disk"
  disk.mkdir()
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(disk)], check=True)
  try:
    wd = str(disk / "wd")
    code, out = main(tmp_path, fm, wd, overrides="c.keep_checkpoints = 100\n")
    assert code == 2, out[-3000:]
    line = error_line(out)
    assert line.startswith("error: the disk is full (no space left on device writing "), line
    kept = steps_on_disk(wd)
    assert kept and f"the last good checkpoint, step {kept[-1]} in {wd}/checkpoints" in line
    assert max(kept) < helpers.RELIABILITY_STEPS
    restored = helpers.saved_state(os.path.join(wd, "checkpoints", str(kept[-1])))
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(restored["params"]))
  finally:
    subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.slow   # two runs in subprocesses
def test_verbosity_0_brings_back_the_libraries_logging(fm, tmp_path):
  quiet = main(tmp_path, fm, str(tmp_path / "quiet"), overrides="c.num_train_steps = 2",
               name="quiet")
  loud = main(tmp_path, fm, str(tmp_path / "loud"), overrides="c.num_train_steps = 2",
              flags=["--verbosity=0"], name="loud")
  assert quiet[0] == loud[0] == 0, (quiet[1][-2000:], loud[1][-2000:])
  info = lambda out: [l for l in out.splitlines() if l.startswith("I") and "orbax" in l.lower()]
  assert not info(quiet[1])
  assert info(loud[1]), loud[1][-3000:]
