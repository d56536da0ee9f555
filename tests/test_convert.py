"""torchvision weights in our models (zfnet_jax.nn.convert) against PyTorch itself.

The reference networks are written here with torchvision's exact module layout
(``features`` / ``avgpool`` / ``classifier`` Sequentials, so the state-dict keys
are torchvision's ``features.0.weight`` .. ``classifier.6.bias``): torchvision
itself may not import beside the CPU build of torch.  Weights are random, made
in the test; nothing is downloaded.
"""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zfnet_jax import deconv
from zfnet_jax.nn import convert, layers, models, torchvision

torch = pytest.importorskip("torch")

from torch_nets import (ALEXNET_OUTPUTS, DeconvReLUModule, TorchAlexNet, TorchVGG,  # noqa: E402
                        vgg16_outputs)


def randomise(net, seed):
  """He-scaled weights and non-zero biases, so every layer carries signal."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in net.named_parameters():
      if name.endswith("weight"):
        fan_in = int(np.prod(p.shape[1:]))
        p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
      else:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
  return net.eval()


def torch_outputs(net, x_nchw, names):
  """{our name: NHWC numpy output} of every named module, plus logits."""
  got = {}
  hooks = [getattr(net, seq)[i].register_forward_hook(
      lambda m, a, out, name=name: got.__setitem__(name, out.detach().clone()))
      for name, (seq, i) in names.items()]
  with torch.no_grad():
    logits = net(x_nchw)
  for h in hooks:
    h.remove()
  out = {k: (v.permute(0, 2, 3, 1) if v.ndim == 4 else v).numpy() for k, v in got.items()}
  out["logits"] = logits.numpy()
  return out


def images(n, size, seed):
  """Pixels in [0, 1] normalised as torchvision's transforms do: NCHW torch, NHWC numpy."""
  rng = np.random.default_rng(seed)
  x = rng.random((n, size, size, 3), dtype=np.float32)
  x = (x - np.float32(convert.TORCHVISION_MEAN)) / np.float32(convert.TORCHVISION_STD)
  return torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), x


