"""Bad input fails fast with an error that names the bad value (issue 8, section 3).

Covered elsewhere (not repeated here): unknown layer / channel / position / rule
in deconv (test_deconv.test_bad_arguments), atlas (test_atlas), report
(test_report), occlusion, invariance, correspondence, evolution, diagnostics
(their tests); a folder with one class or corrupt files, missing ImageNet
tarballs, a missing or truncated Fashion-MNIST file (test_input_pipeline); a
restore path that does not exist and a batch that does not divide over the devices
(test_train); bad flags, a changed config on resume (test_reliability3).
"""
import gzip
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zfnet_jax import configs, deconv
from zfnet_jax.data import sources
from zfnet_jax.nn import models
from zfnet_jax.report import report
from zfnet_jax.training import loop

from helpers import make_fmnist, small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(*flags):
  """Run ``python -m zfnet_jax.main --config=experiments/quickstart.py *flags``."""
  p = subprocess.run([sys.executable, "-m", "zfnet_jax.main",
                      "--config=experiments/quickstart.py", *flags],
                     cwd=REPO, capture_output=True, text=True, timeout=300)
  return p.returncode, p.stdout + p.stderr


@pytest.mark.parametrize("flag,names", [
    ("--config.nonexistent=1", "nonexistent"),          # unknown key (locked config)
    ("--config.batch_size=lots", "lots"),               # wrong type
])
def test_main_rejects_unknown_keys_and_wrong_types_at_once(flag, names, tmp_path):
  rc, out = main(flag, f"--workdir={tmp_path / 'wd'}")
  assert rc != 0 and names in out
  assert not os.path.exists(tmp_path / "wd")


def test_main_prints_one_line_error_and_exits_2(tmp_path):
  rc, out = main("--config.dataset.crop_size=-3", f"--workdir={tmp_path / 'wd'}")
  assert rc == 2, out[-2000:]
  assert "error: need 1 <= dataset.crop_size <= dataset.resize_size, got crop_size=-3" in out
  assert "Traceback" not in out
  assert not os.path.exists(tmp_path / "wd")


@pytest.mark.parametrize("field,value,names", [
    ("model.conv_features", (4, -8, 8, 8, 8), "-8"),
    ("model.fc_features", 0, "model.fc_features=0"),
    ("model.removed", ("conv2",), "conv2"),
    ("model.name", "VGG", "'VGG'"),
    ("model.dropout_rate", 1.5, "1.5"),
    ("dataset.crop_size", 300, "crop_size=300"),
    ("dataset.on_corrupt", "ignore", "'ignore'"),
    ("batch_size", -4, "batch_size=-4"),
    ("learning_rate", -0.1, "learning_rate=-0.1"),
    ("num_epochs", 0.0, "num_epochs=0.0"),
    ("checkpoint_every_steps", 0, "checkpoint_every_steps=0"),
    ("schedule", "linear", "'linear'"),
    ("optimizer", "lion", "'lion'"),
    ("evolution_epochs", (1, -2), "-2"),
    ("report.rule", "lrp", "'lrp'"),
])
def test_impossible_config_values(field, value, names):
  c = configs.default_config()
  *parents, leaf = field.split(".")
  node = c
  for p in parents:
    node = node[p]
  node[leaf] = value
  validate = ((lambda config: report.validate(config, None, None))   # the rule: checked first
              if field.startswith("report.") else (lambda config: loop.validate(config, 4)))
  with pytest.raises(ValueError, match=r".*".join(map(__import__("re").escape, [names]))):
    validate(c)


@pytest.mark.parametrize("radius", [0.0, -0.1])
def test_clip_radius_must_be_positive_when_clipping(radius):
  """radius <= 0 with clipping on would zero (or flip) every conv filter: refused, naming
  the value; with clip_filters=False the radius is not used and not checked."""
  c = configs.default_config()
  c.clip_radius = radius
  with pytest.raises(ValueError, match=f"clip_radius={radius!r} with clip_filters=True; "
                                       "allowed: a positive number"):
    loop.validate(c)
  c.clip_filters = False
  loop.validate(c)


def test_batch_must_divide_over_devices():
  c = configs.default_config()
  c.batch_size = 30
  with pytest.raises(ValueError, match="batch_size=30 does not divide by the 4 devices"):
    loop.validate(c, 4)
  loop.validate(c, 2)


def _tiny():
  model = models.ZFNetLowRes(num_classes=3, conv_features=(4, 4, 4, 4, 4), fc_features=8)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)))
  x = jnp.asarray(np.random.default_rng(0).normal(0, 50, (2, 32, 32, 1)), jnp.float32)
  return model, variables, x


@pytest.mark.parametrize("make,names", [
    (lambda x: x[0], r"\(32, 32, 1\)"),                              # no batch axis
    (lambda x: jnp.concatenate([x] * 3, axis=-1), "3 channels.*takes 1"),
    (lambda x: jnp.zeros((2, 96, 96, 1)), "96x96"),                 # not the trained size
    (lambda x: x.astype(jnp.int32), "int32"),
    (lambda x: x * 100, r"values up to \d.*\+-255"),                 # unnormalised
    (lambda x: x.at[0, 3, 4, 0].set(jnp.nan), "NaN"),
])
def test_images_that_do_not_fit_the_model(make, names):
  model, variables, x = _tiny()
  bad = make(x)
  for fn in (lambda: deconv.project(model, variables, bad, layer="conv1", channel=0),
             lambda: deconv.project_many(model, variables, bad[:1] if bad.ndim == 4 else bad,
                                         layer="conv1", channels=[0]),
             lambda: deconv.switches(model, variables, bad)):
    with pytest.raises(ValueError, match=names):
      fn()
  deconv.project(model, variables, x, layer="conv1", channel=0)   # the good ones pass


def test_empty_or_missing_folder_dataset(tmp_path):
  c = configs.default_config()
  c.dataset.name = "folder"
  c.dataset.folder = str(tmp_path / "empty")
  os.makedirs(c.dataset.folder)
  sources._folder_files.cache_clear()
  with pytest.raises(ValueError, match=r"has 0 class sub-folder\(s\).*need at least 2"):
    sources.dataset_info(c)
  c.dataset.folder = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    sources.dataset_info(c)


def test_failed_runs_leave_a_workdir_the_next_run_can_use(tmp_path):
  good, bad = str(tmp_path / "fm"), str(tmp_path / "fm_bad")
  make_fmnist(good, n_train=16, n_test=8)
  make_fmnist(bad, n_train=16, n_test=8)
  path = os.path.join(bad, sources.FASHION_MNIST_FILES["train"][0])
  with gzip.open(path) as f:
    data = f.read()
  with gzip.open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  sources._fashion_mnist.cache_clear()
  wd = str(tmp_path / "wd")
  one = jax.devices()[:1]
  with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz is truncated"):
    loop.train_and_evaluate(small_config(bad, steps=2), wd, devices=one)
  c = small_config(good, steps=2)
  c.restore_path = str(tmp_path / "no_such_run")
  with pytest.raises(FileNotFoundError, match="no_such_run"):
    loop.train_and_evaluate(c, wd, devices=one)
  res = loop.train_and_evaluate(small_config(good, steps=2), wd, devices=one)
  assert res["steps"] == 2 and res["num_eval_examples"] == 8
  # A workdir that cannot be created (here: under a file) is named.
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(PermissionError, match="file/wd.*not writable"):
    loop.train_and_evaluate(small_config(good, steps=2), str(blocker / "wd"), devices=one)
