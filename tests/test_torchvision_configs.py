"""experiments/torchvision_alexnet.py and vgg16.py: imported weights (``config.pretrained``
a .safetensors state dict) in --mode=visualize and --mode=report without training; the
preprocessing keys (dataset.pixel_scale, mean, std); flat folders of unlabelled images."""
import importlib.util
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from zfnet_jax import configs, job
from zfnet_jax.data import iterators, sources
from zfnet_jax.nn import convert, torchvision
from zfnet_jax.training import loop
from zfnet_jax.training import weights as weights_lib

import helpers

REPO = pathlib.Path(__file__).resolve().parents[1]
PHOTOS = load_sample_images().filenames          # china.jpg, flower.jpg (427x640 RGB)
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
# torchvision's alexnet() state dict, written out by hand (not from our code).
ALEXNET = {"features.0": (64, 3, 11, 11), "features.3": (192, 64, 5, 5),
           "features.6": (384, 192, 3, 3), "features.8": (256, 384, 3, 3),
           "features.10": (256, 256, 3, 3), "classifier.1": (4096, 256 * 6 * 6),
           "classifier.4": (4096, 4096), "classifier.6": (1000, 4096)}
SMALL = ("--config.dataset.resize_size=112", "--config.dataset.crop_size=99")  # CPU-sized


def experiment(name):
  spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """A random-weight torchvision AlexNet as .safetensors (He-scaled: activations live)."""
  st = pytest.importorskip("safetensors.numpy")
  rng = np.random.default_rng(0)
  state = {}
  for key, shape in ALEXNET.items():
    fan_in = int(np.prod(shape[1:]))
    state[f"{key}.weight"] = (rng.standard_normal(shape) * np.sqrt(2 / fan_in)).astype(np.float32)
    state[f"{key}.bias"] = (0.1 * rng.standard_normal(shape[0])).astype(np.float32)
  path = tmp_path_factory.mktemp("weights") / "alexnet.safetensors"
  st.save_file(state, str(path))
  return str(path)


def _main(*args, cwd):
  return subprocess.run([sys.executable, "-m", "zfnet_jax.main", *args], capture_output=True,
                        text=True, check=False, cwd=cwd, timeout=600,
                        env=dict(os.environ, PYTHONPATH=str(REPO)))


def _torch_alexnet(weights_file):
  """torchvision's AlexNet (written out, torch_nets) with the file's weights, eval mode,
  its ReLUs the deconvnet's (forward max(x, 0); backward relu(R))."""
  torch = pytest.importorskip("torch")
  import torch_nets
  from safetensors.numpy import load_file
  net = torch_nets.TorchAlexNet(relu=torch_nets.DeconvReLUModule)
  net.load_state_dict({k: torch.from_numpy(v) for k, v in load_file(weights_file).items()})
  return net.eval()


def _torch_deconvnet(net, x_nhwc, layer, channel, position):
  """(H, W, 3) deconvnet projection of one unit of ``net`` by torch autograd: max-pool
  goes down through torch's own switches, from a one-hot holding the unit's value;
  x is torchvision's normalised input (1, H, W, 3)."""
  import torch
  import torch_nets
  xt = torch.tensor(np.asarray(x_nhwc, np.float32).transpose(0, 3, 1, 2), requires_grad=True)
  seq, idx = torch_nets.ALEXNET_OUTPUTS[layer]
  act = getattr(net, seq)[:idx + 1](xt)
  ct = torch.zeros_like(act)
  ct[0, channel, position[0], position[1]] = act[0, channel, position[0], position[1]].detach()
  assert float(ct.abs().max()) > 0
  (grad,) = torch.autograd.grad(act, xt, ct)
  return grad[0].permute(1, 2, 0).numpy()


def torchvision_input(pixels_minus_mean):
  """Our model input (0..255 pixels minus 255 * MEAN) -> torchvision's (x/255 - mean)/std."""
  return ((pixels_minus_mean + 255 * MEAN) / 255 - MEAN) / STD


def test_configs_keep_torchvisions_preprocessing_and_name_real_layers():
  for name, model in (("torchvision_alexnet", torchvision.TorchvisionAlexNet),
                      ("vgg16", torchvision.VGG16)):
    c = experiment(name)
    d = c.dataset
    assert (d.resize_size, d.crop_size, d.pixel_scale) == (256, 224, 1 / 255)
    np.testing.assert_allclose(d.mean, MEAN)
    np.testing.assert_allclose(d.std, STD)
    assert torchvision.IMPORTED[c.model.name] is model
    names = {s.name for s in model().layer_table(224)}
    assert set(c.report.layers) <= names and c.analyses.occlusion.layer in names


