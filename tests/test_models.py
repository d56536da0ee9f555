"""ZFNet/AlexNet against the paper's layer table, hand parameter counts and brute force."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zfnet_jax import configs
from zfnet_jax.nn import geometry, models


def _shapes(model, size=224, channels=3):
  v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, channels))))
  f = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, size, size, channels)), method="features"), v)
  return v, {k: tuple(a.shape[1:]) for k, a in f.items()}


def _conv(k, cin, cout):
  return k * k * cin * cout + cout


def _fc(nin, nout):
  return nin * nout + nout


def test_zfnet_layer_sizes_match_paper():
  v, s = _shapes(models.ZFNet())
  assert s == {
      "conv1": (110, 110, 96), "pool1": (55, 55, 96), "norm1": (55, 55, 96),
      "conv2": (26, 26, 256), "pool2": (13, 13, 256), "norm2": (13, 13, 256),
      "conv3": (13, 13, 384), "conv4": (13, 13, 384), "conv5": (13, 13, 256),
      "pool5": (6, 6, 256), "fc6": (4096,), "fc7": (4096,), "logits": (1000,)}
  assert models.count_params(v["params"]) == 62_357_608
  p = v["params"]
  assert set(p) == {"conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"}
  assert p["conv1"]["kernel"].shape == (7, 7, 3, 96)       # HWIO
  assert p["fc6"]["kernel"].shape == (9216, 4096)          # (in, out)


def test_alexnet_layer_sizes_and_hand_count():
  v, s = _shapes(models.AlexNet())
  assert s["conv1"] == (55, 55, 96) and s["pool1"] == (27, 27, 96)
  assert s["conv2"] == (27, 27, 256) and s["pool2"] == (13, 13, 256)
  assert s["norm1"] == (55, 55, 96) and s["norm2"] == (27, 27, 256)   # before the pools
  assert s["conv5"] == (13, 13, 256) and s["pool5"] == (6, 6, 256)
  hand = (_conv(11, 3, 96) + _conv(5, 96, 256) + _conv(3, 256, 384) + _conv(3, 384, 384)
          + _conv(3, 384, 256) + _fc(6 * 6 * 256, 4096) + _fc(4096, 4096) + _fc(4096, 1000))
  assert models.count_params(v["params"]) == hand
  assert v["params"]["conv1"]["kernel"].shape == (11, 11, 3, 96)


@pytest.mark.parametrize("kwargs,convs,fc", [
    (dict(conv_features=(96, 256, 512, 1024, 512)), [(7, 3, 96), (5, 96, 256), (3, 256, 512), (3, 512, 1024), (3, 1024, 512)], [512 * 36, 4096, 4096]),
    (dict(fc_features=2048), [(7, 3, 96), (5, 96, 256), (3, 256, 384), (3, 384, 384), (3, 384, 256)], [9216, 2048, 2048]),
    (dict(fc_features=8192), [(7, 3, 96), (5, 96, 256), (3, 256, 384), (3, 384, 384), (3, 384, 256)], [9216, 8192, 8192]),
    (dict(removed=("conv3", "conv4")), [(7, 3, 96), (5, 96, 256), (3, 256, 256)], [9216, 4096, 4096]),
    (dict(removed=("fc7",)), [(7, 3, 96), (5, 96, 256), (3, 256, 384), (3, 384, 384), (3, 384, 256)], [9216, 4096]),
    (dict(removed=("fc6", "fc7")), [(7, 3, 96), (5, 96, 256), (3, 256, 384), (3, 384, 384), (3, 384, 256)], [9216]),
    (dict(removed=("conv3", "conv4", "fc6", "fc7")), [(7, 3, 96), (5, 96, 256), (3, 256, 256)], [9216]),
])
def test_table_variants_build_with_hand_counts(kwargs, convs, fc):
  v, s = _shapes(models.ZFNet(**kwargs))
  hand = sum(_conv(*c) for c in convs) + sum(_fc(a, b) for a, b in zip(fc, fc[1:] + [1000]))
  assert models.count_params(v["params"]) == hand
  for layer in kwargs.get("removed", ()):
    assert layer not in s


def test_lowres_variant_keeps_topology():
  model = models.ZFNetLowRes(num_classes=10)
  v, s = _shapes(model, 64, 1)
  assert [t.name for t in model.layer_table(64)] == [
      "conv1", "pool1", "norm1", "conv2", "pool2", "norm2", "conv3", "conv4", "conv5",
      "pool5", "fc6", "fc7", "logits"]
  assert v["params"]["conv1"]["kernel"].shape[:2] == (7, 7)
  assert s["conv1"][:2] == (30, 30) and s["logits"] == (10,)


def test_contrast_norm_switch_and_bad_removed():
  _, s = _shapes(models.ZFNet(contrast_norm=False, num_classes=10), 224)
  assert "norm1" not in s and "norm2" not in s
  with pytest.raises(ValueError, match="fc8"):
    models.ZFNet(removed=("fc8",)).layer_table(224)
  with pytest.raises(ValueError, match="unknown model 'VGG'"):
    models.create_model("VGG")


def test_dropout_only_in_training():
  model = models.ZFNetLowRes(num_classes=10, conv_features=(8, 8, 8, 8, 8), fc_features=32)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 64, 64, 1))
  v = model.init(jax.random.PRNGKey(0), x)
  e1, e2 = model.apply(v, x), model.apply(v, x)
  np.testing.assert_array_equal(e1, e2)
  t1 = model.apply(v, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
  t2 = model.apply(v, x, train=True, rngs={"dropout": jax.random.PRNGKey(3)})
  assert not np.allclose(t1, e1) and not np.allclose(t1, t2)
  f = model.apply(v, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)}, method="features")
  zeros = float(jnp.mean(f["fc6"] == 0))
  # fc6 is recorded before dropout: same as evaluation.
  np.testing.assert_allclose(f["fc6"], model.apply(v, x, method="features")["fc6"], rtol=1e-6)
  assert zeros < 1.0


@pytest.mark.slow
def test_initialisation_scale():
  v = models.ZFNet(num_classes=10).init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
  k = np.asarray(v["params"]["conv2"]["kernel"])
  assert abs(k.std() - 1e-2) < 1e-3 and abs(k.mean()) < 1e-3
  assert np.all(np.asarray(v["params"]["conv2"]["bias"]) == 0)


def test_conv1_init_std_only_changes_conv1():
  c = configs.default_config()
  c.model.name = "ZFNetLowRes"
  c.model.kernel_init_std = 0.05
  c.model.conv1_init_std = 0.001          # as the quickstart sets it
  model = models.from_config(c.model, 10)
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 1)))["params"]
  stds = {k: float(np.asarray(v[k]["kernel"]).std()) for k in ("conv1", "conv2", "conv5", "fc6")}
  assert abs(stds["conv1"] - 1e-3) < 2e-4, stds
  for k in ("conv2", "conv5", "fc6"):
    assert abs(stds[k] - 0.05) < 5e-3, stds


@pytest.mark.parametrize("model_cls", [models.ZFNet, models.AlexNet])
def test_receptive_fields_equal_brute_force(model_cls):
  """A NaN put in one input pixel spreads to exactly the units whose window holds it."""
  model = model_cls(num_classes=10)
  size = 224
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
  pixels = [(0, 0), (223, 223), (0, 223), (100, 37), (57, 190), (223, 5)]
  x = np.ones((len(pixels), size, size, 3), np.float32)
  for b, (r, c) in enumerate(pixels):
    x[b, r, c, 1] = np.nan
  feats = jax.jit(lambda v, x: model.apply(v, x, method="features"))(v, jnp.asarray(x))
  rfs = geometry.receptive_fields(model, size)
  for layer, rf in rfs.items():
    nan = np.isnan(np.asarray(feats[layer])).any(axis=-1)       # (B, Ho, Wo)
    n = nan.shape[1]
    for b, (r, c) in enumerate(pixels):
      expect = np.zeros((n, n), bool)
      for i in range(n):
        for j in range(n):
          r0, r1, c0, c1 = rf.window(i, j, size)
          expect[i, j] = r0 <= r < r1 and c0 <= c < c1
      np.testing.assert_array_equal(nan[b], expect, err_msg=f"{layer} pixel {(r, c)}")


def test_from_config():
  c = configs.default_config()
  c.model.name = "AlexNet"
  c.model.fc_features = 2048
  m = models.from_config(c.model, 17)
  assert isinstance(m, models.AlexNet) and m.fc_features == 2048 and m.num_classes == 17


@pytest.mark.parametrize("kernel,stride,pad,size", [
    (5, 1, 1, 28), (9, 2, 3, 64),
    pytest.param(7, 1, 4, 28, marks=pytest.mark.slow),
    pytest.param(11, 4, 0, 64, marks=pytest.mark.slow)])
def test_conv1_geometry_from_config(kernel, stride, pad, size):
  """config.model.conv1_* set the first layer: sizes by cuda-convnet's rule by hand,
  parameter count by hand, and the receptive fields still equal brute force."""
  c = configs.default_config()
  c.model.name = "ZFNetLowRes"
  c.model.conv_features = (32, 64, 96, 96, 64)
  c.model.conv1_kernel, c.model.conv1_stride, c.model.conv1_pad = kernel, stride, pad
  models.validate(c.model)
  m = models.from_config(c.model, 10)
  v, s = _shapes(m, size, 1)
  n1 = 1 + -(-(2 * pad + size - kernel) // stride)                # conv1
  p1 = -(-(n1 - 3) // 2) + 1                                       # ceil-mode pool 3/2
  n2 = 1 + -(-(p1 - 5) // 2)                                       # conv2 5x5/2, no pad
  assert s["conv1"] == (n1, n1, 32) and s["pool1"] == (p1, p1, 32) and s["conv2"][0] == n2
  assert models.count_params(v["params"]["conv1"]) == _conv(kernel, 1, 32)
  rf = geometry.receptive_fields(m, size)["conv1"]
  assert (rf.size, rf.stride, rf.offset) == (kernel, stride, -pad)
  # brute force: a NaN pixel reaches exactly the conv1 units whose window holds it
  vv = m.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 1)))
  x = np.ones((1, size, size, 1), np.float32)
  x[0, size // 2, 3, 0] = np.nan
  nan = np.isnan(np.asarray(m.apply(vv, x, method="features")["conv1"])).any(-1)[0]
  expect = np.array([[rf.window(i, j, size)[0] <= size // 2 < rf.window(i, j, size)[1]
                      and rf.window(i, j, size)[2] <= 3 < rf.window(i, j, size)[3]
                      for j in range(n1)] for i in range(n1)])
  np.testing.assert_array_equal(nan, expect)


@pytest.mark.parametrize("key,value", [("conv1_kernel", 0), ("conv1_stride", 0),
                                       ("conv1_pad", -1), ("conv1_pad", 7)])
def test_conv1_geometry_rejects_bad_values(key, value):
  c = configs.default_config()
  c.model[key] = value
  with pytest.raises(ValueError, match=f"model.{key}={value}" if key != "conv1_pad" or value < 0
                     else "conv1_pad=7 with conv1_kernel=7"):
    models.validate(c.model)
