"""The package outside the repository: configs by name, its files packaged, extras, the wheel."""
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
from packaging.requirements import Requirement

from zfnet_jax import configs
from zfnet_jax.analyses import correspondence

import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "zfnet_jax")
SHIPPED_NAMES = ("alexnet", "imagenette", "quickstart", "torchvision_alexnet", "vgg16", "zfnet")


def _requires(extra=None, platform="linux"):
  """zfnet_jax's installed requirements that apply with ``extra`` (None: the bare install)
  on ``platform`` (sys.platform)."""
  env = {"extra": extra or "", "sys_platform": platform}
  reqs = [Requirement(r) for r in importlib.metadata.requires("zfnet_jax")]
  return [r for r in reqs if r.marker is None or r.marker.evaluate(env)]


def test_experiment_names_resolve_to_the_shipped_files(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)   # outside the repository
  for name in SHIPPED_NAMES:
    path = os.path.join(PACKAGE, "experiments", f"{name}.py")
    assert configs.experiment_path(name) == path
    assert configs.experiment_path(f"experiments/{name}.py") == path
    assert configs.experiment_path(f"{name}.py:v") == path + ":v"
  with pytest.raises(ValueError, match=r"'nope' is neither a file nor a shipped experiment; "
                                       r"shipped: alexnet, .*quickstart"):
    configs.experiment_path("nope")
  with pytest.raises(ValueError, match=r"config file 'a/b\.py' does not exist"):
    configs.experiment_path("a/b.py")
  mine = tmp_path / "quickstart.py"   # a file of the user's wins over the shipped name
  mine.write_text("")
  assert configs.experiment_path("quickstart.py") == "quickstart.py"
  assert configs.experiment_path(str(mine) + ":x") == str(mine) + ":x"


def test_the_repositorys_experiments_are_the_packaged_ones():
  assert os.path.realpath(os.path.join(REPO, "experiments")) == \
      os.path.join(PACKAGE, "experiments")


