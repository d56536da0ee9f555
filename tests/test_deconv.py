"""The deconvnet against an independent NumPy reference (explicit loops), jax.grad,
and hand-built CNNs in Linen, NNX and pure JAX."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zfnet_jax import deconv
from zfnet_jax.deconv import rewrite
from zfnet_jax.nn import layers, models, rules

from helpers import LOWRES_GEOMETRY, np_forward, np_project

SIZE = 64


# ----------------------------------------------------------------------------
# Fixtures: a tiny ZFNet with many ties in its pools.
# ----------------------------------------------------------------------------

def random_params(model, x, seed):
  """He-normal kernels, zero biases, of the shapes ``model.init`` would make
  (abstract init only: nothing is compiled)."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
  rng = np.random.default_rng(seed)

  def make(a):
    if len(a.shape) == 1:
      return np.zeros(a.shape, np.float32)
    return (rng.normal(size=a.shape) * np.sqrt(2.0 / np.prod(a.shape[:-1]))).astype(np.float32)
  return jax.tree_util.tree_map(make, shapes)


@functools.lru_cache(maxsize=None)
def tiny():
  model = models.ZFNetLowRes(num_classes=4, conv_features=(3, 4, 4, 4, 3), fc_features=5)
  x = np.array(jax.random.normal(jax.random.PRNGKey(0), (2, SIZE, SIZE, 3)), np.float32)
  x[0, :, : SIZE // 2] = 0.0  # flat regions -> equal conv outputs -> tied pool windows
  x[1, 10:40, 20:50] = 0.0
  params = random_params(model, x[:1], seed=1)
  params["conv1"]["bias"][:] = [0.3, -50.0, 0.0]  # channel 1 dead: all-zero windows
  params["conv2"]["bias"][:] = [0.0, -50.0, 0.1, 0.0]
  params["conv5"]["bias"][:] = [0.0, 0.0, -50.0]
  params["fc6"]["bias"][:] = 0.1
  params["fc6"]["kernel"][:, 0] = [0.5, 0.7, -0.3]  # fc6 unit 0: on, and its signal gets down
  variables = {"params": jax.tree_util.tree_map(jnp.asarray, params)}
  return model, variables, jnp.asarray(x)


GEOMETRY = LOWRES_GEOMETRY


@functools.lru_cache(maxsize=None)
def reference():
  model, variables, x = tiny()
  return [np_forward(variables["params"], x[i], GEOMETRY) for i in range(x.shape[0])]


def test_reference_forward_matches_model_and_has_ties():
  model, variables, x = tiny()
  feats = jax.jit(lambda v, a: model.apply(v, a, method="features"))(variables, x)
  for i, (_, acts, ties) in enumerate(reference()):
    for name, a in acts.items():
      np.testing.assert_allclose(feats[name][i], a, rtol=1e-4, atol=1e-4 * np.abs(a).max() + 1e-6,
                                 err_msg=name)
    assert all(t > 0 for t in ties.values()), ties  # every pool layer has tied windows


@pytest.mark.parametrize("rule,layer,channel,position", [
    ("deconvnet", "conv5", 0, None),
    ("deconvnet", "pool2", 0, (1, 2)),
    ("deconvnet", "fc6", 0, None),
    ("guided", "conv5", 1, None),
    ("guided", "norm1", 0, (3, 5)),
    ("backprop", "conv4", 2, None),
])
def test_project_matches_numpy_reference(rule, layer, channel, position):
  model, variables, x = tiny()
  got = np.asarray(deconv.project(model, variables, x, layer=layer, channel=channel,
                                  position=position, rule=rule))
  assert got.shape == x.shape
  for i, (steps, acts, _) in enumerate(reference()):
    want = np_project(steps, acts, layer, channel, position, rule)
    assert np.abs(want).max() > 0, "degenerate test case"
    np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@functools.lru_cache(maxsize=None)
def tiny_alexnet():
  """A tiny AlexNet: conv1 11x11/4, conv2 5x5/1 pad 2, normalisation before pooling; its
  reference written in Krizhevsky's order."""
  _, _, x = tiny()
  model = models.AlexNetLowRes(num_classes=4, conv_features=(3, 4, 4, 4, 3), fc_features=5)
  variables = {"params": jax.tree_util.tree_map(jnp.asarray, random_params(model, x[:1], 2))}
  geometry = dict(GEOMETRY, conv1=(11, 4, 0), conv2=(5, 1, 2))
  return model, variables, x, [np_forward(variables["params"], x[i], geometry, norm_first=True)
                               for i in range(2)]


def test_feature_order_alexnet_normalises_before_pooling_zfnet_after():
  """Krizhevsky et al. 2012, Sec. 3.5: LRN after the ReLUs of conv1 and conv2, max-pooling
  after the LRN layers; Zeiler & Fergus, Fig. 3: max-pool, then contrast normalisation."""
  def order(model, size):    # the keys of features(), in the order the model makes them
    keys = []

    def run():
      out = model.init_with_output(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)),
                                   method="features")[0]
      keys.extend(out)
      return 0
    jax.eval_shape(run)
    return [k for k in keys if k[:4] in ("conv", "pool", "norm")]
  alexnet = ["conv1", "norm1", "pool1", "conv2", "norm2", "pool2", "conv3", "conv4", "conv5",
             "pool5"]
  zfnet = ["conv1", "pool1", "norm1", "conv2", "pool2", "norm2", "conv3", "conv4", "conv5",
           "pool5"]
  assert order(models.AlexNet(), 227) == order(models.AlexNetLowRes(), 64) == alexnet
  assert order(models.ZFNet(), 224) == order(models.ZFNetLowRes(), 64) == zfnet


