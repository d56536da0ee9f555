"""Feature-evolution grids come from the evolution checkpoints (Fig. 4)."""
import glob
import os
import types

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from clu import metric_writers

from zfnet_jax import deconv, rundir
from zfnet_jax.analyses import evolution
from zfnet_jax.data import iterators
from zfnet_jax.nn import models
from zfnet_jax.render import content
from zfnet_jax.training import checkpoints, weights

import helpers


def brute_force_tile(model, variables, images, layer, ch):
  """Strongest activation by a plain NumPy argmax, projected (deconvnet) at that position
  and cropped.  ``model``: one of ours (deconv.project) or a hand-built CNN's
  deconv.Network (deconv.project_fn of its features)."""
  net = deconv.as_network(model)
  features = lambda x: net.features(variables, x)
  f = np.asarray(features(images)[layer][..., ch])
  n, i, j = np.unravel_index(np.argmax(f), f.shape)
  if model is net:
    p = deconv.project_fn(features, images[n:n + 1], output=layer, channel=ch, position=(i, j))
  else:
    p = deconv.project(model, variables, images[n:n + 1], layer=layer, channel=ch,
                       position=(i, j))
  return helpers.crop_to_field(deconv.to_image(p[0]), net.receptive_fields(images.shape[1])[layer],
                       i, j)


def nearest(tile, t):
  """(s, s, C) -> (t, t, C) by nearest neighbours, sampled at the pixel centres."""
  idx = np.floor((np.arange(t) + 0.5) * tile.shape[0] / t).astype(int)
  return tile[np.ix_(idx, idx)]


def train_images(workdir, n):
  """The first ``n`` training examples of a run (its cached pixel mean subtracted)."""
  config = checkpoints.load_config(workdir)
  batch = next(iterators.create_eval_iterator(config, workdir, split="train", batch_size=n))
  return np.asarray(batch["image"])


def test_strongest_equals_numpy_argmax():
  model = models.ZFNetLowRes(num_classes=3, conv_features=(4, 6, 6, 6, 8), fc_features=8)
  images = np.asarray(np.random.default_rng(0).normal(size=(5, 64, 64, 1)) * 50, np.float32)
  variables = {"params": model.init(jax.random.PRNGKey(0), images[:1])["params"]}
  best = evolution.strongest(model, variables, images, ["conv1", "conv3"], [1, 3], batch_size=2)
  f = model.apply(variables, images, method="features")
  for layer in ("conv1", "conv3"):
    for k, ch in enumerate([1, 3]):
      a = np.asarray(f[layer][..., ch])
      n, i, j = np.unravel_index(np.argmax(a), a.shape)
      assert (best[layer][0][k], *best[layer][1][k]) == (n, i, j)
      np.testing.assert_allclose(best[layer][2][k], a.max(), rtol=1e-5)
  with pytest.raises(ValueError, match=r"evolution map \[6\] out of range for conv2"):
    evolution.check(model, 64, ["conv2"], [0, 6])
  with pytest.raises(ValueError, match="fc6"):
    evolution.check(model, 64, ["fc6"], [0])


def test_tensorboard_panel_holds_the_projections_of_the_strongest_units():
  """Row = layer, column = map, 2 px white gaps: the deconvnet projection of the map's
  NumPy-argmax unit over the images, cropped to its receptive field (conv1 7 px; conv4's
  107 px field is larger than the 64 px image: the whole image; conv4's projection crosses
  conv3's ReLU with no pool between, where the rules differ), enlarged to 107 px by nearest
  neighbours, as grey uint8."""
  model = models.ZFNetLowRes(num_classes=3, conv_features=(4, 6, 6, 6, 8), fc_features=8)
  images = np.asarray(np.random.default_rng(1).normal(size=(5, 64, 64, 1)) * 50, np.float32)
  variables = {"params": model.init(jax.random.PRNGKey(1), images[:1])["params"]}
  layers, maps, t = ["conv1", "conv4"], [0, 1, 2], 107
  panel = evolution.tensorboard_panel(model, variables, images, layers, maps, tile=t)
  want = np.full((2 * t + 2, 3 * t + 2 * 2, 3), 255, np.uint8)
  for r, layer in enumerate(layers):
    for c, ch in enumerate(maps):
      tile = nearest(brute_force_tile(model, variables, images, layer, ch), t)
      assert tile.std() > 0.02, "degenerate test case: a flat tile"
      want[r * (t + 2):r * (t + 2) + t, c * (t + 2):c * (t + 2) + t] = np.round(tile * 255)
  assert panel.dtype == np.uint8 and panel.shape == want.shape
  assert np.abs(panel.astype(int) - want).max() <= 1


