"""--mode=visualize: your own images, bad inputs, unique folders, arrays.npz against
independent references, the page in a real browser; the shipped quickstart weights."""
import configparser
import glob
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from zfnet_jax import configs, deconv, job, xla
from zfnet_jax.analyses import occlusion
from zfnet_jax.data import iterators, preprocessing, sources
from zfnet_jax.nn import models
from zfnet_jax.render import pages
from zfnet_jax.report import visualize
from zfnet_jax.training import weights

import helpers

S = 64
PAYLOAD = "<script>alert(1)</script>"
PHOTOS = load_sample_images().filenames          # china.jpg, flower.jpg (427x640 RGB)
REPO = pathlib.Path(__file__).resolve().parents[1]
FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="module")
def tiny():
  """A random-weight grey ZFNetLowRes and its preprocessing (64 px, mean 120)."""
  model = models.ZFNetLowRes(num_classes=3, conv_features=(4, 6, 8, 8, 6), fc_features=8)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, S, S, 1)))
  prep = preprocessing.Preprocessing(S, S, 1, np.full((S, S, 1), 120.0, np.float32))
  return model, variables, prep


def _bad_files(d):
  d = pathlib.Path(d)
  d.mkdir(parents=True, exist_ok=True)
  (d / "notes.jpg").write_text("not an image")
  data = open(PHOTOS[0], "rb").read()
  (d / "cut.jpg").write_bytes(data[:len(data) // 2])            # truncated JPEG
  (d / "empty").mkdir(exist_ok=True)
  return {"missing": str(d / "missing.png"), "not an image": str(d / "notes.jpg"),
          "corrupt": str(d / "cut.jpg"), "empty folder": str(d / "empty"),
          "no match": str(d / "nothing-*.png")}


def test_output_folder_names_are_unique():
  names = visualize.output_names(["x/a.jpg", "x/a.png", "x/b.jpg", "y/b.jpg", "c d!.png",
                                  np.zeros((4, 4)), "z/a.png"])
  assert names == ["a-jpg", "a-png", "b", "b-2", "c_d", "image-5", "a-png-2"]
  assert len(set(names)) == len(names)


def test_bad_inputs_are_reported_and_the_others_still_done(tiny, tmp_path):
  model, variables, prep = tiny
  bad = _bad_files(tmp_path / "in")
  good = str(tmp_path / "in" / "ok.png")
  Image.fromarray(np.full((80, 70, 3), 200, np.uint8)).save(good)
  spec = ",".join([bad["missing"], good, bad["not an image"], bad["corrupt"],
                   bad["empty folder"], bad["no match"]])
  out = tmp_path / "out"
  batch = visualize.images(model, variables, spec, str(out), preprocessing=prep,
                           layers=["conv1"], num_maps=2, occlusion_settings=None,
                           progress=False)
  assert list(batch.done) == [good]
  assert os.path.isfile(out / "ok" / "index.html") and os.path.isfile(out / "ok" / "arrays.npz")
  messages = dict(batch.failed)
  assert set(messages) == set(bad.values())
  for what, path in bad.items():
    msg = messages[path]
    assert msg.startswith(path) and "\n" not in msg, msg
  assert "no such file" in messages[bad["missing"]]
  assert "not an image" in messages[bad["not an image"]]
  assert "corrupt or truncated" in messages[bad["corrupt"]]
  assert "no image files" in messages[bad["empty folder"]]
  assert "no file matches" in messages[bad["no match"]]
  # Nothing readable at all: one error naming the input, before any work.
  with pytest.raises(ValueError, match="no readable image.*missing.png: no such file"):
    visualize.images(model, variables, bad["missing"], str(out), preprocessing=prep,
                     progress=False)
  with pytest.raises(ValueError, match="'conv9'.*allowed"):   # options before reading
    visualize.images(model, variables, good, str(out), preprocessing=prep, layers=["conv9"])
  with pytest.raises(ValueError, match="num_maps"):
    visualize.images(model, variables, good, str(out), preprocessing=prep, num_maps=0)


def test_arrays_equal_independent_references(tiny, tmp_path, capsys):
  model, variables, prep = tiny
  small = tmp_path / "small.png"
  Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 30), np.uint8)).save(small)
  batch = visualize.images(model, variables, [PHOTOS[0], str(small)], str(tmp_path / "v"),
                           preprocessing=prep, class_names=["a", "b", "c"],
                           layers=["conv1", "conv2", "conv5"], num_maps=3, progress=False,
                           occlusion_settings=occlusion.Settings(16, 8, -1.0, "conv2", 64))
  assert f"{small}: 30x20 px is smaller than the model's 64 px: upscaled" in capsys.readouterr().out
  assert set(batch.done) == {PHOTOS[0], str(small)} and not batch.failed
  z = np.load(tmp_path / "v" / "china" / "arrays.npz")
  x = z["input"][None]
  np.testing.assert_allclose(x[0], prep(preprocessing.read_image(PHOTOS[0], 1)), atol=1e-5)
  # The forward pass compiled as the package compiles its own (the same CPU kernels).
  feats = xla.jit(lambda v, a: model.apply(v, a, method="features"))(variables, jnp.asarray(x))
  logits = np.asarray(feats["logits"][0], np.float64)
  p = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
  np.testing.assert_allclose(z["probabilities"], p, rtol=1e-5, atol=1e-9)
  assert list(z["top_classes"]) == list(np.argsort(-p)[:3])
  steps, acts, _ = helpers.np_forward(variables["params"], x[0], helpers.LOWRES_GEOMETRY)
  for layer in ("conv1", "conv2", "conv5"):
    act = np.asarray(feats[layer][0])
    # The strongest maps, by a plain loop over maps.
    best = sorted(range(act.shape[-1]), key=lambda c: (-act[..., c].max(), c))[:3]
    assert list(z[f"{layer}/channels"]) == best
    for k, c in enumerate(best):
      i, j = np.unravel_index(np.argmax(act[..., c]), act.shape[:2])
      assert tuple(z[f"{layer}/positions"][k]) == (i, j)
      assert z[f"{layer}/values"][k] == pytest.approx(act[i, j, c])
      np.testing.assert_allclose(z[f"{layer}/activations"][k], act[..., c], rtol=1e-5, atol=1e-5)
      # The projection, by the NumPy loops of the deconvnet (float64).
      ref = helpers.np_project(steps, acts, layer, int(c), (int(i), int(j)), "deconvnet")
      np.testing.assert_allclose(z[f"{layer}/projections"][k], ref, rtol=1e-4,
                                 atol=1e-5 * np.abs(ref).max())
      # The patch is the display image under the unit's receptive field (clipped crop).
      crop = deconv.receptive_patch(model, z["display"][None], layer, (i, j), clip=True)[0]
      t = z[f"{layer}/patches"].shape[1]
      r0, r1, c0, c1 = z[f"{layer}/windows"][k]
      assert crop.shape[:2] == (r1 - r0, c1 - c0)
      assert any(np.array_equal(z[f"{layer}/patches"][k][a:a + crop.shape[0], b:b + crop.shape[1]],
                                crop) for a in (0, t - crop.shape[0]) for b in (0, t - crop.shape[1]))
  for key in ("occlusion/prob_true", "occlusion/activation", "occlusion/top_class"):
    assert z[key].shape == (8, 8)        # 64 px, stride 8
  assert int(z["occlusion/label"]) == int(z["top_classes"][0])
  # Occluding nothing of the image is the image: the unoccluded numbers are the forward pass'.
  assert float(z["occlusion/prob_true0"]) == pytest.approx(p[int(z["top_classes"][0])], rel=1e-5)


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(helpers.CHROMIUM), reason="needs /usr/bin/chromium")
def test_page_is_escaped_and_loads_every_image_in_a_real_browser(tiny, tmp_path):
  model, variables, prep = tiny
  odd = tmp_path / "in" / "<b>&x.png"
  odd.parent.mkdir()
  Image.open(PHOTOS[1]).resize((90, 60)).save(odd)
  batch = visualize.images(model, variables, [PHOTOS[1], str(odd)], str(tmp_path / "v"),
                           preprocessing=prep, class_names=[PAYLOAD, "b", "c"],
                           layers=["conv1", "conv3"], num_maps=2, progress=False)
  page = batch.done[PHOTOS[1]]
  text = open(page, encoding="utf-8").read()
  assert PAYLOAD not in text and "&lt;script&gt;" in text
  assert "default-src 'none'" in text and 'content="no-referrer"' in text
  seen = helpers.browser_check(os.path.dirname(page), tmp_path, "check.html")
  assert seen["alerts"] == [] and seen["scripts"] == 1
  files = sorted(os.path.basename(f) for f in glob.glob(os.path.join(os.path.dirname(page),
                                                                      "*.png")))
  assert sorted(src for src, _ in seen["images"]) == files and len(files) == 1 + 2 * 2 + 1
  assert all(w > 0 for _, w in seen["images"]), seen["images"]
  assert {"prediction", "layer-conv1", "layer-conv3", "occlusion"} <= set(seen["sections"])