def test_alexnet_forward_matches_a_reference_in_krizhevskys_order():
  model, variables, x, refs = tiny_alexnet()
  got = model.apply(variables, x, method="features")
  for i, (_, acts, _) in enumerate(refs):
    assert acts["norm1"].shape == acts["conv1"].shape     # normalised at conv1's size
    for name, want in acts.items():
      np.testing.assert_allclose(np.asarray(got[name][i]), want, rtol=1e-4,
                                 atol=1e-4 * np.abs(want).max() + 1e-6, err_msg=name)


@pytest.mark.parametrize("net", ["zfnet", "alexnet"])
@pytest.mark.parametrize("layer,rule", [("conv1", "guided"), ("pool1", "deconvnet"),
                                        ("norm1", "backprop"), ("conv2", "deconvnet"),
                                        ("conv2", "guided"), ("pool2", "deconvnet")])
def test_projection_of_units_at_the_edges_matches_numpy_reference(net, layer, rule):
  """Units in the corners, on the edges and inside the map, whose receptive fields the
  border and the padding cut (``project`` goes down only inside the field)."""
  if net == "zfnet":
    (model, variables, x), refs = tiny(), reference()
  else:
    model, variables, x, refs = tiny_alexnet()
  n = refs[0][1][layer].shape[0]
  nonzero = 0
  for row, col in [(0, 0), (0, n - 1), (n - 1, 0), (n - 1, n - 1), (n // 2, 1), (1, n // 2)]:
    channel = int(np.argmax(sum(acts[layer][row, col] for _, acts, _ in refs)))  # most alive
    got = np.asarray(deconv.project(model, variables, x, layer=layer, channel=channel,
                                    position=(row, col), rule=rule))
    for i, (steps, acts, _) in enumerate(refs):
      want = np_project(steps, acts, layer, channel, (row, col), rule)
      nonzero += np.abs(want).max() > 0
      np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-4 * np.abs(want).max() + 1e-7,
                                 err_msg=f"{layer} ({row}, {col}) image {i}")
  assert nonzero >= 5, "degenerate test case"


def test_backprop_equals_grad_times_value():
  model, variables, x = tiny()
  layer, ch, pos = "conv3", 1, (2, 1)
  got = deconv.project(model, variables, x, layer=layer, channel=ch, position=pos, rule="backprop")
  unit = lambda img: model.apply(variables, img[None], method="features")[layer][0, pos[0], pos[1], ch]
  value_and_grad = jax.jit(jax.value_and_grad(unit))
  for i in range(x.shape[0]):
    value, grad = value_and_grad(x[i])
    np.testing.assert_allclose(got[i], value * grad, rtol=1e-5, atol=1e-6)


def test_projection_starts_from_value_and_is_linear_in_it():
  model, variables, x = tiny()
  fn = rewrite.deconvnet_transform(
      lambda img: model.apply(variables, img, method="features")["conv5"], "deconvnet")
  i, j = 1, 2

  @jax.jit
  def down(c):  # the projection of c at unit (i, j) of map 0, and the activation
    act, vjp = jax.vjp(fn, x)
    return vjp(c[:, None, None, None] * jnp.zeros_like(act).at[:, i, j, 0].set(1.0))[0], act

  base, act = down(jnp.ones(2))
  for c in (0.5, 2.0, 7.0):
    np.testing.assert_allclose(down(jnp.full(2, c))[0], c * base, rtol=1e-5, atol=1e-7)
  got = deconv.project(model, variables, x, layer="conv5", channel=0, position=(i, j))
  np.testing.assert_allclose(got, act[:, i, j, 0][:, None, None, None] * base, rtol=1e-5, atol=1e-7)


def test_forward_identical_for_all_rules():
  model, variables, x = tiny()
  feats = [jax.jit(lambda a, r=r: model.clone(rule=r).apply(variables, a, method="features"))(x)
           for r in tuple(rules.RULES)]
  fn = lambda img: model.apply(variables, img, method="features")
  feats += [jax.jit(rewrite.deconvnet_transform(fn, r))(x) for r in tuple(rules.RULES)]
  for f in feats[1:]:
    for name in f:
      np.testing.assert_array_equal(f[name], feats[0][name])


def test_switches_equal_argmax_with_tie_rule():
  model, variables, x = tiny()
  sw = deconv.switches(model, variables, x)
  assert set(sw) == {"pool1", "pool2", "pool5"}
  for i, (steps, _, _) in enumerate(reference()):
    pools = [s for s in steps if s[0] == "pool"]
    for (_, _, want), name in zip(pools, ("pool1", "pool2", "pool5")):
      np.testing.assert_array_equal(sw[name][i], want, err_msg=name)


def test_project_many_matches_project_and_keeps_order():
  model, variables, x = tiny()
  imgs = jnp.concatenate([x, x[::-1], x[:1]])  # 5 requests
  layer = ["conv5", "conv2", "fc6", "conv5", "conv2"]
  channels = [0, 2, 0, 1, 0]
  positions = np.array([[1, 1], [0, 2], [0, 0], [2, 0], [5, 5]])
  got = deconv.project_many(model, variables, imgs, layer=layer, channels=channels,
                            positions=positions, rule="guided", chunk_size=2)
  for r in range(5):
    want = deconv.project(model, variables, imgs[r:r + 1], layer=layer[r], channel=channels[r],
                          position=tuple(positions[r]), rule="guided")
    np.testing.assert_allclose(got[r], want[0], rtol=1e-5, atol=1e-7)
  strongest = deconv.project_many(model, variables, x, layer="conv5", channels=[1, 1],
                                  chunk_size=1)
  np.testing.assert_allclose(strongest, deconv.project(model, variables, x, layer="conv5", channel=1),
                             rtol=1e-5, atol=1e-7)


def test_project_under_jit_and_per_image():
  model, variables, x = tiny()
  f = jax.jit(lambda imgs: deconv.project(model, variables, imgs, layer="conv5", channel=1))
  batched = f(x)
  for i in range(x.shape[0]):
    np.testing.assert_allclose(batched[i], f(x[i:i + 1])[0], rtol=1e-5, atol=1e-7)
  # The strongest unit: first maximum in row-major order of the map.
  pos, val = deconv.strongest(model, variables, x, layer="conv5", channel=1)
  for i, (_, acts, _) in enumerate(reference()):
    a = acts["conv5"][..., 1]
    assert tuple(pos[i]) == np.unravel_index(np.argmax(a), a.shape)
    np.testing.assert_allclose(val[i], a.max(), rtol=1e-4)
  by_pos = deconv.project(model, variables, x, layer="conv5", channel=1, position=np.asarray(pos))
  np.testing.assert_allclose(by_pos, batched, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kwargs,match", [
    (dict(layer="conv9", channel=0), "'conv9'.*conv1.*logits"),
    (dict(layer="conv1", channel=3), "channel 3 .*'conv1'.*0..2"),
    (dict(layer="conv1", channel=-1), "channel -1 .*0..2"),
    (dict(layer="conv5", channel=0, position=(3, 0)), r"\(3, 0\).*3x3.*'conv5'"),
    (dict(layer="fc6", channel=0, position=(0, 1)), r"\(0, 1\).*'fc6'"),
    (dict(layer="conv1", channel=0, rule="lrp"), "'lrp'.*backprop, deconvnet, guided"),
])
def test_bad_arguments(kwargs, match):
  model, variables, x = tiny()
  with pytest.raises(ValueError, match=match):
    deconv.project(model, variables, x, **kwargs)
  many = dict(layer=kwargs["layer"], channels=[kwargs["channel"]] * 2,
              rule=kwargs.get("rule", "deconvnet"))
  if "position" in kwargs:
    many["positions"] = [kwargs["position"]] * 2
  with pytest.raises(ValueError, match=match):
    deconv.project_many(model, variables, x, **many)


