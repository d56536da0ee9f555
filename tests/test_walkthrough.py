"""The Fig. 1 walk-through: every stage is one NumPy step of the previous one, the
last is ``deconv.project``."""
import functools
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from zfnet_jax import deconv
from zfnet_jax.analyses import walkthrough
from zfnet_jax.nn import convert, models
from zfnet_jax.render import content

from helpers import (
  np_conv_down,
  np_lrn,
  np_pool,
  np_relu_down,
  np_unpool,
  plain_network,
)

SIZE = 64
GEOMETRY = {"conv1": (7, 2, 0), "conv2": (5, 2, 0), "conv3": (3, 1, 1), "conv4": (3, 1, 1),
            "conv5": (3, 1, 1)}   # Fig. 3's kernel, stride, padding


@functools.lru_cache(maxsize=None)
def tiny():
  """A narrow ZFNetLowRes with random He-normal weights and an image with flat regions
  (tied pool windows)."""
  model = models.ZFNetLowRes(num_classes=4, conv_features=(3, 4, 4, 4, 3), fc_features=5)
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(SIZE, SIZE, 1)) * 60).astype(np.float32)
  x[:, :SIZE // 3] = 0.0
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x[None])["params"]
  params = jax.tree_util.tree_map(
      lambda a: (np.zeros(a.shape) if len(a.shape) == 1 else
                 rng.normal(size=a.shape) * np.sqrt(2.0 / np.prod(a.shape[:-1])))
      .astype(np.float32), shapes)
  params["conv2"]["bias"][:] = [0.0, -50.0, 0.1, 0.0]   # a dead map: all-zero windows
  return model, {"params": jax.tree_util.tree_map(jnp.asarray, params)}, x


CASES = [("deconvnet", "conv5", 0, None), ("guided", "conv4", 2, (1, 1)),
         ("backprop", "conv3", 1, None), ("deconvnet", "pool1", 2, (4, 9)),
         ("guided", "norm2", 3, (0, 2)), ("deconvnet", "fc6", 1, None),
         ("backprop", "logits", 2, None)]