def test_templates_and_shipped_weights_are_package_data():
  cfg = configparser.ConfigParser()
  cfg.read(REPO / "setup.cfg")
  patterns = cfg["options.package_data"]["zfnet_jax"].split()
  pkg = REPO / "zfnet_jax"
  for sub in ("templates", "shipped"):
    for f in (p for p in (pkg / sub).rglob("*") if p.is_file()):
      rel = f.relative_to(pkg).as_posix()
      assert any(pathlib.PurePosixPath(rel).match(p) for p in patterns), rel
  assert "Jinja2" in cfg["options"]["install_requires"]
  with pytest.raises(ValueError, match="figure path '../x.png'"):
    pages.src("../x.png")


def test_shipped_quickstart_loads_and_classifies():
  config = configs.default_config()
  config.pretrained = "quickstart"
  loaded = weights.load_model(config, None)
  assert type(loaded.model).__name__ == "ZFNetLowRes" and loaded.pixel_mean.shape == (32, 32, 1)
  assert loaded.class_names[9] == "Ankle boot"
  prep = preprocessing.preprocessing(loaded.config, loaded.pixel_mean)
  if helpers.available(os.path.join(FMNIST, "t10k-images-idx3-ubyte.gz"),
                       "Fashion-MNIST (dataset-fashion-mnist)"):
    images = sources.read_idx(os.path.join(FMNIST, "t10k-images-idx3-ubyte.gz"))[:64]
    labels = sources.read_idx(os.path.join(FMNIST, "t10k-labels-idx1-ubyte.gz"))[:64]
  else:   # no dataset on this machine: shapes only
    images, labels = np.random.default_rng(0).integers(0, 256, (8, 28, 28), np.uint8), None
  x = np.stack([prep(im) for im in images])
  logits = np.asarray(loaded.model.apply(loaded.variables, jnp.asarray(x)))
  assert logits.shape == (len(images), 10) and np.isfinite(logits).all()
  if labels is not None:
    assert (logits.argmax(1) == labels).mean() >= 0.85   # 0.911 measured on all 10,000
  config.pretrained = "nonesuch"
  with pytest.raises(ValueError, match="pretrained='nonesuch'.*quickstart"):
    weights.load_model(config, None)