def test_images_of_other_channels_are_refused_before_work():
  model, variables, x = tiny()
  with pytest.raises(ValueError, match=r"images have 1 channels; the model takes 3 "
                                       r"\(shape \(2, 64, 64, 1\)\)"):
    deconv.project(model, variables, x[..., :1], layer="conv1", channel=0)
  with pytest.raises(ValueError, match=r"values up to 300; allowed: mean-subtracted pixels"):
    deconv.project(model, variables, jnp.full_like(x, 300.0), layer="conv1", channel=0)
  deconv.project(model, variables, jnp.full_like(x, 255.0), layer="conv1", channel=0)


def test_to_image_and_receptive_patch():
  p = np.zeros((2, 4, 4, 1), np.float32)
  p[0, 1, 2] = -3.0
  p[0, 0, 0] = 1.5
  img = deconv.to_image(p)
  assert img[0, 1, 2, 0] == 0.0 and img[0, 0, 0, 0] == 0.75 and img[0, 3, 3, 0] == 0.5
  assert (img[1] == 0.5).all()  # an all-zero projection is flat grey
  model, _, x = tiny()
  # conv2 at 64 px: field 27 px, stride 8, offset 0; unit (2, 3) sees rows 16..42, cols 24..50.
  crop = deconv.receptive_patch(model, x, "conv2", (2, 3))
  np.testing.assert_array_equal(crop, x[:, 16:43, 24:51])
  # conv3: field 75, offset -16 -> unit (0, 0) sees rows -16..58; outside is filled.
  crop = deconv.receptive_patch(model, x[0], "conv3", (0, 0), fill=-9.0)
  assert crop.shape == (75, 75, 3)
  assert (crop[:16] == -9.0).all() and (crop[:, :16] == -9.0).all()
  np.testing.assert_array_equal(crop[16:, 16:], x[0, :59, :59])
  np.testing.assert_array_equal(deconv.receptive_patch(model, x[0], "conv3", (0, 0), clip=True),
                                x[0, :59, :59])