def assert_close(got, want, what, rtol=1e-4):
  """|got - want| <= rtol * max|want| (relative to the layer's scale)."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  scale = float(np.abs(want).max())
  assert scale > 0, f"{what}: degenerate (all zero)"
  err = float(np.abs(got - want).max())
  assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol} * {scale:.3g}"


def compare(arch, net, names, sizes, imported, seed=0):
  model, variables = imported[arch]
  feats = jax.jit(lambda v, x: model.apply(v, x, method="features"))
  for size in sizes:
    xt, x = images(2, size, seed + size)
    want = torch_outputs(net, xt, names)
    got = feats(variables, jnp.asarray(x))
    assert set(got) == set(names) | {"logits"}
    for name in want:
      assert_close(got[name], want[name], f"{arch} {size}px {name}")
    assert_close(model.apply(variables, jnp.asarray(x)), want["logits"], f"{arch} logits")
  return model, variables


@pytest.fixture(scope="module")
def alexnet():
  return randomise(TorchAlexNet(), 0)


@pytest.fixture(scope="module")
def vgg16():
  return randomise(TorchVGG(), 1)


@pytest.fixture(scope="module")
def imported(request):
  """{arch: from_torchvision(state dict of the module's random torch net, arch)}, made once."""
  class Cache(dict):
    def __missing__(self, arch):
      self[arch] = convert.from_torchvision(request.getfixturevalue(arch).state_dict(), arch)
      return self[arch]
  return Cache()


# 224: the adaptive pool is the identity (pool5 6x6); 99: pool5 2x2 -> 6x6
# (bins repeat pixels); 271: pool5 7x7 -> 6x6 (overlapping bins).
def test_alexnet_logits_and_every_layer_equal_torchvision(alexnet, imported):
  model, variables = compare("alexnet", alexnet, ALEXNET_OUTPUTS, (224, 99, 271), imported)
  assert isinstance(model, torchvision.TorchvisionAlexNet) and model.num_classes == 1000
  assert models.count_params(variables) == sum(p.numel() for p in alexnet.parameters())


def test_vgg16_logits_and_every_layer_equal_torchvision(vgg16, imported):
  # 32: pool5 1x1 -> 7x7; 80: pool5 2x2 -> 7x7 (224, the identity, is AlexNet's case).
  net = vgg16
  model, variables = compare("vgg16", net, vgg16_outputs(), (32, 80), imported)
  assert isinstance(model, torchvision.VGG16)
  assert models.count_params(variables) == sum(p.numel() for p in net.parameters())


def test_adaptive_avg_pool_equals_torch():
  rng = np.random.default_rng(0)
  for (h, w), out in (((13, 13), (6, 6)), ((7, 9), (6, 7)), ((2, 1), (6, 7)), ((6, 6), (6, 6)),
                      ((17, 5), (3, 2))):
    x = rng.normal(size=(2, h, w, 3)).astype(np.float32)
    want = torch.nn.functional.adaptive_avg_pool2d(
        torch.from_numpy(x).permute(0, 3, 1, 2), out).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(layers.adaptive_avg_pool(jnp.asarray(x), out), want,
                               rtol=1e-6, atol=1e-6, err_msg=f"{(h, w)} -> {out}")


def test_sources_pth_and_numpy_mapping_give_the_same_variables(alexnet, imported, tmp_path):
  state = alexnet.state_dict()
  _, want = imported["alexnet"]   # from the mapping of torch tensors
  path = tmp_path / "alexnet.pth"
  torch.save(state, path)
  numpy_state = {k: v.numpy() for k, v in state.items()}
  for source in (path, numpy_state):
    _, got = convert.from_torchvision(source, "alexnet")
    jax.tree.map(np.testing.assert_array_equal, got, want)
  # Layouts by hand: conv OIHW -> HWIO; fc6 row (c, h, w) of torch -> (h, w, c) of ours.
  w1 = state["features.0.weight"].numpy()
  np.testing.assert_array_equal(want["params"]["conv1"]["kernel"][4, 7, 2, 10], w1[10, 2, 4, 7])
  fc6 = state["classifier.1.weight"].numpy()
  c, h, w, unit = 200, 3, 5, 77
  np.testing.assert_array_equal(want["params"]["fc6"]["kernel"][(h * 6 + w) * 256 + c, unit],
                                fc6[unit, c * 36 + h * 6 + w])


def test_safetensors_file_works_without_torch(alexnet, tmp_path):
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  path = tmp_path / "alexnet.safetensors"
  safetensors_numpy.save_file({k: v.numpy() for k, v in alexnet.state_dict().items()}, str(path))
  xt, x = images(2, 224, 5)
  np.save(tmp_path / "x.npy", x)
  script = textwrap.dedent(f"""
      import sys
      import numpy as np
      from zfnet_jax.nn import convert
      model, variables = convert.from_torchvision({str(path)!r}, "alexnet")
      feats = model.apply(variables, np.load({str(tmp_path / 'x.npy')!r}), method="features")
      np.savez({str(tmp_path / 'out.npz')!r}, **{{k: np.asarray(v) for k, v in feats.items()}})
      assert "torch" not in sys.modules, "torch was imported"
      """)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
  subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
  got = np.load(tmp_path / "out.npz")
  want = torch_outputs(alexnet, xt, ALEXNET_OUTPUTS)
  for name in want:
    assert_close(got[name], want[name], f"safetensors {name}")


@pytest.mark.parametrize("arch,layer,size", [("alexnet", "conv2", 224), ("alexnet", "conv5", 224),
                                             ("alexnet", "conv5", 99), ("vgg16", "conv3_3", 48)])
def test_deconvnet_projections_of_imported_model_equal_torch_reference(arch, layer, size,
                                                                        request, imported):
  """torch reference: forward with the deconvnet ReLU; backward from a one-hot holding the
  unit's own value; max-pool goes down through torch's own indices (its first maximum)."""
  source = request.getfixturevalue(arch)
  net = (TorchAlexNet if arch == "alexnet" else TorchVGG)(relu=DeconvReLUModule)
  net.load_state_dict(source.state_dict())
  model, variables = imported[arch]
  names = ALEXNET_OUTPUTS if arch == "alexnet" else vgg16_outputs()
  xt, x = images(2, size, 11)
  seq, idx = names[layer]
  xt.requires_grad_(True)
  act = net.features[:idx + 1](xt)                       # (N, C, H, W)
  channel = int(act.detach().amax(dim=(0, 2, 3)).argmax())   # a map that fires
  flat = act[:, channel].detach().reshape(2, -1).numpy()
  rows, cols = np.divmod(flat.argmax(axis=1), act.shape[3])
  ct = torch.zeros_like(act)
  for i in range(2):
    ct[i, channel, rows[i], cols[i]] = act[i, channel, rows[i], cols[i]].detach()
  assert float(ct.abs().max()) > 0
  (want,) = torch.autograd.grad(act, xt, ct)
  want = want.permute(0, 2, 3, 1).numpy()
  got = deconv.project(model, variables, jnp.asarray(x), layer=layer, channel=channel,
                       position=np.stack([rows, cols], 1))
  assert_close(got, want, f"projection {layer}", rtol=1e-4)
  # The rule matters: the plain gradient differs.
  grad = deconv.project(model, variables, jnp.asarray(x), layer=layer, channel=channel,
                        position=np.stack([rows, cols], 1), rule="backprop")
  assert float(np.abs(np.asarray(grad) - want).max()) > 0.01 * float(np.abs(want).max())


def test_bad_sources_name_the_key_and_shapes(tmp_path):
  shapes = {k: tuple(v.shape) for k, v in TorchAlexNet().state_dict().items()}
  good = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
  with pytest.raises(ValueError, match="unknown arch 'resnet50'; allowed: alexnet, vgg16"):
    convert.from_torchvision(good, "resnet50")
  missing = dict(good)
  del missing["features.3.bias"]
  with pytest.raises(ValueError, match="lack key 'features.3.bias'"):
    convert.from_torchvision(missing, "alexnet")
  with pytest.raises(ValueError, match=r"unexpected key 'features.1.weight' \(shape \(2,\)\)"):
    convert.from_torchvision({**good, "features.1.weight": np.zeros(2)}, "alexnet")
  bad = {**good, "features.6.weight": np.zeros((384, 192, 5, 5), np.float32)}
  with pytest.raises(ValueError, match=r"key 'features.6.weight': expected shape "
                                       r"\(384, 192, 3, 3\), got \(384, 192, 5, 5\)"):
    convert.from_torchvision(bad, "alexnet")
  with pytest.raises(ValueError, match="torchvision alexnet weights .*not vgg16: pass "
                                       "arch='alexnet'"):
    convert.from_torchvision(good, "vgg16")
  with pytest.raises(ValueError, match="no such weights file: '.*nope.pth'"):
    convert.from_torchvision(str(tmp_path / "nope.pth"), "alexnet")
  (tmp_path / "w.h5").write_bytes(b"x")
  with pytest.raises(ValueError, match="unknown weights file type '.h5'.*allowed: .pth"):
    convert.from_torchvision(tmp_path / "w.h5", "alexnet")
  (tmp_path / "w.safetensors").write_bytes(b"not safetensors")
  with pytest.raises(ValueError, match="cannot read .*w.safetensors"):
    convert.from_torchvision(tmp_path / "w.safetensors", "alexnet")
  # A fine-tuned model with another number of classes keeps it.
  ten = {**good, "classifier.6.weight": np.zeros((10, 4096), np.float32),
         "classifier.6.bias": np.zeros(10, np.float32)}
  assert convert.from_torchvision(ten, "alexnet")[0].num_classes == 10


def test_pth_without_torch_says_so(tmp_path):
  (tmp_path / "w.pth").write_bytes(b"x")
  script = textwrap.dedent(f"""
      import sys
      sys.modules["torch"] = None   # as if PyTorch were not installed
      from zfnet_jax.nn import convert
      try:
        convert.from_torchvision({str(tmp_path / 'w.pth')!r}, "alexnet")
      except ValueError as e:
        print(e)
      """)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       timeout=120, check=True).stdout
  assert "needs PyTorch, which is not installed" in out and "w.pth" in out
  assert ".safetensors" in out


def test_imagenet_class_names():
  names = convert.imagenet_class_names()
  assert len(names) == 1000 == len(set(names))
  # Well-known indices of the ILSVRC 2012 label order.
  short = convert.imagenet_class_names(short=True)
  assert (short[0], short[1], short[207], short[281], short[409], short[999]) == (
      "tench", "goldfish", "golden retriever", "tabby", "analog clock", "toilet tissue")
  assert names[0] == "tench, Tinca tinca"


def test_for_pixels_takes_mean_subtracted_pixels_and_gives_torchvisions_logits(alexnet,
                                                                               imported):
  """Fed 0..255 pixels minus 255*mean, the folded model equals torch on (x/255-mean)/std."""
  model, variables = imported["alexnet"]
  rng = np.random.default_rng(4)
  pixels = rng.integers(0, 256, (2, 99, 99, 3)).astype(np.float32)
  mean = np.asarray(convert.TORCHVISION_MEAN, np.float32)
  std = np.asarray(convert.TORCHVISION_STD, np.float32)
  normalised = (pixels / 255.0 - mean) / std
  with torch.no_grad():
    want = alexnet(torch.from_numpy(normalised.transpose(0, 3, 1, 2))).numpy()
  folded = convert.for_pixels(variables, "alexnet")
  got = np.asarray(model.apply(folded, jnp.asarray(pixels - np.asarray(convert.PIXEL_MEAN,
                                                                          np.float32))))
  assert_close(got, want, "alexnet logits from pixels")
  assert np.abs(got - np.asarray(model.apply(variables, jnp.asarray(pixels)))).max() > 1e-3


def test_the_normalisation_users_are_told_to_use_is_torchvisions():
  """Pinned by value from torchvision's documentation of its ImageNet weights
  (transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])), not
  from the constants under test."""
  assert convert.TORCHVISION_MEAN == (0.485, 0.456, 0.406)
  assert convert.TORCHVISION_STD == (0.229, 0.224, 0.225)
  np.testing.assert_allclose(convert.PIXEL_MEAN, (123.675, 116.28, 103.53), rtol=1e-12)


def test_bfloat16_torch_tensors_become_float32_arrays():
  t = torch.tensor([1.5, -2.25, 3.0], dtype=torch.bfloat16)
  got = convert._to_numpy(t)                      # pylint: disable=protected-access
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, [1.5, -2.25, 3.0])