@pytest.mark.slow
def test_ship_weights_round_trip(tiny_workdir, tmp_path):
  out = tmp_path / "shipped"
  r = subprocess.run([sys.executable, str(REPO / "launch" / "ship_weights.py"), tiny_workdir,
                      str(out)], capture_output=True, text=True, check=False,
                     env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert r.returncode == 0, r.stderr[-2000:]
  _, variables, _ = weights.load_trained(tiny_workdir)
  config = configs.default_config()
  config.pretrained = str(out)
  loaded = weights.load_model(config, None)
  jax.tree.map(np.testing.assert_array_equal, loaded.variables, jax.device_get(variables))
  np.testing.assert_array_equal(
      loaded.pixel_mean, iterators.pixel_mean(loaded.config, tiny_workdir))


def _main(*args, cwd):
  return subprocess.run([sys.executable, "-m", "zfnet_jax.main", *args], capture_output=True,
                        text=True, check=False, cwd=cwd, timeout=600,
                        env=dict(os.environ, PYTHONPATH=str(REPO)))


@pytest.mark.slow
def test_cli_visualize_on_two_photographs_with_a_trained_model(tiny_workdir, tmp_path):
  """--mode=visualize on scikit-learn's photographs with the tiny trained run, one bad file."""
  _, variables, config = weights.load_trained(tiny_workdir)
  work = tmp_path / "run"
  shutil.copytree(tiny_workdir, work)
  (tmp_path / "in").mkdir()
  for f in PHOTOS:
    shutil.copy(f, tmp_path / "in")
  Image.open(PHOTOS[0]).save(tmp_path / "whole.png")
  data = (tmp_path / "whole.png").read_bytes()
  (tmp_path / "in" / "broken.png").write_bytes(data[:len(data) // 2])   # cut short
  r = _main("--config=" + str(REPO / "experiments" / "quickstart.py"), f"--workdir={work}",
            "--mode=visualize", f"--images={tmp_path / 'in'}", "--config.visualize.num_maps=4",
            "--config.analyses.occlusion.stride=8", cwd=tmp_path)
  assert r.returncode == 2, r.stderr[-3000:]
  assert f"{tmp_path / 'in' / 'broken.png'}: corrupt or truncated" in r.stderr
  assert "1 of 3 inputs failed" in r.stderr
  assert config.model.name == "ZFNetLowRes"       # the NumPy reference's network
  for name in ("china", "flower"):
    folder = work / "visualize" / name
    z = np.load(folder / "arrays.npz")
    steps, acts, _ = helpers.np_forward(variables["params"], z["input"],
                                        helpers.LOWRES_GEOMETRY)
    for layer in ("conv2", "conv5"):
      c, pos = int(z[f"{layer}/channels"][0]), tuple(int(v) for v in z[f"{layer}/positions"][0])
      ref = helpers.np_project(steps, acts, layer, c, pos, "deconvnet")
      np.testing.assert_allclose(z[f"{layer}/projections"][0], ref, rtol=1e-4,
                                 atol=1e-5 * np.abs(ref).max())
    if helpers.available(helpers.CHROMIUM, "Chromium"):
      seen = helpers.browser_check(str(folder), tmp_path, f"check-{name}.html")
      assert seen["alerts"] == [] and len(seen["images"]) == 1 + 2 * 5 + 1
      assert all(w > 0 for _, w in seen["images"]), seen["images"]
  assert not (work / "visualize" / "broken").exists()


@pytest.mark.slow
def test_cli_visualize_with_the_shipped_weights_needs_no_training(tmp_path):
  work = tmp_path / "fresh"
  r = _main("--config=" + str(REPO / "experiments" / "quickstart.py"), f"--workdir={work}",
            "--mode=visualize", f"--images={PHOTOS[1]}", "--config.pretrained=quickstart",
            "--config.visualize.occlusion=False", cwd=tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  z = np.load(work / "visualize" / "flower" / "arrays.npz")
  assert z["probabilities"].shape == (10,) and abs(float(z["probabilities"].sum()) - 1) < 1e-5
  assert os.listdir(work) == ["visualize"]          # no checkpoints, nothing trained


def test_report_with_the_shipped_weights_on_a_fresh_workdir(tmp_path):
  from zfnet_jax.report import report
  helpers.make_fmnist(tmp_path / "fmnist", n_train=40, n_test=20)
  config = helpers.fmnist_config(tmp_path / "fmnist", resize=32, crop=32)  # as shipped
  config.pretrained = "quickstart"
  config.report.update(dict(layers=("conv1", "conv2"), num_maps=2, max_examples=-1,
                            batch_size=16, chunk_size=16))
  work = str(tmp_path / "fresh")
  with pytest.raises(ValueError, match="pretrained='quickstart' is for --mode=report"):
    job.run(config, work, train_model=True)
  path = report.write_report(config, work, registry=[e for e in report.REGISTRY
                                                     if e.name in report.CORE])
  text = open(path, encoding="utf-8").read()
  assert 'id="layer-conv1"' in text and 'id="layer-conv2"' in text and "Ankle boot" in text
  # The model's own pixel mean, not one recomputed from these (random) images.
  np.testing.assert_array_equal(np.load(os.path.join(work, "pixel_mean.npy")),
                                np.load(os.path.join(weights.SHIPPED, "quickstart",
                                                     "pixel_mean.npy")))
  config.dataset.crop_size = 16
  with pytest.raises(ValueError, match="takes 32x32x1 images; the dataset gives 16x16x1"):
    job.validate_report(config)