# ----------------------------------------------------------------------------
# Any CNN: Linen with plain nn.relu / nn.max_pool, NNX, pure JAX.
# ----------------------------------------------------------------------------

class PlainCNN(nn.Module):
  """A small CNN written the ordinary way (nn.relu, nn.max_pool ceil-mode padding)."""
  ours: bool = False  # use zfnet_jax.nn.layers instead (the same function)
  rule: str = "backprop"

  @nn.compact
  def __call__(self, x):
    relu = (lambda v: layers.relu(v, self.rule)) if self.ours else nn.relu
    pool = ((lambda v: layers.max_pool(v, 3, 2)) if self.ours else
            (lambda v: nn.max_pool(v, (3, 3), (2, 2), padding=((0, 1), (0, 1)))))
    x = pool(relu(nn.Conv(4, (5, 5), (2, 2), padding="VALID", name="c1")(x)))  # 14 -> 7
    x = pool(relu(nn.Conv(5, (3, 3), padding=((1, 1), (1, 1)), name="c2")(x)))  # 7 -> 3
    return {"c2": x, "out": nn.Dense(3, name="d")(x.reshape(x.shape[0], -1))}


def _plain_setup():
  x = np.array(jax.random.normal(jax.random.PRNGKey(2), (3, 32, 32, 3)), np.float32)
  x[:, :16] = 0.0  # ties
  v = {"params": random_params(PlainCNN(), x[:1], seed=3)}
  v = jax.tree_util.tree_map(lambda a: a + 0.05 if a.ndim == 1 else a, v)  # nonzero biases
  return jnp.asarray(x), v


