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


# -- item 10: data that is not what it seems --------------------------------------------

def _jpeg_folder(root, classes=("cat", "dog"), n=5):
  """A folder dataset of random JPEGs; returns the path of one truncated file that PIL's
  verify() accepts (the first 60% of a good JPEG)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for cls in classes:
    os.makedirs(root / cls)
    for i in range(n):
      Image.fromarray(rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)).save(
          root / cls / f"{i}.jpg", quality=90)
  bad = root / classes[-1] / "truncated.jpg"
  data = (root / classes[-1] / "0.jpg").read_bytes()
  bad.write_bytes(data[:len(data) * 6 // 10])
  with Image.open(bad) as im:
    im.verify()                      # the trap: PIL's check passes
  return str(bad)


def _folder_config(root):
  c = helpers.small_config("", steps=2, batch=4)
  c.dataset.name, c.dataset.folder = "folder", str(root)
  c.dataset.eval_split, c.dataset.folder_eval_fraction = "validation", 0.2
  c.dataset.resize_size, c.dataset.crop_size = 16, 12
  return c


def test_truncated_jpeg_is_skipped_and_counted_or_named(tmp_path):
  bad = _jpeg_folder(tmp_path / "imgs")
  c = _folder_config(tmp_path / "imgs")
  info = ip.dataset_info(c)
  # 6 dog files (every 5th to eval): train 4 cats + 4 good dogs; the truncated one skipped.
  assert (info.num_train, info.num_eval) == (8, 2)
  assert ip._folder_split(c, "train")[3] == 1 and bad not in ip._folder_split(c, "train")[0]
  mean = ip.full_pixel_mean(c, str(tmp_path / "wd"))    # decoded every training image
  assert mean.shape == (16, 16, 3) and np.isfinite(mean).all()
  c.dataset.on_corrupt = "stop"
  with pytest.raises(ValueError, match=re.escape(bad) + ".*truncated"):
    ip.dataset_info(c)


def test_empty_class_folder_is_left_out_with_a_warning_or_an_error(tmp_path, caplog):
  _jpeg_folder(tmp_path / "imgs", classes=("cat", "dog", "emu"))
  os.makedirs(tmp_path / "imgs" / "bird")      # empty: not a class
  c = _folder_config(tmp_path / "imgs")
  info = ip.dataset_info(c)
  assert info.class_names == ("cat", "dog", "emu") and info.num_classes == 3
  assert any("bird" in r.getMessage() and "empty" in r.getMessage() for r in caplog.records)
  c.dataset.on_corrupt = "stop"
  with pytest.raises(ValueError, match=r"\['bird'\] hold no images"):
    ip.dataset_info(c)