def test_the_box_file_is_found_from_any_folder(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  doc = correspondence.load_boxes(configs.default_config().analyses.correspondence.boxes, 32, 32)
  assert doc["dataset"] == "fashion_mnist_idx" and len(doc["ids"]) >= 2
  assert set(doc["parts"]) == {"collar", "left sleeve", "right sleeve"}


def test_cli_takes_a_config_by_name_from_an_empty_folder(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, "-m", "zfnet_jax.main", "--config=quickstart",
                        "--mode=summary"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert re.search(r"total\s+523,274", out.stdout), out.stdout[-2000:]   # quickstart's size
  bad = subprocess.run([sys.executable, "-m", "zfnet_jax.main", "--config=quikstart",
                        "--workdir=w"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
  assert bad.returncode == 2
  assert [l for l in bad.stderr.splitlines() if l.startswith("error:")] == [
      "error: config 'quikstart' is neither a file nor a shipped experiment; shipped: "
      + ", ".join(configs.experiment_names())]
  assert not (tmp_path / "w").exists()


def test_extras_name_the_jax_they_install():
  """[cuda] and [tpu] ask for JAX's own extras; read through jax's metadata, they bring
  the CUDA 12 plugin and libtpu at jax's version.  TensorFlow comes with every platform
  extra as the CPU build, never with the bare install (which keeps the one that is there)."""
  base = {r.name for r in _requires()}
  assert "jax" in base and not base & {"tensorflow", "tensorflow-cpu"}
  jax_extra = {}
  for extra, want in (("cuda", "cuda12"), ("tpu", "tpu")):
    reqs = {r.name: r for r in _requires(extra)}
    assert reqs["jax"].extras == {want} and reqs["jax"].specifier.contains("0.10.0")
    assert "tensorflow-cpu" in reqs and "tensorflow" not in reqs
    jax_extra[extra] = [Requirement(r) for r in importlib.metadata.requires("jax")
                        if Requirement(r).marker and
                        Requirement(r).marker.evaluate({"extra": want})]
  version = importlib.metadata.version("jax")
  plugins = {r.name: r for r in jax_extra["cuda"]}
  assert plugins["jax-cuda12-plugin"].specifier.contains(version)
  assert plugins["jaxlib"].specifier.contains(version)
  assert "libtpu" in {r.name for r in jax_extra["tpu"]}
  cpu_linux = {r.name for r in _requires("cpu", "linux")}
  assert "tensorflow-cpu" in cpu_linux and "tensorflow" not in cpu_linux
  cpu_mac = {r.name for r in _requires("cpu", "darwin")}   # no tensorflow-cpu for macOS
  assert "tensorflow" in cpu_mac and "tensorflow-cpu" not in cpu_mac


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_visualizes_and_trains_from_an_empty_folder(tmp_path):
  wheel = helpers.build_wheel(tmp_path)
  names = zipfile.ZipFile(wheel).namelist()
  for name in SHIPPED_NAMES + ("correspondence_fashion_mnist",):
    assert any(n.startswith(f"zfnet_jax/experiments/{name}.") for n in names), name
  assert any(n.startswith("zfnet_jax/shipped/quickstart/") for n in names)
  assert any(n.startswith("zfnet_jax/render/templates/") for n in names)
  python, env = helpers.fresh_venv(tmp_path / "venv")
  subprocess.run([python, "-m", "pip", "install", "-q", wheel],   # its dependencies are there
                 check=True, env=env, capture_output=True, timeout=600)
  empty = tmp_path / "empty"
  empty.mkdir()
  where = subprocess.run([python, "-c", "import zfnet_jax, zfnet_jax.configs as c; "
                          "print(zfnet_jax.__file__); print(c.experiment_path('quickstart'))"],
                         cwd=empty, env=env, capture_output=True, text=True, check=True)
  venv = str(tmp_path / "venv")
  assert all(line.startswith(venv) for line in where.stdout.split()), where.stdout
  from sklearn.datasets import load_sample_images
  shutil.copy(load_sample_images().filenames[1], empty / "photo.jpg")   # flower.jpg
  run = subprocess.run([python, "-m", "zfnet_jax.main", "--config=quickstart", "--workdir=w",
                        "--mode=visualize", "--images=photo.jpg",
                        "--config.pretrained=quickstart"], cwd=empty, env=env,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
  page = empty / "w" / "visualize" / "photo" / "index.html"
  assert page.exists() and "conv5" in page.read_text()
  # Training and the report, by name, with the shipped box file; tiny settings.
  tiny = ["--config.model.conv_features=(4, 4, 4, 4, 4)", "--config.model.fc_features=8",
          "--config.num_train_steps=2", "--config.batch_size=8", "--config.ten_crop_eval=False",
          "--config.evolution_epochs=()", "--config.dataset.max_train_examples=64",
          "--config.dataset.max_eval_examples=128", "--config.analyses.num_images=1",
          "--config.analyses.occlusion.stride=16", "--config.analyses.correspondence.repeats=2",
          "--config.analyses.invariance.num_shifts=3", "--config.analyses.invariance.num_scales=2",
          "--config.analyses.invariance.rotation_step=120.0",
          "--config.analyses.diagnostics.train_comparison=False",
          "--config.analyses.evolution.tensorboard_every_steps=0",
          "--config.analyses.evolution.max_examples=16", "--config.transfer.in_report=True",
          "--config.transfer.folds=1",
          "--config.transfer.train_per_class=(10,)", "--config.transfer.scratch_steps=2"]
  if not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"):
    pytest.fail("Debian's dataset-fashion-mnist is not installed (launch/install.sh does it)")
  run = subprocess.run([python, "-m", "zfnet_jax.main", "--config=quickstart", "--workdir=t",
                        *tiny], cwd=empty, env=env, capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
  report = (empty / "t" / "report" / "index.html").read_text()
  assert "collar" in report and "transfer" in report.lower()


def test_without_tensorflow_the_command_line_says_what_to_install(tmp_path):
  code = ("import runpy, sys\n"
          "sys.modules['tensorflow'] = None   # import tensorflow: ModuleNotFoundError\n"
          "sys.argv = ['main', '--config=quickstart', '--workdir=w']\n"
          "runpy.run_module('zfnet_jax.main', run_name='__main__')\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
  assert out.returncode == 2, out.stderr[-3000:]
  assert [l for l in out.stderr.splitlines() if l.startswith("error:")] == [
      "error: TensorFlow is not installed (tf.data and the TensorBoard logs need it): pip "
      "install 'zfnet_jax[cpu]' (or tensorflow-cpu)"]
  assert "Traceback" not in out.stderr and not (tmp_path / "w").exists()


def test_an_unknown_variant_is_named_with_the_allowed_ones(tmp_path):
  out = subprocess.run([sys.executable, "-m", "zfnet_jax.main", "--config=zfnet:bogus",
                        "--mode=summary"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
  assert out.returncode == 2
  errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "unknown variant 'bogus' of experiments/zfnet.py; allowed: " \
      "'', 'fc2048'" in errors[0], out.stderr[-2000:]