@pytest.mark.parametrize("rule", tuple(rules.RULES))
def test_transform_matches_our_layers_on_linen(rule):
  x, v = _plain_setup()
  got = deconv.project_fn(lambda img: PlainCNN().apply(v, img), x, output="c2", channel=2,
                          rule=rule)
  ours = lambda img: PlainCNN(ours=True, rule=rule).apply(v, img)["c2"]
  act, vjp = jax.vjp(ours, x)
  flat = act[..., 2].reshape(3, -1)
  k = jnp.argmax(flat, axis=1)
  ct = jnp.zeros_like(act).at[jnp.arange(3), k // act.shape[2], k % act.shape[2], 2].set(
      flat[jnp.arange(3), k])
  np.testing.assert_allclose(got, vjp(ct)[0], rtol=1e-5, atol=1e-7)
  assert float(jnp.abs(got).max()) > 0


def test_transform_on_nnx_and_pure_jax():
  x, v = _plain_setup()
  p = v["params"]
  want = deconv.project_fn(lambda img: PlainCNN().apply(v, img), x, output="out", channel=1)

  def pure(img):
    conv = lambda a, q, s, pad: jax.lax.conv_general_dilated(
        a, q["kernel"], (s, s), pad, dimension_numbers=("NHWC", "HWIO", "NHWC")) + q["bias"]
    pool = lambda a: jax.lax.reduce_window(a, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                           ((0, 0), (0, 1), (0, 1), (0, 0)))
    a = pool(jnp.maximum(conv(img, p["c1"], 2, "VALID"), 0))
    a = pool(jax.nn.relu(conv(a, p["c2"], 1, ((1, 1), (1, 1)))))
    return a.reshape(a.shape[0], -1) @ p["d"]["kernel"] + p["d"]["bias"]

  class NNXCNN(nnx.Module):
    def __init__(self, rngs):
      self.c1 = nnx.Conv(3, 4, (5, 5), (2, 2), padding="VALID", rngs=rngs)
      self.c2 = nnx.Conv(4, 5, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
      self.d = nnx.Linear(45, 3, rngs=rngs)

    def __call__(self, img):
      a = nnx.max_pool(nnx.relu(self.c1(img)), (3, 3), (2, 2), padding=((0, 1), (0, 1)))
      a = nnx.max_pool(nnx.relu(self.c2(a)), (3, 3), (2, 2), padding=((0, 1), (0, 1)))
      return self.d(a.reshape(a.shape[0], -1))

  net = NNXCNN(nnx.Rngs(0))
  for mod, name in ((net.c1, "c1"), (net.c2, "c2"), (net.d, "d")):
    mod.kernel.value = p[name]["kernel"]
    mod.bias.value = p[name]["bias"]
  for fn in (pure, net):
    got = deconv.project_fn(fn, x, channel=1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * float(jnp.abs(want).max()))
  assert float(jnp.abs(want).max()) > 0


def test_transform_names_what_it_cannot_handle():
  x = jnp.ones((1, 8, 8, 2))
  cases = {
      "scan": lambda a: jax.lax.scan(lambda c, _: (jax.nn.relu(c), None), a, None, length=2)[0],
      "cond": lambda a: jax.lax.cond(True, jax.nn.relu, lambda b: b, a),
      "window_dilation": lambda a: jax.lax.reduce_window(
          a, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 1, 1, 1), "VALID",
          window_dilation=(1, 2, 2, 1)),
      "init value": lambda a: jax.lax.reduce_window(a, 0.0, jax.lax.max, (1, 2, 2, 1),
                                                    (1, 1, 1, 1), "VALID"),
  }
  for match, fn in cases.items():
    with pytest.raises(rewrite.UnsupportedConstructError, match=match):
      rewrite.deconvnet_transform(fn, "deconvnet")(x)
  # Not a ReLU: max of two variables keeps its gradient (documented).
  y = rewrite.deconvnet_transform(lambda a: jnp.maximum(a, 2 * a), "deconvnet")(x)
  np.testing.assert_array_equal(y, 2 * x)
  with pytest.raises(ValueError, match="'nope'"):
    rewrite.deconvnet_transform(jax.nn.relu, "nope")