def test_strongest_and_tiles_of_a_hand_built_cnn():
  """On a Flax CNN that is not ours: the strongest activations by a NumPy argmax, and
  the backprop tiles by jax.vjp of its features, cropped to the hand-made fields."""
  net, variables = helpers.plain_network()
  cnn = helpers.PlainCNN()
  images = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (5, 32, 32, 1))) * 40
  feats = lambda x: cnn.apply(variables, x, method="features")
  f = jax.tree_util.tree_map(np.asarray, feats(images))
  layers, maps = ["c1", "c2", "p2"], [0, 3]
  best = evolution.strongest(net, variables, images, layers, maps, batch_size=2)
  t = evolution.tiles(net, variables, images, layers, maps, rule="backprop", batch_size=3,
                      tile=None)
  for layer in layers:
    rf = helpers.PLAIN_FIELDS[layer]
    assert t[layer].shape == (len(maps), rf.size, rf.size, 1)
    for k, ch in enumerate(maps):
      a = f[layer][..., ch]
      n, i, j = np.unravel_index(np.argmax(a), a.shape)
      assert (best[layer][0][k], *best[layer][1][k]) == (n, i, j)
      np.testing.assert_allclose(best[layer][2][k], a.max(), rtol=1e-5)
      out, vjp = jax.vjp(lambda x: feats(x)[layer], images[n:n + 1])
      (grad,) = vjp(_one_hot(out.shape, (0, i, j, ch)) * a.max())   # the activation projected
      grad = np.asarray(grad[0])
      crop = np.zeros((rf.size, rf.size, 1), np.float32)
      r0, c0 = rf.offset + i * rf.stride, rf.offset + j * rf.stride
      for r in range(rf.size):
        for c in range(rf.size):
          if 0 <= r0 + r < 32 and 0 <= c0 + c < 32:
            crop[r, c] = grad[r0 + r, c0 + c]
      want = np.clip(0.5 + crop / (2 * np.abs(crop).max()), 0, 1)
      np.testing.assert_allclose(t[layer][k], want, atol=1e-5)
  resized = evolution.tiles(net, variables, images, ["c1"], [0], rule="backprop", tile=20)
  assert resized["c1"].shape == (1, 20, 20, 1)


def _one_hot(shape, index):
  x = np.zeros(shape, np.float32)
  x[index] = 1.0
  return x


@pytest.mark.slow  # trains (or uses the session's tiny trained run)
def test_grids_come_from_evolution_checkpoints(tiny_workdir):
  images = train_images(tiny_workdir, 32)
  ckpts = rundir.evolution_checkpoints(tiny_workdir)
  assert len(ckpts) >= 2
  model, _, _ = weights.load_trained(tiny_workdir)
  loaders = [(e, (lambda s=s: weights.load_trained(tiny_workdir, s)[1])) for e, s in ckpts]
  epochs, g = evolution.grids(model, loaders, images, ["conv1", "conv2"], [0, 1, 2], tile=None,
                              progress=False)
  assert epochs == [e for e, _ in ckpts]
  for e, (_, step) in enumerate(ckpts):
    model, variables, _ = weights.load_trained(tiny_workdir, step)
    for k, layer in enumerate(("conv1", "conv2")):
      for m in range(3):
        want = brute_force_tile(model, variables, images, layer, m)
        np.testing.assert_allclose(g[layer][e][m], want, atol=2e-3)
  # training changed the features: the first and last epochs' tiles differ
  assert np.abs(g["conv1"][0] - g["conv1"][-1]).max() > 0.01
  # variables given directly: the same grids
  _, variables, _ = weights.load_trained(tiny_workdir, ckpts[-1][1])
  _, g2 = evolution.grids(model, [(ckpts[-1][0], variables)], images, ["conv1"], [0, 1, 2],
                          tile=None, progress=False)
  np.testing.assert_allclose(g2["conv1"][0], g["conv1"][-1])


