"""Reliability II (issue 21, items 2, 3, 5, 9, 10): bad flags, a shortened quickstart,
the report's checkpoint fallback, non-finite checkpoints, a changed config on resume,
checkpoint format versions, truncated JPEGs and empty class folders.

Training runs in-process on one CPU device (a tiny ZFNetLowRes on random
Fashion-MNIST-format files, 8 steps); the CLI runs as a subprocess.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from zfnet_jax import checkpoints, input_pipeline as ip, rundir, train

import helpers

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


def cli(*args, timeout=300):
  """``python -m zfnet_jax.main *args`` -> (exit code, stdout + stderr)."""
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  p = subprocess.run([sys.executable, "-m", "zfnet_jax.main", *args], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=timeout)
  return p.returncode, p.stdout + p.stderr


def error_lines(out):
  return [line for line in out.splitlines() if line.startswith("error:")]


# -- item 9: bad flags ----------------------------------------------------------------

@pytest.mark.parametrize("flags,want", [
    (["--config.nosuchkey=1"], "--config.nosuchkey: unknown config key 'nosuchkey'"),
    (["--config.model.nosuch=1"], "--config.model.nosuch: unknown config key 'nosuch'"),
    (["--config.batch_size=abc"], "--config.batch_size=abc: expected int"),
    (["--config.num_epochs=ten"], "--config.num_epochs=ten: expected float"),
    (["--config.model.conv_features=(4,8,8,8,8)", "--config.model.conv_features=(8,8)"],
     "--config.model.conv_features is given 2 times"),
    (["--config.model.conv_features=(4,8,8,8,8,8,8)"],     # the usual check, in summary too
     "model.conv_features=(4, 8, 8, 8, 8, 8, 8); allowed: 5 positive ints"),
])
def test_bad_flags_exit_2_with_one_line_naming_the_key(flags, want, tmp_path):
  rc, out = cli("--config=experiments/quickstart.py", "--mode=summary", *flags)
  assert rc == 2, out[-3000:]
  assert len(error_lines(out)) == 1 and want in error_lines(out)[0], out[-3000:]
  assert "Traceback" not in out and "FATAL" not in out


def test_missing_config_file_is_named(tmp_path):
  missing = str(tmp_path / "no_such_config.py")
  rc, out = cli(f"--config={missing}", f"--workdir={tmp_path / 'wd'}")
  assert rc == 2, out[-3000:]
  assert error_lines(out) == [f"error: config file {missing!r} does not exist"]
  assert not os.path.exists(tmp_path / "wd")


@pytest.mark.parametrize("num_epochs,kept,dropped", [
    (3.0, (0.25, 0.5, 1, 2), (5, 10)),
    (0.3, (0.25,), (0.5, 1, 2, 5, 10)),
])
def test_shortened_quickstart_drops_evolution_epochs_beyond_the_run(num_epochs, kept, dropped,
                                                                    capsys):
  sys.path.insert(0, os.path.join(REPO, "experiments"))
  try:
    import quickstart  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  c = quickstart.get_config()
  c.num_epochs = num_epochs
  per_epoch = 469                                     # 60000 / 128, rounded up
  num_steps = train.total_steps(c, per_epoch)
  out = train.evolution_steps(c, per_epoch, num_steps)
  # Each kept epoch e at step round(e * 469) (by hand: 117, 234, 469, 938).
  assert sorted(out) == [round(e * per_epoch) for e in kept]
  notice = [l for l in capsys.readouterr().out.splitlines() if "evolution epochs" in l]
  assert len(notice) == 1 and str(list(dropped)) in notice[0]