@pytest.mark.parametrize("name,fn", [
    ("jnp.maximum(x, 0)", lambda a: jnp.maximum(a, 0)),
    ("jnp.maximum(0, x)", lambda a: jnp.maximum(0, a)),
    ("jnp.clip(x, 0)", lambda a: jnp.clip(a, 0)),
    ("jnp.where(x > 0, x, 0)", lambda a: jnp.where(a > 0, a, 0.0)),
    ("x * (x > 0)", lambda a: a * (a > 0)),
    ("jax.nn.relu under jit", jax.jit(jax.nn.relu)),
    ("relu6", jax.nn.relu6),
])
def test_transform_finds_relu_patterns(name, fn):
  x = jnp.array([[-1.0, 0.0, 2.0, 3.0]])
  r = jnp.array([[1.0, -1.0, -2.0, 3.0]])
  want = {"deconvnet": [[1, 0, 0, 3]], "guided": [[0, 0, 0, 3]], "backprop": [[0, 0, -2, 3]]}
  for rule, expected in want.items():
    y, vjp = jax.vjp(rewrite.deconvnet_transform(fn, rule), x)
    np.testing.assert_array_equal(y, [[0, 0, 2, 3]], err_msg=name)
    np.testing.assert_array_equal(vjp(r)[0], expected, err_msg=f"{name} {rule}")


def test_transform_keeps_other_gradients():
  x = jnp.linspace(-2, 2, 7)
  for fn in (jax.nn.softplus, jax.nn.gelu, lambda a: jnp.maximum(a, a ** 2),
             lambda a: jax.nn.logsumexp(a) + jnp.sum(a * (a > 1))):  # x*(x>1) is no ReLU
    g = jax.grad(lambda a: jnp.sum(rewrite.deconvnet_transform(fn, "deconvnet")(a)))(x)
    np.testing.assert_allclose(g, jax.grad(lambda a: jnp.sum(fn(a)))(x), rtol=1e-6)


# Shapes of the tiny model at 64 px, written out by hand (rows, cols, channels).
TINY_SHAPES = {"conv1": (30, 30, 3), "pool1": (15, 15, 3), "norm1": (15, 15, 3),
               "conv2": (6, 6, 4), "pool2": (3, 3, 4), "norm2": (3, 3, 4), "conv3": (3, 3, 4),
               "conv4": (3, 3, 4), "conv5": (3, 3, 3), "pool5": (1, 1, 3), "fc6": (1, 1, 5),
               "fc7": (1, 1, 5), "logits": (1, 1, 4)}


def test_api_arguments_property():
  """Hypothesis: every bad layer/channel/position/rule is a ValueError naming it,
  raised before any computation; every good combination reaches the computation."""
  from unittest import mock

  from hypothesis import given, settings
  from hypothesis import strategies as st
  model, variables, x = tiny()
  calls = []

  def fake(*args, **kwargs):
    calls.append(kwargs["layer"])
    n = args[2].shape[0]
    return jnp.zeros_like(args[2]), jnp.zeros((n, 2), jnp.int32), jnp.zeros((n,))

  @settings(max_examples=150, deadline=None)
  @given(layer=st.sampled_from(list(TINY_SHAPES) + ["conv6", "fc8", "Conv1", ""]),
         channel=st.integers(-2, 8),
         position=st.none() | st.tuples(st.integers(-2, 32), st.integers(-2, 32)),
         rule=st.sampled_from(list(tuple(rules.RULES)) + ["lrp", "Deconvnet"]),
         many=st.booleans())
  def check(layer, channel, position, rule, many):
    shape = TINY_SHAPES.get(layer)
    bad = []
    if rule not in tuple(rules.RULES):
      bad.append(repr(rule))
    if shape is None:
      bad.append(repr(layer))
    else:
      if not 0 <= channel < shape[2]:
        bad.append(f"channel {channel}")
      if position is not None and not (0 <= position[0] < shape[0] and 0 <= position[1] < shape[1]):
        bad.append(str(position))
    calls.clear()
    with mock.patch.object(deconv.projection, "_project_batch", fake):
      try:
        if many:
          deconv.project_many(model, variables, x, layer=layer, channels=[channel] * 2,
                              positions=None if position is None else [position] * 2, rule=rule)
        else:
          deconv.project(model, variables, x, layer=layer, channel=channel, position=position,
                         rule=rule)
      except ValueError as e:
        assert bad, f"unexpected error: {e}"
        assert any(b in str(e) for b in bad), (str(e), bad)
        assert not calls  # nothing was computed
        return
    assert not bad, f"accepted bad arguments {bad}"
    assert calls == [layer]

  check()