@pytest.mark.slow  # trains (or uses the session's tiny trained run)
def test_tensorboard_hook_writes_images(tiny_workdir, tmp_path):
  model, variables, _ = weights.load_trained(tiny_workdir)
  images = train_images(tiny_workdir, 8)
  assert evolution.tensorboard_hook(model, images, layers=("conv1", "conv2"), maps=(0, 1),
                                    every=0) is None   # 0 = off
  with pytest.raises(ValueError, match=r"evolution map \[99\]"):
    evolution.tensorboard_hook(model, images, layers=("conv1",), maps=(99,), every=0)
  hook = evolution.tensorboard_hook(model, images, layers=("conv1", "conv2"), maps=(0, 1),
                                    every=5)
  state = types.SimpleNamespace(params=variables["params"])
  writer = metric_writers.create_default_writer(str(tmp_path), asynchronous=False)
  hook(3, state, writer)      # not a multiple of 5: nothing
  hook(10, state, writer)
  writer.close()
  tags = [(e.step, v.tag) for f in glob.glob(str(tmp_path / "events.out.tfevents.*"))
          for e in tf.compat.v1.train.summary_iterator(f) for v in e.summary.value]
  assert tags == [(10, "evolution/projections")]


@pytest.mark.slow  # trains (or uses the session's tiny trained run)
def test_training_writes_projection_images_to_tensorboard(tiny_workdir):
  """The training loop calls the evolution hook (every 24 of the 48 steps in tiny_config)."""
  tags = [(e.step, v.tag) for f in glob.glob(os.path.join(tiny_workdir, "events.out.tfevents.*"))
          for e in tf.compat.v1.train.summary_iterator(f) for v in e.summary.value
          if v.tag.startswith("evolution/")]
  assert tags == [(24, "evolution/projections"), (48, "evolution/projections")]


def _options(**kw):
  o = ml_collections.ConfigDict(dict(enabled=True, layers=("c1", "c2"), maps=(0, 1),
                                     max_examples=4, tensorboard_every_steps=0,
                                     tensorboard_maps=(0, 1, 2, 3)))
  o.update(kw)
  return o


def test_sections_of_a_hand_built_cnn(tmp_path):
  net, v1 = helpers.plain_network(seed=0)
  _, v2 = helpers.plain_network(seed=1)
  data = content.Data("plain", 32, 32, 1)
  options = evolution.validate(_options(), net, data)
  assert options == evolution.Options(("c1", "c2"), (0, 1), 4, 6)
  for kw, match in ((dict(maps=(0, 5)), r"evolution map \[5\] out of range for c1"),
                    (dict(layers=("logits",)), "evolution layer 'logits'"),
                    (dict(max_examples=0), "evolution.max_examples 0 not allowed: >= 1"),
                    (dict(maps=(), num_maps=0), "evolution.num_maps 0 not allowed"),
                    (dict(tensorboard_every_steps=10, tensorboard_maps=(4,)),
                     r"evolution map \[4\] out of range for c1")):
    with pytest.raises(ValueError, match=match):
      evolution.validate(_options(**kw), net, data)
  evolution.validate(_options(tensorboard_maps=(4,)), net, data)   # TensorBoard off: unchecked
  images = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (6, 32, 32, 1))) * 40
  asked = []

  def train_batches(n):
    asked.append(n)
    return evolution._array_batches(images[:n], 3)
  ctx = content.Context(net=net, variables=v1, images=images[:2], labels=np.array([0, 1]),
                         ids=np.array([0, 1]), pixel_mean=np.zeros((32, 32, 1), np.float32),
                         class_names=("a", "b", "c"), out_dir=str(tmp_path), data=data,
                         train_batches=train_batches, checkpoints=[(1.0, v1), (2.5, lambda: v2)],
                         progress=False)
  (sec,) = evolution.sections(ctx, options)
  assert asked == [4]      # one pass serves both checkpoints
  assert (sec.title, sec.anchor) == ("Feature evolution", "evolution")
  assert [f for f, _ in sec.figures] == ["evolution_c1.png", "evolution_c2.png"]
  assert all((tmp_path / f).is_file() for f, _ in sec.figures)
  assert "epochs 1, 2.5" in sec.paragraphs[0] and "first 4 training" in sec.paragraphs[0]
  saved = np.load(tmp_path / "evolution.npz")
  np.testing.assert_allclose(saved["epochs"], [1.0, 2.5])
  np.testing.assert_array_equal(saved["maps_c1"], [0, 1])
  assert saved["num_examples"] == 4
  assert saved["c1"].shape == saved["c2"].shape == (2, 2, evolution.TILE, evolution.TILE, 1)
  for e, variables in enumerate((v1, v2)):
    for layer in ("c1", "c2"):
      for k, ch in enumerate((0, 1)):
        want = nearest(brute_force_tile(net, variables, images[:4], layer, ch), evolution.TILE)
        assert want.std() > 0.02, "degenerate test case: a flat tile"
        np.testing.assert_allclose(saved[layer][e][k], want, atol=2e-3)
  empty = content.Context(net=net, variables=v1, images=images[:2], labels=np.array([0, 1]),
                           ids=np.array([0, 1]), pixel_mean=None, class_names=(),
                           out_dir=str(tmp_path / "empty"), data=data)
  (sec,) = evolution.sections(empty, options)
  assert not sec.figures and "No evolution checkpoints" in sec.paragraphs[0]


