"""Invariance curves vs a direct computation; transforms checked by hand."""
import jax
import numpy as np
import pytest

from zfnet_jax import configs
from zfnet_jax.analyses import invariance
from zfnet_jax.nn import models
from zfnet_jax.render import content

import helpers

S = 64


@pytest.fixture(scope="module")
def tiny():
  model = models.ZFNetLowRes(num_classes=4, conv_features=(4, 6, 6, 6, 8), fc_features=16,
                             dropout_rate=0.0)
  x = np.zeros((1, S, S, 1), np.float32)
  return model, {"params": model.init(jax.random.PRNGKey(0), x)["params"]}


def test_transforms_by_hand():
  img = np.asarray(np.random.default_rng(0).normal(size=(S, S, 2)), np.float32)
  down = np.zeros_like(img)
  down[5:] = img[:-5]
  np.testing.assert_allclose(invariance.transform(img, "translation", 5.0), down, atol=1e-5)
  np.testing.assert_allclose(invariance.transform(img, "rotation", 90.0), np.rot90(img, 1),
                             atol=1e-4)
  np.testing.assert_allclose(invariance.transform(img, "rotation", 180.0), img[::-1, ::-1],
                             atol=1e-4)
  zoom = invariance.transform(img, "scale", 2.0)       # centre pixel pair 31.5 stays put
  np.testing.assert_allclose(zoom[32, 32], 0.5625 * img[32, 32] + 0.1875 * img[31, 32]
                             + 0.1875 * img[32, 31] + 0.0625 * img[31, 31], atol=1e-5)
  for kind, zero in (("translation", 0.0), ("scale", 1.0), ("rotation", 0.0)):
    np.testing.assert_array_equal(invariance.transform(img, kind, zero), img)
  with pytest.raises(ValueError, match="shear"):
    invariance.transform(img, "shear", 1.0)


def test_distances_equal_direct_computation(tiny):
  model, variables = tiny
  rng = np.random.default_rng(1)
  images = np.asarray(rng.normal(size=(2, S, S, 1)) * 60, np.float32)
  labels = np.array([1, 3])
  am = {"translation": np.array([-6.0, 0.0, 4.0]), "scale": np.array([1.0, 1.5]),
        "rotation": np.array([0.0, 30.0])}
  res = invariance.measure(model, variables, images, labels, ["conv1", "fc7"], am, batch_size=3)
  apply = jax.jit(lambda x: model.apply(variables, x, method="features"))
  f0 = apply(images)
  for kind, amounts in am.items():
    for i in range(2):
      for k, a in enumerate(amounts):
        x = np.asarray(invariance.transform(images[i], kind, a))
        f = apply(x[None])
        for layer in ("conv1", "fc7"):
          v0, v = np.asarray(f0[layer][i]).ravel(), np.asarray(f[layer][0]).ravel()
          d = np.sqrt(((v - v0) ** 2).sum())
          np.testing.assert_allclose(res[kind][f"distance/{layer}"][i, k], d, rtol=1e-4, atol=1e-4)
          np.testing.assert_allclose(res[kind][f"normalised/{layer}"][i, k],
                                     d / np.sqrt((v0 ** 2).sum()), rtol=1e-4, atol=1e-6)
        p = np.asarray(jax.nn.softmax(f["logits"][0]))
        np.testing.assert_allclose(res[kind]["prob_true"][i, k], p[labels[i]], rtol=1e-4)
        assert res[kind]["top_class"][i, k] == p.argmax()
    # amount 0 -> distance 0 and the unoccluded probability
    zero = {"translation": 1, "scale": 0, "rotation": 0}[kind]
    p0 = np.asarray(jax.nn.softmax(f0["logits"]))
    np.testing.assert_allclose(res[kind]["distance/fc7"][:, zero], 0, atol=1e-6)
    np.testing.assert_allclose(res[kind]["distance/conv1"][:, zero], 0, atol=1e-6)
    np.testing.assert_allclose(res[kind]["prob_true"][:, zero], p0[[0, 1], labels], rtol=1e-5)
  with pytest.raises(ValueError, match="fc9"):
    invariance.measure(model, variables, images, labels, ["fc9"], am)


def _bilinear(image, yi, xi):
  """image (S, S, C) sampled at float (S, S) coordinates; 0 outside (NumPy, float64)."""
  s = image.shape[0]
  y0, x0 = np.floor(yi).astype(int), np.floor(xi).astype(int)
  out = np.zeros(yi.shape + image.shape[2:])
  for dy in (0, 1):
    for dx in (0, 1):
      r, c = y0 + dy, x0 + dx
      w = (1 - np.abs(yi - r)) * (1 - np.abs(xi - c))
      inside = (r >= 0) & (r < s) & (c >= 0) & (c < s)
      out += np.where(inside, w, 0.0)[..., None] * image[np.clip(r, 0, s - 1),
                                                           np.clip(c, 0, s - 1)]
  return out


def _warp(image, kind, a):
  """The module docstring's warps, written out: output (y, x) samples the input at (yi, xi)."""
  s = image.shape[0]
  c = (s - 1) / 2
  y, x = np.meshgrid(np.arange(s, dtype=np.float64), np.arange(s, dtype=np.float64),
                     indexing="ij")
  if kind == "translation":
    yi, xi = y - a, x
  elif kind == "scale":
    yi, xi = c + (y - c) / a, c + (x - c) / a
  else:
    t = np.deg2rad(a)
    yi = c + np.cos(t) * (y - c) + np.sin(t) * (x - c)
    xi = c - np.sin(t) * (y - c) + np.cos(t) * (x - c)
  return _bilinear(np.asarray(image, np.float64), yi, xi).astype(np.float32)