@pytest.mark.parametrize("rule,layer,channel,position", CASES)
def test_each_stage_is_one_numpy_step_and_the_last_is_project(rule, layer, channel, position):
  model, variables, x = tiny()
  stages = deconv.walkthrough(model, variables, x, layer=layer, channel=channel,
                              position=position, rule=rule)
  feats = {k: np.asarray(v[0], np.float64)
           for k, v in model.apply(variables, x[None], method="features").items()}
  params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables["params"])
  order = [s.name for s in model.layer_table(SIZE)]
  below = lambda name: feats[order[order.index(name) - 1]] if name != "conv1" else x

  # The one non-zero activation: the unit's own value (first maximum when not given).
  a = feats[layer].reshape(1, 1, -1) if feats[layer].ndim == 1 else feats[layer]
  pos = position or np.unravel_index(np.argmax(a[..., channel]), a.shape[:2])
  want = np.zeros_like(a)
  want[pos[0], pos[1], channel] = a[pos[0], pos[1], channel]
  assert stages[0].name == f"{layer}: unit" and stages[0].position == tuple(pos)
  assert np.abs(want).max() > 0, "degenerate test case: the unit is off"
  np.testing.assert_allclose(stages[0].signal, want, rtol=1e-5)

  expected = []   # the paper's order of steps, by name
  for name in reversed(order[:order.index(layer) + 1]):
    if name.startswith(("conv", "fc")):
      expected += [f"{name}: rectify", f"{name}: filter"]
    elif name == "logits":
      expected += ["logits: filter"]
    else:
      expected += [f"{name}: {'unpool' if name.startswith('pool') else 'normalise'}"]
  assert [s.name for s in stages[1:]] == expected

  for prev, stage in zip(stages, stages[1:]):
    r, name = np.asarray(prev.signal, np.float64), stage.layer
    if stage.step == "rectify":
      want = np_relu_down(r, feats[name].reshape(r.shape), rule)
    elif stage.step == "filter" and name in GEOMETRY:
      k, s, p = GEOMETRY[name]
      want = np_conv_down(r, params[name]["kernel"], s, p, below(name).shape[0])
    elif stage.step == "filter":
      w = params["fc8" if name == "logits" else name]["kernel"]
      want = (w @ r.reshape(-1)).reshape(np.shape(below(name)) if below(name).ndim == 3
                                         else (1, 1, -1))
    elif stage.step == "unpool":
      inp = below(name)
      hi = -(-max(inp.shape[0] - 3, 0) // 2) * 2 + 3 - inp.shape[0]
      _, sw = np_pool(inp, pad=((0, hi), (0, hi)))
      np.testing.assert_array_equal(stage.switches, sw, err_msg=stage.name)
      want = np_unpool(r, sw, inp.shape)
    else:
      assert stage.step == "normalise", stage.name
      want = np_lrn(below(name), 2.0, 5, 1e-4, 0.75)[1](r.copy())
    assert stage.signal.shape == want.shape, stage.name
    np.testing.assert_allclose(stage.signal, want, rtol=1e-4,
                               atol=1e-5 * np.abs(want).max() + 1e-12, err_msg=stage.name)
    assert (stage.switches is None) == (stage.step != "unpool")

  proj = deconv.project(model, variables, jnp.asarray(x[None]), layer=layer, channel=channel,
                        position=position, rule=rule)
  assert stages[-1].signal.shape == x.shape and np.abs(stages[-1].signal).max() > 0
  np.testing.assert_allclose(stages[-1].signal, np.asarray(proj[0]), rtol=1e-5,
                             atol=1e-5 * np.abs(proj).max())


def test_bad_arguments():
  model, variables, x = tiny()
  with pytest.raises(ValueError, match="unknown layer 'conv9'"):
    deconv.walkthrough(model, variables, x, layer="conv9", channel=0)
  with pytest.raises(ValueError, match="channel 4 out of range"):
    deconv.walkthrough(model, variables, x, layer="conv2", channel=4)
  with pytest.raises(ValueError, match=r"image must be \(S, S, C\)"):
    deconv.walkthrough(model, variables, np.stack([x, x]), layer="conv2", channel=0)
  with pytest.raises(ValueError, match="unknown rule 'zeiler'"):
    deconv.walkthrough(model, variables, x, layer="conv2", channel=0, rule="zeiler")
  net, other_vars = plain_network()
  with pytest.raises(ValueError, match="unknown layer 'conv1'; allowed: c1, c2"):
    deconv.walkthrough(net, other_vars, np.zeros((32, 32, 1), np.float32), layer="conv1",
                       channel=0)


def test_report_section_walks_down_from_each_layers_strongest_unit(tmp_path):
  """One figure and one .npz per layer; the unit is the NumPy argmax over the images, its
  arrays are the walk-through's stages; a bad layer is refused before any work."""
  model, variables, x = tiny()
  images = np.stack([x, x[::-1] * 0.5, np.roll(x, 9, axis=1)])
  net = deconv.network(model)
  data = content.Data("fake", SIZE, SIZE, 1)
  options = walkthrough.validate(ml_collections.ConfigDict({"layers": ()}), net, data)
  assert options.layers == ("conv1", "conv2", "conv3", "conv4", "conv5")
  with pytest.raises(ValueError, match="unknown walkthrough layer 'conv7'"):
    walkthrough.validate(ml_collections.ConfigDict({"layers": ("conv7",)}), net, data)
  context = content.Context(net=net, variables=variables, images=images,
                             labels=np.array([0, 1, 2]), ids=np.array([5, 6, 7]),
                             pixel_mean=np.full((SIZE, SIZE, 1), 128, np.float32),
                             class_names=("a", "b", "c", "d"), out_dir=str(tmp_path),
                             rule="guided")
  chosen = walkthrough.Options(("pool2", "fc6"))
  [sec] = walkthrough.sections(context, chosen)
  assert [f for f, _ in sec.figures] == [f"walkthrough_{l}.png" for l in chosen.layers]
  feats = model.apply(variables, images, method="features")
  for layer in chosen.layers:
    a = np.asarray(feats[layer])
    a = a.reshape(len(a), 1, 1, -1) if a.ndim == 2 else a
    n, i, j, c = np.unravel_index(np.argmax(a), a.shape)   # first maximum
    assert f"{layer}, map {c} at ({i}, {j})" in dict(sec.figures)[f"walkthrough_{layer}.png"]
    stages = deconv.walkthrough(model, variables, images[n], layer=layer, channel=int(c),
                                position=(int(i), int(j)), rule="guided")
    saved = np.load(tmp_path / f"walkthrough_{layer}.npz")
    assert list(saved) == [f"{k:02d}_{s.layer}_{s.step}" for k, s in enumerate(stages)]
    for key, s in zip(saved, stages):
      np.testing.assert_array_equal(saved[key], s.signal)
    assert (tmp_path / f"walkthrough_{layer}.png").stat().st_size > 1000


def test_walkthrough_uses_the_models_own_contrast_norm_constants():
  """With non-default LRN constants (strong enough to matter) the normalise stage is the
  NumPy LRN of those constants and the last stage still equals ``project``."""
  _, variables, x = tiny()
  model = models.ZFNetLowRes(num_classes=4, conv_features=(3, 4, 4, 4, 3), fc_features=5,
                             lrn_k=1.0, lrn_alpha=5e-3, lrn_alpha_over_n=True)
  stages = deconv.walkthrough(model, variables, x, layer="conv3", channel=1, rule="deconvnet")
  feats = {k: np.asarray(v[0], np.float64)
           for k, v in model.apply(variables, x[None], method="features").items()}
  norm = [(p, s) for p, s in zip(stages, stages[1:]) if s.name == "norm2: normalise"]
  (prev, stage), = norm
  want = np_lrn(feats["pool2"], 1.0, 5, 5e-3 / 5, 0.75)[1](np.asarray(prev.signal, np.float64))
  default = np_lrn(feats["pool2"], 2.0, 5, 1e-4, 0.75)[1](np.asarray(prev.signal, np.float64))
  assert not np.allclose(want, default, rtol=1e-3), "degenerate case: constants do not matter"
  np.testing.assert_allclose(stage.signal, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
  proj = deconv.project(model, variables, jnp.asarray(x[None]), layer="conv3", channel=1,
                        rule="deconvnet")
  np.testing.assert_allclose(stages[-1].signal, np.asarray(proj[0]), rtol=1e-5,
                             atol=1e-5 * np.abs(proj).max())


# -- torchvision's AlexNet, imported -------------------------------------------------

TV_SIZE = 99   # pool5 2x2: the adaptive average pool to 6x6 is not the identity
TV_GEOMETRY = {"conv1": (11, 4, 2), "conv2": (5, 1, 2), "conv3": (3, 1, 1), "conv4": (3, 1, 1),
               "conv5": (3, 1, 1)}   # torchvision's alexnet(): kernel, stride, padding


@functools.lru_cache(maxsize=None)
def imported_alexnet():
  """convert.from_torchvision of a random state dict with torchvision's keys and shapes."""
  rng = np.random.default_rng(3)
  shapes = {"features.0": (64, 3, 11, 11), "features.3": (192, 64, 5, 5),
            "features.6": (384, 192, 3, 3), "features.8": (256, 384, 3, 3),
            "features.10": (256, 256, 3, 3), "classifier.1": (4096, 9216),
            "classifier.4": (4096, 4096), "classifier.6": (5, 4096)}
  state = {}
  for key, shape in shapes.items():
    fan_in = int(np.prod(shape[1:]))
    state[key + ".weight"] = (rng.normal(size=shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    state[key + ".bias"] = (rng.normal(size=shape[0]) * 0.1).astype(np.float32)
  model, variables = convert.from_torchvision(state, "alexnet")
  x = rng.normal(size=(TV_SIZE, TV_SIZE, 3)).astype(np.float32)
  x[:, :30] = 0.0   # flat: tied pool windows
  return model, variables, x


def np_adaptive_average_down(r, n):
  """The VJP of torch's AdaptiveAvgPool2d from (n, n, C) to r's (m, m, C) by loops: bin i
  covers rows floor(i n / m) .. ceil((i + 1) n / m) - 1, each value spread evenly."""
  m = r.shape[0]
  bins = [(i * n // m, -(-(i + 1) * n // m)) for i in range(m)]
  out = np.zeros((n, n, r.shape[2]))
  for (i, (r0, r1)), (j, (c0, c1)) in itertools.product(enumerate(bins), enumerate(bins)):
    out[r0:r1, c0:c1] += r[i, j] / ((r1 - r0) * (c1 - c0))
  return out


@pytest.mark.parametrize("rule,layer,channel", [
    ("deconvnet", "conv5", 3), ("guided", "pool2", 7), ("backprop", "conv2", 1),
    ("deconvnet", "fc6", 11), ("guided", "fc7", 2), ("backprop", "logits", 4)])
def test_imported_torchvision_alexnet_walks_down_step_by_step(rule, layer, channel):
  """Every stage of torchvision's AlexNet (floor-mode pools, no normalisation, the adaptive
  average pool before fc6) is one NumPy step of the previous one; the last is project."""
  model, variables, x = imported_alexnet()
  stages = deconv.walkthrough(model, variables, x, layer=layer, channel=channel, rule=rule)
  feats = {k: np.asarray(v[0], np.float64)
           for k, v in model.apply(variables, x[None], method="features").items()}
  params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables["params"])
  order = [s.name for s in model.layer_table(TV_SIZE)]
  below = lambda name: feats[order[order.index(name) - 1]] if name != "conv1" else x
  expected = []
  for name in reversed(order[:order.index(layer) + 1]):
    expected += ([f"{name}: unpool"] if name.startswith("pool") else
                 ["logits: filter"] if name == "logits" else
                 [f"{name}: rectify", f"{name}: filter"] +
                 (["avgpool: average"] if name == "fc6" else []))
  assert [s.name for s in stages[1:]] == expected

  for prev, stage in zip(stages, stages[1:]):
    r, name = np.asarray(prev.signal, np.float64), stage.layer
    if stage.step == "rectify":
      want = np_relu_down(r, feats[name].reshape(r.shape), rule)
    elif stage.step == "filter" and name in TV_GEOMETRY:
      k, s, p = TV_GEOMETRY[name]
      want = np_conv_down(r, params[name]["kernel"], s, p, below(name).shape[0])
    elif stage.step == "filter":
      w = params["fc8" if name == "logits" else name]["kernel"]
      want = (w @ r.reshape(-1)).reshape((6, 6, -1) if name == "fc6" else (1, 1, -1))
    elif stage.step == "average":
      want = np_adaptive_average_down(r, feats["pool5"].shape[0])
    else:
      assert stage.step == "unpool", stage.name
      _, sw = np_pool(below(name))   # 3x3/2, floor mode: no padding
      np.testing.assert_array_equal(stage.switches, sw, err_msg=stage.name)
      want = np_unpool(r, sw, below(name).shape)
    assert stage.signal.shape == want.shape, stage.name
    np.testing.assert_allclose(stage.signal, want, rtol=1e-4,
                               atol=1e-5 * np.abs(want).max() + 1e-12, err_msg=stage.name)
  proj = deconv.project(model, variables, jnp.asarray(x[None]), layer=layer, channel=channel,
                        rule=rule)
  assert np.abs(stages[-1].signal).max() > 0
  np.testing.assert_allclose(stages[-1].signal, np.asarray(proj[0]), rtol=1e-5,
                             atol=1e-5 * np.abs(proj).max())


# -- any Network: the signal arriving at each named layer ----------------------------

@pytest.mark.parametrize("rule,layer,channel", [("deconvnet", "p2", 1), ("guided", "c2", 4),
                                                ("backprop", "p1", 2)])
def test_any_network_walks_down_through_its_named_layers(rule, layer, channel):
  """PlainCNN from from_features (c1 5x5 valid + ReLU, p1 2x2/2, c2 3x3 same + ReLU, p2):
  each stage is the NumPy step down to that named layer; the last is the projection."""
  net, variables = plain_network()
  rng = np.random.default_rng(1)
  x = (rng.normal(size=(32, 32, 1)) * 50).astype(np.float32)
  x[:, :10] = 0.0
  stages = deconv.walkthrough(net, variables, x, layer=layer, channel=channel, rule=rule)
  feats = {k: np.asarray(v[0], np.float64) for k, v in net.features(variables, x[None]).items()}
  w = {k: np.asarray(variables["params"][k]["kernel"], np.float64) for k in ("c1", "c2")}
  order = ["c1", "p1", "c2", "p2"]
  assert [s.name for s in stages] == (
      [f"{layer}: unit"] + [f"{n}: signal" for n in reversed(order[:order.index(layer)])] +
      ["input: projection"])
  a = feats[layer]
  pos = np.unravel_index(np.argmax(a[..., channel]), a.shape[:2])
  r = np.zeros_like(a)
  r[pos[0], pos[1], channel] = a[pos[0], pos[1], channel]
  assert np.abs(r).max() > 0 and stages[0].position == tuple(pos)
  np.testing.assert_allclose(stages[0].signal, r, rtol=1e-5)
  below = {"c1": x.astype(np.float64), "p1": feats["c1"], "c2": feats["p1"], "p2": feats["c2"]}
  geometry = {"c1": 0, "c2": 1}   # padding: VALID, SAME
  for name in reversed(order[:order.index(layer) + 1]):   # down through each layer
    if name.startswith("p"):
      _, sw = np_pool(below[name], window=2, stride=2)
      r = np_unpool(r, sw, below[name].shape)
    else:
      r = np_conv_down(np_relu_down(r, feats[name], rule), w[name], 1, geometry[name],
                       below[name].shape[0])
    stage = stages[1 + list(reversed(order[:order.index(layer) + 1])).index(name)]
    np.testing.assert_allclose(stage.signal, r, rtol=1e-4, atol=1e-5 * np.abs(r).max() + 1e-12,
                               err_msg=stage.name)
  proj = net.project(variables, jnp.asarray(x[None]), layer=layer, channels=np.array([channel]),
                     rule=rule)
  np.testing.assert_allclose(stages[-1].signal, np.asarray(proj[0]), rtol=1e-5,
                             atol=1e-6 * np.abs(proj).max())


def test_a_network_the_rewriter_cannot_walk_says_why_in_one_line():
  net, variables = plain_network()
  leaky = deconv.from_features(
      lambda v, x: {"c1": jax.nn.leaky_relu(net.features(v, x)["c1"])}, variables, 1,
      name="Leaky")
  with pytest.raises(ValueError, match=r"no walk-through of Leaky: .*leaky") as e:
    deconv.walkthrough(leaky, variables, np.ones((32, 32, 1), np.float32), layer="c1",
                       channel=0)
  assert "\n" not in str(e.value)


def test_report_section_for_any_network(tmp_path):
  net, variables = plain_network()
  rng = np.random.default_rng(2)
  images = (rng.normal(size=(2, 32, 32, 1)) * 50).astype(np.float32)
  context = content.Context(net=net, variables=variables, images=images,
                             labels=np.array([0, 1]), ids=np.array([3, 4]),
                             pixel_mean=np.full((32, 32, 1), 128, np.float32),
                             class_names=("a", "b", "c"), out_dir=str(tmp_path),
                             rule="deconvnet")
  [sec] = walkthrough.sections(context, walkthrough.Options(("c2", "p2")))
  assert [f for f, _ in sec.figures] == ["walkthrough_c2.png", "walkthrough_p2.png"]
  assert "known by its named layers" in sec.paragraphs[0]
  saved = np.load(tmp_path / "walkthrough_p2.npz")
  assert list(saved) == ["00_p2_unit", "01_c2_signal", "02_p1_signal", "03_c1_signal",
                         "04_input_projection"]


def test_report_section_for_torchvision_alexnet_from_fc6(tmp_path):
  """The walk-through figure of torchvision's AlexNet from fc6 (its average-pool stage)."""
  model, variables, x = imported_alexnet()
  context = content.Context(net=deconv.network(model), variables=variables, images=x[None],
                             labels=np.array([0]), ids=np.array([0]),
                             pixel_mean=np.zeros((TV_SIZE, TV_SIZE, 3), np.float32),
                             class_names=tuple("abcde"), out_dir=str(tmp_path),
                             rule="deconvnet")
  [sec] = walkthrough.sections(context, walkthrough.Options(("fc6",)))
  assert [f for f, _ in sec.figures] == ["walkthrough_fc6.png"]
  assert "03_avgpool_average" in np.load(tmp_path / "walkthrough_fc6.npz")