def _search_context(net, variables, images, tmp_path, seed=0):
  data = content.Data("plain", 32, 32, 1)
  return content.Context(net=net, variables=variables[0], images=images[:2],
                          labels=np.array([0, 1]), ids=np.array([0, 1]),
                          pixel_mean=np.zeros((32, 32, 1), np.float32), class_names=(),
                          out_dir=str(tmp_path), data=data, seed=seed,
                          train_batches=lambda n: evolution._array_batches(images[:n], 4),
                          checkpoints=[(float(e), v) for e, v in enumerate(variables)],
                          progress=False)


def test_random_maps_are_reproducible_from_the_seed(tmp_path):
  """maps=() draws num_maps maps per layer with np.random.default_rng([seed, layer index,
  4]) (the documented procedure, redone here): the same seed gives the same maps, the
  page and evolution.npz show them; another seed, others."""
  net, v1 = helpers.plain_network(seed=0)
  data = content.Data("plain", 32, 32, 1)
  options = evolution.validate(_options(maps=(), num_maps=3, layers=("c1", "c2", "p2")), net,
                               data)
  widths = {"c1": 4, "c2": 6, "p2": 6}

  def want(seed):
    return {l: tuple(np.sort(np.random.default_rng([seed, n, 4]).choice(widths[l], 3,
                                                                        replace=False)))
            for n, l in enumerate(("c1", "c2", "p2"))}
  for seed in (0, 7):
    got = evolution.layer_maps(net, 32, options.layers, options, seed)
    assert got == want(seed) == evolution.layer_maps(net, 32, options.layers, options, seed)
  assert want(0) != want(7)
  images = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (6, 32, 32, 1))) * 40
  (sec,) = evolution.sections(_search_context(net, [v1], images, tmp_path, seed=7), options)
  saved = np.load(tmp_path / "evolution.npz")
  for l, m in want(7).items():
    np.testing.assert_array_equal(saved[f"maps_{l}"], m)
  assert "3 maps of each layer chosen at random (seed 7)" in sec.paragraphs[0]


def test_search_set_size_changes_the_winners_as_brute_force_predicts(tmp_path):
  """max_examples = N searches the first N training images: the saved winners (ids,
  positions, values; every checkpoint, one pass) equal a NumPy argmax over images[:N], and
  image 9 (image 1 x 3) takes over maps when N grows past it."""
  net, v1 = helpers.plain_network(seed=0)
  _, v2 = helpers.plain_network(seed=1)
  images = np.asarray(jax.random.normal(jax.random.PRNGKey(6), (12, 32, 32, 1))) * 40
  images[9] = 3 * images[1]
  layers, maps = ("c1", "p2"), (0, 1, 2, 3)
  winners = {}
  for n in (8, 12):
    options = evolution.validate(_options(layers=layers, maps=maps, max_examples=n), net,
                                 content.Data("plain", 32, 32, 1))
    evolution.sections(_search_context(net, [v1, v2], images, tmp_path / str(n)), options)
    saved = np.load(tmp_path / str(n) / "evolution.npz")
    assert saved["num_examples"] == n
    for e, v in enumerate((v1, v2)):
      f = jax.tree_util.tree_map(np.asarray, net.features(v, images[:n]))
      for l in layers:
        for k, ch in enumerate(maps):
          a = f[l][..., ch]
          i, r, c = np.unravel_index(np.argmax(a), a.shape)
          assert saved[f"ids_{l}"][e, k] == i
          np.testing.assert_array_equal(saved[f"positions_{l}"][e, k], (r, c))
          np.testing.assert_allclose(saved[f"values_{l}"][e, k], a.max(), rtol=1e-5)
    winners[n] = saved["ids_c1"]
  assert np.any(winners[8] != winners[12]) and np.any(winners[12] == 9)