def test_measure_on_a_hand_built_cnn_equals_direct_features():
  """The analysis on a Flax CNN that is not ours, vs its features of warped images."""
  net, variables = helpers.plain_network()
  cnn = helpers.PlainCNN()
  apply = jax.jit(lambda x: cnn.apply(variables, x, method="features"))
  rng = np.random.default_rng(3)
  images = np.asarray(rng.normal(size=(2, 32, 32, 1)) * 50, np.float32)
  labels = np.array([2, 0])
  am = {"translation": np.array([-3.0, 0.0, 2.5]), "scale": np.array([1.0, 1.6]),
        "rotation": np.array([0.0, 90.0, 25.0])}
  layers = ["c1", "p2"]
  res = invariance.measure(net, variables, images, labels, layers, am, batch_size=4)
  f0 = apply(images)
  for kind, amounts in am.items():
    x = np.stack([_warp(images[i], kind, a) for i in range(2) for a in amounts])
    f = apply(x)
    for layer in layers:
      v0 = np.asarray(f0[layer], np.float64).reshape(2, 1, -1)
      v = np.asarray(f[layer], np.float64).reshape(2, len(amounts), -1)
      d = np.sqrt(((v - v0) ** 2).sum(-1))
      np.testing.assert_allclose(res[kind][f"distance/{layer}"], d, rtol=1e-3, atol=1e-3)
      np.testing.assert_allclose(res[kind][f"normalised/{layer}"],
                                 d / np.sqrt((v0 ** 2).sum(-1)), rtol=1e-3, atol=1e-5)
    logits = np.asarray(f["logits"], np.float64).reshape(2, len(amounts), -1)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(res[kind]["prob_true"],
                               np.stack([p[i, :, labels[i]] for i in range(2)]),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(res[kind]["top_class"], p.argmax(-1))
  # No shift: the same features up to float rounding, which depends on the batch the image
  # is in (a few 1e-6 on features of norm ~1e2 on an AMD EPYC): relative to their norm.
  np.testing.assert_allclose(res["translation"]["normalised/c1"][:, 1], 0, atol=1e-6)
  with pytest.raises(ValueError, match="unknown invariance layer 'conv1'"):
    invariance.measure(net, variables, images, labels, ["conv1"], am)


def _options(**kw):
  o = configs.default_config().analyses.invariance
  o.layers = ("c1",)
  for k, v in kw.items():
    o[k] = v
  return o


def test_validate():
  net, _ = helpers.plain_network()
  data = content.Data("toy", 32, 32, 1)
  o = invariance.validate(_options(layers=("c1", "logits"), num_shifts=3, rotation_step=90.0),
                          net, data)
  assert o.layers == ("c1", "logits")
  np.testing.assert_allclose(o.amounts["translation"], [-60 * 32 / 224, 0, 60 * 32 / 224])
  np.testing.assert_allclose(o.amounts["rotation"], [0, 90, 180, 270])
  assert len(o.amounts["scale"]) == 9
  for kw, match in ((dict(layers=("c1", "fc7")), "unknown invariance layer 'fc7'"),
                    (dict(num_shifts=1), "invariance.num_shifts = 1"),
                    (dict(max_shift=40.0), "invariance.max_shift = 40.0"),
                    (dict(max_scale=1.0), "invariance.max_scale = 1.0"),
                    (dict(rotation_step=0.0), "invariance.rotation_step = 0.0")):
    with pytest.raises(ValueError, match=match):
      invariance.validate(_options(**kw), net, data)


def test_sections_on_a_hand_built_cnn(tmp_path):
  net, variables = helpers.plain_network()
  images = np.asarray(jax.random.normal(jax.random.PRNGKey(6), (2, 32, 32, 1))) * 40
  data = content.Data("toy", 32, 32, 1)
  options = invariance.validate(_options(layers=("c1", "c2"), num_shifts=3, num_scales=2,
                                         rotation_step=120.0), net, data)
  ctx = content.Context(net=net, variables=variables, images=images, labels=np.array([1, 2]),
                         ids=np.array([4, 8]), pixel_mean=np.full((32, 32, 1), 100.0, np.float32),
                         class_names=("a", "b", "c"), out_dir=str(tmp_path), data=data,
                         batch_size=5)
  (sec,) = invariance.sections(ctx, options)
  assert (sec.title, sec.anchor) == ("Invariance", "invariance")
  assert [f for f, _ in sec.figures] == ["invariance_examples.png", "invariance.png"]
  assert sec.paragraphs[0].startswith("Images 4, 8 ")
  assert sec.paragraphs[0].endswith("Arrays: invariance.npz.")
  header, rows = sec.tables[0]
  assert header == ["transform", "range", "mean normalised distance c1",
                    "mean normalised distance c2", "fraction still correct"]
  assert [r[:2] for r in rows] == [["translation", "-8.57..8.57"], ["scale", "1..1.8"],
                                   ["rotation", "0..240"]]
  for name in ("invariance.npz", "invariance_examples.png", "invariance.png"):
    assert (tmp_path / name).stat().st_size > 0
  saved = np.load(tmp_path / "invariance.npz")
  np.testing.assert_array_equal(saved["ids"], [4, 8])
  assert saved["rotation/distance/c2"].shape == (2, 3)
  assert saved["scale/top_class"].shape == (2, 2)
  np.testing.assert_allclose(float(rows[1][2]), saved["scale/normalised/c1"].mean(), atol=1e-3)
