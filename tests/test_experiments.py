"""Every Table 2/3 config builds a model with the hand-computed parameter count."""
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import pytest

from zfnet_jax import job
from zfnet_jax.nn import models

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def hand_count(arch, conv, fc, removed, classes=1000):
  """Parameters from the paper's layer table, written out by hand.

  Kernels (k*k*in + 1) * out; at 224x224 both nets end conv5/pool5 at 6x6
  (ZFNet 110-55-26-13-13-13-13-6; AlexNet 55-27-27-13-13-13-13-6).
  """
  k1, k2 = (7, 5) if arch == "ZFNet" else (11, 5)
  kernels = [k1, k2, 3, 3, 3]
  names = ["conv1", "conv2", "conv3", "conv4", "conv5"]
  total, cin = 0, 3
  for name, k, cout in zip(names, kernels, conv):
    if name in removed:
      continue
    total += (k * k * cin + 1) * cout
    cin = cout
  fin = 6 * 6 * cin
  for name in ("fc6", "fc7"):
    if name in removed:
      continue
    total += (fin + 1) * fc
    fin = fc
  return total + (fin + 1) * classes


def test_default_zfnet_matches_paper_count():
  assert hand_count("ZFNet", (96, 256, 384, 384, 256), 4096, ()) == 62_357_608


CASES = [("zfnet", v) for v in load("zfnet").VARIANTS] + [("alexnet", v) for v in load("alexnet").VARIANTS]


@pytest.mark.parametrize("file,variant", CASES)
def test_variant_parameter_count(file, variant):
  module = load(file)
  config = module.get_config(variant)
  model = models.from_config(config.model, 1000)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
  got = models.count_params(shapes["params"])
  expected = hand_count(config.model.name, tuple(config.model.conv_features),
                        config.model.fc_features, tuple(config.model.removed))
  assert got == expected
  # The docstring states the paper's numbers of every variant that has them.
  paper = module.VARIANTS[variant][1]
  if paper is not None:
    assert " / ".join(f"{x:.1f}" for x in paper) in module.__doc__


def test_variants_change_what_they_say():
  z = load("zfnet")
  assert tuple(z.get_config("conv512").model.conv_features) == (96, 256, 512, 1024, 512)
  assert z.get_config("fc2048").model.fc_features == 2048
  assert tuple(load("alexnet").get_config("no_conv34_fc67").model.removed) == (
      "conv3", "conv4", "fc6", "fc7")
  assert z.get_config().model.name == "ZFNet" and z.get_config().model.fc_features == 4096


@pytest.mark.parametrize("file", ["zfnet", "alexnet"])
def test_unknown_variant_lists_allowed(file):
  with pytest.raises(ValueError, match=r"unknown variant 'nope'.*allowed:.*fc8192"):
    load(file).get_config("nope")


def test_imagenette_config_is_full_size_zfnet_with_the_papers_recipe():
  import tensorflow_datasets as tfds
  c = load("imagenette").get_config()
  assert (c.model.name, c.dataset.name, c.dataset.crop_size) == (
      "ZFNet", "imagenette/320px-v2", 224)
  assert (c.optimizer, c.momentum, c.learning_rate, c.batch_size) == ("sgd", 0.9, 1e-2, 128)
  assert (c.clip_filters, c.clip_radius, c.model.dropout_rate) == (True, 0.1, 0.5)
  assert tfds.builder(c.dataset.name).info.features["label"].num_classes == 10
  model = models.from_config(c.model, 10)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 224, 224, 3))))
  assert models.count_params(shapes["params"]) == hand_count("ZFNet", (96, 256, 384, 384, 256),
                                                             4096, (), classes=10)
  # The header's FLOP count: 1.16 G multiply-adds per 224 px image, layer by layer.
  macs = (110 * 110 * 96 * 7 * 7 * 3 + 26 * 26 * 256 * 5 * 5 * 96 + 13 * 13 * 384 * 9 * 256
          + 13 * 13 * 384 * 9 * 384 + 13 * 13 * 256 * 9 * 384 + 9216 * 4096 + 4096 * 4096
          + 4096 * 10)
  assert f"{2 * macs / 1e9:.2f} GFLOPs" in load("imagenette").__doc__


@pytest.mark.slow
def test_imagenette_config_trains_and_reports_on_mock_data(tmp_path):
  """experiments/imagenette.py with narrow widths and sizes overridden trains two steps
  on TFDS mock data (nothing downloads) and writes a report with the atlas, the
  evolution and the occlusion sections (ZFNet at 224 px on CPU: ~1-3 min)."""
  import os

  import tensorflow_datasets as tfds
  c = load("imagenette").get_config()
  c.model.conv_features, c.model.fc_features = (8, 8, 8, 8, 8), 8
  c.dataset.shuffle_buffer, c.dataset.prefetch = 8, 0
  c.dataset.max_eval_examples = 4
  c.batch_size, c.eval_batch_size, c.num_train_steps = 4, 4, 2
  c.ten_crop_eval = False
  c.evolution_epochs = (0.5, 1)
  c.report.update(dict(layers=("conv1", "conv5"), num_maps=2, top_k=2, batch_size=4))
  c.analyses.num_images = 1
  c.analyses.evolution.update(dict(layers=("conv1",), max_examples=4))
  c.analyses.occlusion.update(dict(size=56, stride=56))
  for name in ("invariance", "walkthrough", "diagnostics"):
    c.analyses[name].enabled = False
  with tfds.testing.mock_data(num_examples=8):
    out = job.run(c, str(tmp_path / "run"))
  assert out["results"]["steps"] == 2
  html = open(out["report"]).read()
  for anchor in ("layer-conv1", "layer-conv5", "evolution", "occlusion"):
    assert f'id="{anchor}"' in html, anchor
  report_dir = os.path.dirname(out["report"])
  assert any(f.startswith("atlas_conv1") for f in os.listdir(report_dir))


@pytest.mark.parametrize("file,variant", CASES)
def test_paper_configs_train_with_the_papers_momentum(file, variant):
  c = load(file).get_config(variant)
  assert (c.optimizer, c.momentum, c.momentum_form) == ("sgd", 0.9, "paper")


def test_a_run_saved_before_the_option_resumes_in_pytorchs_form():
  """config.json written before momentum_form existed: those runs used PyTorch's form, so
  resuming one under the paper's (another optimiser state) is a change check_resume sees."""
  from zfnet_jax import configs
  old = json.loads(load("zfnet").get_config().to_json_best_effort())
  del old["momentum_form"]
  assert configs.from_saved(old).momentum_form == "pytorch"
  assert configs.from_saved({**old, "momentum_form": "paper"}).momentum_form == "paper"