def test_imported_mean_and_scale_fold_into_conv1(weights):
  """Any pixel_scale/mean/std: the loaded model on pixels - mean/scale gives the
  unfolded model's logits on (pixels * scale - mean) / std."""
  c = experiment("torchvision_alexnet")
  c.pretrained = weights
  c.dataset.update(dict(resize_size=80, crop_size=67, pixel_scale=0.5, mean=(10., 20., 30.),
                        std=(4., 5., 6.)))
  loaded = weights_lib.load_model(c, None)
  assert loaded.class_names[0].startswith("tench") and len(loaded.class_names) == 1000
  np.testing.assert_allclose(loaded.pixel_mean, np.broadcast_to([20., 40., 60.], (67, 67, 3)))
  assert loaded.full_pixel_mean.shape == (80, 80, 3)
  pixels = np.random.default_rng(1).uniform(0, 255, (2, 67, 67, 3)).astype(np.float32)
  raw_model, raw = convert.from_torchvision(weights, "alexnet")
  want = raw_model.apply(raw, jnp.asarray((pixels * 0.5 - [10., 20., 30.]) / [4., 5., 6.],
                                          jnp.float32))
  got = loaded.model.apply(loaded.variables, jnp.asarray(pixels - loaded.pixel_mean))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


def test_bad_preprocessing_keys_and_training_are_refused(weights, tmp_path):
  c = experiment("torchvision_alexnet")
  c.pretrained = weights
  c.dataset.std = (0.2, 0.2)
  with pytest.raises(ValueError, match=r"dataset.std=\(0.2, 0.2\).*3 values"):
    weights_lib.load_model(c, None)
  c.dataset.std = STD.tolist()
  c.dataset.pixel_scale = 0.0
  with pytest.raises(ValueError, match="dataset.pixel_scale=0.0; allowed: > 0"):
    weights_lib.load_model(c, None)
  c = experiment("torchvision_alexnet")
  c.pretrained, c.model.name = weights, "ZFNet"
  with pytest.raises(ValueError, match="model.name must be one of TorchvisionAlexNet, VGG16, "
                                       "got 'ZFNet'"):
    weights_lib.load_model(c, None)
  c = configs.default_config()
  c.pretrained, c.dataset.mean = "quickstart", (1., 2., 3.)
  with pytest.raises(ValueError, match="are for imported weights"):
    weights_lib.load_model(c, None)
  with pytest.raises(ValueError, match="dataset.mean and dataset.std are for imported"):
    loop.validate(c)
  with pytest.raises(ValueError, match="model.name='VGG16' takes imported weights"):
    loop.validate(experiment("vgg16"))
  c = experiment("vgg16")
  c.pretrained = str(tmp_path / "missing.pth")
  with pytest.raises(ValueError, match="missing.pth'?: no such weights file"):
    job.validate_report(c)


def _folder(root, layout):
  """Write JPEG crops of the sample photos: layout {relative path: (photo index, offset)}."""
  for rel, (i, off) in layout.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.open(PHOTOS[i]).crop((off, off, off + 300, off + 250)).save(path)
  return root


def test_flat_folder_is_one_unlabelled_class_in_every_split(tmp_path):
  root = _folder(tmp_path / "flat", {f"{k}.jpg": (k % 2, 40 * k) for k in range(5)})
  (root / "notes.txt").write_text("not an image")
  c = configs.default_config()
  c.dataset.update(dict(name="folder", folder=str(root), resize_size=40, crop_size=32))
  info = sources.dataset_info(c)
  assert info.class_names == ("unlabelled",) and (info.num_train, info.num_eval) == (5, 5)
  batch = next(iterators.create_eval_iterator(c, None, batch_size=8))
  assert batch["mask"].sum() == 5 and set(batch["label"][:5]) == {0}
  one = _folder(tmp_path / "one", {"cat/a.jpg": (0, 0)})     # one class sub-folder: not flat
  c.dataset.folder = str(one)
  with pytest.raises(ValueError, match="1 class sub-folder"):
    sources.dataset_info(c)


