"""Layer-level checks of zfnet_jax.nn.layers against NumPy loops and hand derivations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zfnet_jax import configs
from zfnet_jax.nn import layers, models, rules

from helpers import np_lrn, np_pool, np_unpool


def tied_input(key, shape):
  """Random values with many ties: rounded to 1 decimal, a quarter zeroed."""
  x = np.round(np.asarray(jax.random.normal(key, shape)), 1)
  x[..., : shape[-3] // 2, : shape[-2] // 2, :] = 0.0
  return np.maximum(x, 0).astype(np.float32)  # like a ReLU output


def test_relu_rules_by_hand():
  x = jnp.array([-2.0, -1.0, 0.0, 1.0, 2.0])
  r = jnp.array([1.0, -1.0, 1.0, -1.0, 3.0])
  want = {"backprop": [0, 0, 0, -1, 3], "deconvnet": [1, 0, 1, 0, 3], "guided": [0, 0, 0, 0, 3]}
  for rule, expected in want.items():
    y, vjp = jax.vjp(lambda v: layers.relu(v, rule), x)
    np.testing.assert_array_equal(y, [0, 0, 0, 1, 2])
    np.testing.assert_array_equal(vjp(r)[0], expected)
  with pytest.raises(ValueError, match="'sigmoid'.*backprop, deconvnet, guided"):
    layers.relu(x, "sigmoid")


def test_each_rules_backward_is_its_definition():
  """R * 1[X > 0]; relu(R); R * 1[X > 0] * 1[R > 0] (the backprop layer itself takes
  JAX's ReLU gradient, so only this checks its rule object)."""
  x = jnp.array([-2.0, -0.5, 0.0, 0.5, 2.0])
  r = jnp.array([1.0, -1.0, 1.0, -1.0, 3.0])
  want = {"backprop": [0, 0, 0, -1, 3], "deconvnet": [1, 0, 1, 0, 3], "guided": [0, 0, 0, 0, 3]}
  assert list(rules.RULES) == list(want)
  for name, expected in want.items():
    np.testing.assert_array_equal(rules.RULES[name].backward(x, r), expected)


@pytest.mark.parametrize("size", [7, 8, 15, 2, 1])
def test_max_pool_ceil_mode_switches_and_unpool(size):
  x = tied_input(jax.random.PRNGKey(size), (2, size, size, 3))
  pad_hi = layers.ceil_pool_padding(size, 3, 2)
  want_out = -(-max(size - 3, 0) // 2) + 1  # ceil((n - 3) / 2) + 1, at least 1
  y, vjp = jax.vjp(lambda v: layers.max_pool(v, 3, 2), jnp.asarray(x))
  assert y.shape == (2, want_out, want_out, 3)
  r = np.asarray(jax.random.normal(jax.random.PRNGKey(9), y.shape), np.float32)
  got = np.asarray(vjp(jnp.asarray(r))[0])
  positions = np.asarray(layers.switch_positions(layers.pool_switches(jnp.asarray(x))))
  for n in range(2):
    out, sw = np_pool(x[n], pad=((0, pad_hi), (0, pad_hi)))
    np.testing.assert_array_equal(y[n], out)
    np.testing.assert_array_equal(positions[n], sw)
    np.testing.assert_allclose(got[n], np_unpool(r[n], sw, x[n].shape), rtol=1e-6, atol=1e-6)
  if size >= 7:  # the test must exercise ties: the first window is all zeros
    assert (x[:, :3, :3] == 0).all()
  # The one-pass version the deconvnet records switches with: same values, switches, VJP.
  (y2, sw2), vjp2 = jax.vjp(lambda v: layers.max_pool_and_switches(v, 3, 2), jnp.asarray(x))
  got2 = np.asarray(vjp2((jnp.asarray(r), np.zeros(sw2.shape, jax.dtypes.float0)))[0])
  positions2 = np.asarray(layers.switch_positions(sw2))
  for n in range(2):
    out, sw = np_pool(x[n], pad=((0, pad_hi), (0, pad_hi)))
    np.testing.assert_array_equal(y2[n], out)
    np.testing.assert_array_equal(positions2[n], sw)
    np.testing.assert_allclose(got2[n], np_unpool(r[n], sw, x[n].shape), rtol=1e-6, atol=1e-6)


def test_general_max_pool_any_padding_and_layout():
  """Top/left padding, NCHW layout: values, switches and unpooling vs loops."""
  x = tied_input(jax.random.PRNGKey(3), (1, 2, 9, 9))  # NCHW, layout only matters for axes
  dims, strides, pad = (1, 1, 3, 3), (1, 1, 2, 2), ((0, 0), (0, 0), (1, 1), (1, 0))
  y, vjp = jax.vjp(lambda v: layers.general_max_pool(v, dims, strides, pad), jnp.asarray(x))
  np.testing.assert_array_equal(
      y, jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, strides, pad))
  r = np.asarray(jax.random.normal(jax.random.PRNGKey(4), y.shape), np.float32)
  got = np.asarray(vjp(jnp.asarray(r))[0])
  for ch in range(2):
    img = x[0, ch][..., None]
    out, sw = np_pool(img, pad=((1, 1), (1, 0)))
    np.testing.assert_array_equal(y[0, ch], out[..., 0])
    np.testing.assert_allclose(got[0, ch], np_unpool(r[0, ch][..., None], sw, img.shape)[..., 0],
                               rtol=1e-6, atol=1e-6)


def test_general_switches_are_each_windows_first_maximum():
  """NCHW with top/left padding: the switch is the row-major offset of the first maximum
  (loops) in the window whose top-left is (2i - 1, 2j - 1)."""
  x = tied_input(jax.random.PRNGKey(3), (1, 2, 9, 9))
  dims, strides, pad = (1, 1, 3, 3), (1, 1, 2, 2), ((0, 0), (0, 0), (1, 1), (1, 0))
  switches = np.asarray(layers.general_switches(jnp.asarray(x), dims, strides, pad))
  for ch in range(2):
    out, sw = np_pool(x[0, ch][..., None], pad=((1, 1), (1, 0)))
    i, j = np.indices(out.shape[:2])
    np.testing.assert_array_equal(switches[0, ch],
                                  (sw[..., 0, 0] - (2 * i - 1)) * 3 + sw[..., 0, 1] - (2 * j - 1))


def test_general_max_pool_without_ties_equals_jax_gradient():
  x = jax.random.normal(jax.random.PRNGKey(5), (2, 10, 11, 3))
  args = ((1, 3, 2, 1), (1, 2, 3, 1), ((0, 0), (2, 1), (1, 1), (0, 0)))
  f = lambda v: jnp.sum(jnp.sin(layers.general_max_pool(v, *args)))
  g = lambda v: jnp.sum(jnp.sin(jax.lax.reduce_window(v, -jnp.inf, jax.lax.max, *args)))
  np.testing.assert_allclose(jax.grad(f)(x), jax.grad(g)(x), rtol=1e-6)


@pytest.mark.parametrize("n", [5, 4])
def test_contrast_norm_matches_formula_and_hand_vjp(n):
  a = np.asarray(jax.random.normal(jax.random.PRNGKey(6), (2, 3, 3, 7)), np.float64) * 2
  k, alpha, beta = 2.0, 0.3, 0.75  # a large alpha so the normalisation matters
  want, want_vjp = np_lrn(a, k, n, alpha, beta)
  r = np.asarray(jax.random.normal(jax.random.PRNGKey(7), a.shape), np.float64)
  for rule in ("exact", "identity"):
    y, vjp = jax.vjp(lambda v: layers.contrast_norm(v, k, n, alpha, beta, norm_rule=rule),
                     jnp.asarray(a, jnp.float32))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    expected = want_vjp(r.copy()) if rule == "exact" else r
    np.testing.assert_allclose(vjp(jnp.asarray(r, jnp.float32))[0], expected, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="'approx'.*exact, identity"):
    layers.contrast_norm(jnp.asarray(a), norm_rule="approx")


def test_contrast_norm_defaults_are_alexnets_with_alpha_not_divided_by_n():
  """k=2, n=5, alpha=1e-4, beta=0.75, the sum weighted by alpha, not alpha/n as in Caffe and
  PyTorch.  At |a| of 60..140 the two conventions' outputs differ by a factor 1.37-2.1
  everywhere; the tolerance is 1e-5."""
  signs = np.sign(np.asarray(jax.random.normal(jax.random.PRNGKey(8), (2, 3, 3, 9))))
  a = signs * np.linspace(60.0, 140.0, 9)          # 9 maps, so windows of 5 fit inside
  want, _ = np_lrn(a, 2.0, 5, 1e-4, 0.75)
  divided, _ = np_lrn(a, 2.0, 5, 1e-4 / 5, 0.75)
  assert np.abs(divided / want - 1).min() > 0.3
  np.testing.assert_allclose(layers.contrast_norm(jnp.asarray(a, jnp.float32)), want, rtol=1e-5)


def test_models_normalise_with_the_default_contrast_norm():
  """norm1 = LRN(pool1) with k=2, n=5, alpha=1e-4 (not divided by n), beta=0.75, on
  pixel-scale inputs (-128..128), where pool1 is ~100 and alpha/n is off by > 20%."""
  model = models.ZFNetLowRes(num_classes=3, conv_features=(8, 6, 6, 6, 6), fc_features=8)
  x = np.asarray(jax.random.uniform(jax.random.PRNGKey(9), (2, 64, 64, 1), minval=-128,
                                    maxval=128), np.float32)
  variables = model.init(jax.random.PRNGKey(0), x[:1])
  f = model.apply(variables, x, method="features")
  pool1 = np.asarray(f["pool1"], np.float64)
  want, _ = np_lrn(pool1, 2.0, 5, 1e-4, 0.75)
  divided, _ = np_lrn(pool1, 2.0, 5, 1e-4 / 5, 0.75)
  on = pool1 > 0
  assert on.mean() > 0.9 and np.median(np.abs(divided[on] / want[on] - 1)) > 0.2
  np.testing.assert_allclose(f["norm1"], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_ceil_pool_padding():
  # cuda-convnet sizes of the paper: 110 -> 55, 26 -> 13, 13 -> 6.
  for n, out in [(110, 55), (26, 13), (13, 6), (3, 1), (2, 1), (1, 1)]:
    pad = layers.ceil_pool_padding(n, 3, 2)
    assert (n + pad - 3) // 2 + 1 == out


@pytest.mark.parametrize("over_n", [False, True])
def test_contrast_norm_conventions_match_the_formula(over_n):
  """alpha_over_n=False: b = a / (k + alpha sum a^2)^beta (Krizhevsky); True: alpha / n
  (cuda-convnet, Caffe, PyTorch); random inputs, constants unlike the defaults."""
  a = np.asarray(jax.random.normal(jax.random.PRNGKey(10), (2, 4, 4, 11)), np.float64) * 3
  k, n, alpha, beta = 1.0, 3, 0.5, 0.6
  want, _ = np_lrn(a, k, n, alpha / n if over_n else alpha, beta)
  got = layers.contrast_norm(jnp.asarray(a, jnp.float32), k, n, alpha, beta,
                             alpha_over_n=over_n)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_lrn_config_options_reach_the_model_and_the_default_is_unchanged():
  """norm1 = NumPy LRN of pool1 with config.model.lrn_*; the default config's model
  normalises with k=2, n=5, alpha=1e-4 (not divided by n), beta=0.75; bad values fail."""
  x = np.asarray(jax.random.uniform(jax.random.PRNGKey(9), (2, 64, 64, 1), minval=-128,
                                    maxval=128), np.float32)
  for over, want_args in (({}, (2.0, 5, 1e-4, 0.75)),
                          ({"lrn_k": 1.0, "lrn_n": 3, "lrn_alpha": 1e-3, "lrn_beta": 0.5,
                            "lrn_alpha_over_n": True}, (1.0, 3, 1e-3 / 3, 0.5))):
    c = configs.default_config()
    c.model.name, c.model.conv_features, c.model.fc_features = "ZFNetLowRes", (8, 6, 6, 6, 6), 8
    c.model.update(over)
    models.validate(c.model)
    model = models.from_config(c.model, 3)
    variables = model.init(jax.random.PRNGKey(0), x[:1])
    f = model.apply(variables, x, method="features")
    want, _ = np_lrn(np.asarray(f["pool1"], np.float64), *want_args)
    np.testing.assert_allclose(f["norm1"], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  for key, bad in (("lrn_k", 0.0), ("lrn_n", 0), ("lrn_alpha", -1.0), ("lrn_beta", float("nan"))):
    c = configs.default_config()
    c.model[key] = bad
    with pytest.raises(ValueError, match=f"model.{key}="):
      models.validate(c.model)