@pytest.mark.parametrize("layer,convolutions", [("conv2", 4), ("conv5", 10)])
def test_projection_runs_only_the_layers_below_and_compiles_once(layer, convolutions):
  """Up to ``layer``: its convs forward and their transposes down, nothing above it (a
  network run whole would have 5 convolutions forward); repeated calls, with a fresh but
  equal model, reuse one compilation."""
  model, variables, x = tiny()
  args = (variables, x, jnp.zeros(2, jnp.int32), jnp.zeros((2, 2), jnp.int32), jnp.ones(2, bool))
  hlo = deconv.projection._project_batch.lower(model.clone(rule="deconvnet"), *args,
                                    layer=layer).compile().as_text()
  assert hlo.count(" convolution(") == convolutions
  deconv.project(model, variables, x, layer=layer, channel=0)
  size = deconv.projection._project_batch._cache_size()
  for rule in ("deconvnet", "deconvnet", "deconvnet"):
    again = models.ZFNetLowRes(num_classes=4, conv_features=(3, 4, 4, 4, 3), fc_features=5)
    deconv.project(again, variables, x, layer=layer, channel=1, rule=rule)
  assert deconv.projection._project_batch._cache_size() == size


def test_the_way_down_is_the_papers_order_of_steps():
  """From fc6 of torchvision's AlexNet (no norm layers; its adaptive average pool between
  pool5 and fc6) and from conv2 of ZFNet (ReLU, pool, then norm in layers 1 and 2): each
  layer rectified then filtered, pools unpooled, norms undone, in reverse order."""
  from zfnet_jax.deconv.projection import _plan   # pylint: disable=import-outside-toplevel
  from zfnet_jax.nn import torchvision           # pylint: disable=import-outside-toplevel
  tv = torchvision.TorchvisionAlexNet(num_classes=10)
  conv = lambda n: [(n, "conv", "rectify"), (n, "conv", "filter")]
  assert [(s.name, s.kind, step) for s, step in _plan(tv, 224, "fc6")] == (
      [("fc6", "fc", "rectify"), ("fc6", "fc", "filter"), ("avgpool", "pool", "average"),
       ("pool5", "pool", "unpool")] + conv("conv5") + conv("conv4") + conv("conv3")
      + [("pool2", "pool", "unpool")] + conv("conv2") + [("pool1", "pool", "unpool")]
      + conv("conv1"))
  z = models.ZFNetLowRes(num_classes=3, conv_features=(4, 4, 4, 4, 4), fc_features=8)
  assert [(s.name, step) for s, step in _plan(z, 64, "conv2")] == [
      ("conv2", "rectify"), ("conv2", "filter"), ("norm1", "normalise"),
      ("pool1", "unpool"), ("conv1", "rectify"), ("conv1", "filter")]


def test_projection_of_a_bfloat16_model_is_near_float32():
  """The same tiny ZFNet in float32 and bfloat16 (same weights): a conv2 projection
  computed in bfloat16 comes back in the images' dtype, within bfloat16's rounding of the
  float32 one (and not equal to it)."""
  m32 = models.ZFNetLowRes(num_classes=4, conv_features=(3, 4, 4, 4, 3), fc_features=5)
  m16 = models.ZFNetLowRes(num_classes=4, conv_features=(3, 4, 4, 4, 3), fc_features=5,
                           dtype=jnp.bfloat16)
  _, variables, x = tiny()
  x = x[1:2]
  act = np.asarray(m32.apply(variables, x, method="features")["conv2"][0, ..., 2])
  pos = np.unravel_index(np.argmax(act), act.shape)               # an active unit
  p32 = np.asarray(deconv.project(m32, variables, x, layer="conv2", channel=2, position=pos))
  p16 = deconv.project(m16, variables, x, layer="conv2", channel=2, position=pos)
  # The same unit through the rewriter (any network's path).
  by_fn = deconv.project_fn(lambda v, z: m16.apply(v, z, method="features"), x,
                            output="conv2", channel=2, position=pos, params=variables)
  assert p16.dtype == x.dtype and np.abs(p32).max() > 0
  for got in (p16, by_fn):
    np.testing.assert_allclose(np.asarray(got, np.float32), p32, atol=0.05 * np.abs(p32).max())
  assert not np.array_equal(p16, p32)