@pytest.mark.slow
def test_cli_visualize_two_photographs_with_imported_alexnet(weights, tmp_path):
  """--mode=visualize with experiments/torchvision_alexnet.py and a weights file, no training:
  both pages, ImageNet class names, and arrays.npz equal to torchvision's unfolded network
  on normalised input, run by torch (an independent route to the same numbers)."""
  torch = pytest.importorskip("torch")
  work = tmp_path / "w"
  r = _main(f"--config={REPO / 'experiments' / 'torchvision_alexnet.py'}",
            f"--config.pretrained={weights}", f"--workdir={work}", "--mode=visualize",
            f"--images={','.join(PHOTOS)}", "--config.visualize.num_maps=2",
            "--config.visualize.layers=('conv2','conv5')", "--config.analyses.occlusion.stride=16",
            *SMALL, cwd=tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  assert sorted(os.listdir(work)) == ["visualize"]            # nothing trained or saved
  net = _torch_alexnet(weights)
  names = convert.imagenet_class_names()
  for name in ("china", "flower"):
    folder = work / "visualize" / name
    z = np.load(folder / "arrays.npz")
    # The figures undo the preprocessing: display = (input + 255 * mean) / 255.
    np.testing.assert_allclose(z["display"], np.clip((z["input"] + 255 * MEAN) / 255, 0, 1),
                               atol=1e-5)
    x = np.asarray(torchvision_input(z["input"][None]), np.float32)
    with torch.no_grad():
      logits = net(torch.from_numpy(x.transpose(0, 3, 1, 2)))[0].numpy().astype(np.float64)
    p = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(z["probabilities"], p, rtol=1e-4, atol=1e-7)
    assert names[int(np.argmax(p))] in (folder / "index.html").read_text(encoding="utf-8")
    for layer in ("conv2", "conv5"):
      for k in range(2):
        c = int(z[f"{layer}/channels"][k])
        pos = tuple(int(v) for v in z[f"{layer}/positions"][k])
        ref = _torch_deconvnet(net, x, layer, c, pos)
        # d/d(pixels) = d/d(normalised input) / (255 std): the folded conv1's chain rule.
        ref = ref / (255 * STD)
        np.testing.assert_allclose(z[f"{layer}/projections"][k], ref, rtol=1e-4,
                                   atol=1e-5 * float(np.abs(ref).max()))
    # The page in a real browser: every picture loads (Chromium is installed in CI).
    seen = helpers.browser_check(str(folder), tmp_path, f"check-{name}.html")
    pngs = sorted(f.name for f in folder.glob("*.png"))
    assert seen["alerts"] == [] and sorted(src for src, _ in seen["images"]) == pngs
    assert pngs and all(w > 0 for _, w in seen["images"]), seen["images"]


@pytest.mark.slow
def test_cli_report_over_a_folder_with_imported_alexnet(weights, tmp_path):
  """--mode=report over a flat folder (a labelled one reads the same way once its split
  is made: test_input_pipeline): the atlas and occlusion, images labelled by the model's
  top class (the folder's classes are not ImageNet's), named by ImageNet's names."""
  files = {f"{k}.jpg": (k % 2, 60 * (k // 2)) for k in range(6)}
  root = _folder(tmp_path / "photos", files)
  work = tmp_path / "w"
  r = _main(f"--config={REPO / 'experiments' / 'torchvision_alexnet.py'}",
            f"--config.pretrained={weights}", f"--workdir={work}", "--mode=report",
            "--config.dataset.name=folder", f"--config.dataset.folder={root}",
            "--config.dataset.folder_eval_fraction=0.34", "--config.report.max_examples=6",
            "--config.report.num_maps=2", "--config.report.top_k=2",
            "--config.report.layers=('conv1','conv5')", "--config.report.batch_size=8",
            "--config.analyses.num_images=1", "--config.analyses.occlusion.stride=16",
            "--config.analyses.invariance.enabled=False",
            "--config.analyses.diagnostics.enabled=False",
            "--config.analyses.walkthrough.enabled=False", *SMALL, cwd=tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "images are labelled with the model's top class" in r.stdout + r.stderr
  text = (work / "report" / "index.html").read_text(encoding="utf-8")
  assert 'id="layer-conv1"' in text and 'id="layer-conv5"' in text
  np.testing.assert_allclose(np.load(work / "pixel_mean.npy")[0, 0], 255 * MEAN, rtol=1e-6)
  # The analysed image (the first of the eval split): its top class by the unfolded model.
  c = experiment("torchvision_alexnet")
  c.dataset.update(dict(name="folder", folder=str(root), folder_eval_fraction=0.34,
                        resize_size=112, crop_size=99))
  image = iterators.load_examples(c, str(work), num=1)[0]
  raw_model, raw = convert.from_torchvision(weights, "alexnet")
  top = int(np.argmax(raw_model.apply(raw, jnp.asarray(torchvision_input(image),
                                                        jnp.float32))[0]))
  name = convert.imagenet_class_names()[top]
  assert f"true class {name}" in text.replace("&#39;", "'"), name
