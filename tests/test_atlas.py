"""The feature atlas against independent references: a NumPy sort over every
activation, receptive fields found by perturbing pixels, and deconv.project."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from zfnet_jax import configs, deconv
from zfnet_jax.analyses import atlas
from zfnet_jax.nn import geometry, models
from zfnet_jax.render import content, figures

import helpers

S = 64  # ZFNetLowRes at 64x64: conv1 30, pool1 15, conv2 6, pool2 3, conv3-5 3, pool5 1


def _model(**kw):
  kw = dict(num_classes=3, conv_features=(4, 6, 8, 8, 6), fc_features=8) | kw
  return models.ZFNetLowRes(**kw)


def _init(model, seed=0):
  return jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, S, S, 1)))


def _batches(images, ids, labels, batch_size):
  """Like input_pipeline.create_eval_iterator: last batch padded, mask False."""
  for s in range(0, len(ids), batch_size):
    x, i, l = images[s:s + batch_size], ids[s:s + batch_size], labels[s:s + batch_size]
    pad = batch_size - len(i)
    yield {"image": np.concatenate([x, np.full((pad,) + x.shape[1:], 1e4, np.float32)]),
           "id": np.concatenate([i, -np.ones(pad, np.int64)]),
           "label": np.concatenate([l, np.zeros(pad, np.int32)]),
           "mask": np.arange(batch_size) < len(i)}


@pytest.fixture(scope="module")
def data():
  """21 images with shuffled ids (not ascending in a batch), one exact duplicate."""
  rng = np.random.default_rng(0)
  images = rng.normal(0, 50, (21, S, S, 1)).astype(np.float32)
  images[7] = images[2]                       # a tie across two examples
  ids = rng.permutation(np.arange(100, 121))
  labels = rng.integers(0, 3, 21).astype(np.int32)
  return images, ids, labels


def _brute_top_k(feats, ids, k):
  """NumPy: every (value, id, row, col) of each map, sorted by (-value, id, row*W+col)."""
  n, h, w, c = feats.shape
  vals = feats.transpose(3, 0, 1, 2).reshape(c, -1)
  eid = np.repeat(ids, h * w)
  pos = np.tile(np.arange(h * w), n)
  out_v, out_i, out_p = [], [], []
  for ch in range(c):
    order = np.lexsort((pos, eid, -vals[ch]))[:k]
    out_v.append(vals[ch][order])
    out_i.append(eid[order])
    out_p.append(np.stack([pos[order] // w, pos[order] % w], -1))
  return np.array(out_v), np.array(out_i), np.array(out_p)


def _brute_top_images(feats, ids, k):
  """NumPy, the paper's Fig. 2: per map, each image's maximum over positions at its first
  row-major argmax; images sorted by (-maximum, id); the first k (empty: id -1, -inf)."""
  n, h, w, c = feats.shape
  flat = feats.reshape(n, h * w, c)
  out_v, out_i, out_p = [], [], []
  for ch in range(c):
    best, arg = flat[:, :, ch].max(1), flat[:, :, ch].argmax(1)
    order = np.lexsort((ids, -best))[:k]
    pad = k - len(order)
    out_v.append(np.concatenate([best[order], np.full(pad, -np.inf)]))
    out_i.append(np.concatenate([ids[order], np.full(pad, -1)]))
    p = np.concatenate([arg[order], np.zeros(pad, int)])
    out_p.append(np.stack([p // w, p % w], -1))
  return np.array(out_v), np.array(out_i), np.array(out_p)


def _identity_net():
  """A deconv.Network whose only layer "x" is its input: hand-made activations."""
  return deconv.Network(features=lambda v, x: {"x": x}, layer_table=lambda s: [],
                        project=None, name="identity")


def test_distinct_images_when_one_image_has_the_9_largest_units():
  """Hand case: image id 5 holds the 9 largest units of map 0 (100..108); the other 11
  images' maxima are 1..11 (image id i: 12 - i, except id 5).  Distinct images: id 5, then
  the 8 best other images; per unit: id 5 nine times, at its units in value order."""
  n, h, w = 12, 4, 4
  act = np.zeros((n, h, w, 2), np.float32)
  for i in range(n):
    act[i, (i * 5) % h, (i * 3) % w, 0] = 12 - i          # one peak per image
  act[5, :, :, 0] = 0.0
  units = [(r, c) for r in range(h) for c in range(w)][3:12]
  for v, (r, c) in enumerate(units):
    act[5, r, c, 0] = 100 + v
  act[:, :, :, 1] = np.arange(h * w).reshape(h, w) % 3     # map 1: ties everywhere
  ids = np.arange(n)
  batches = lambda: _batches(act, ids, np.zeros(n, np.int32), 5)
  net = _identity_net()
  got = atlas.scan(net, {}, batches(), layers=["x"], k=9, progress=False).topk["x"]
  want = [5] + [i for i in np.argsort([-(12 - i) for i in range(n)], kind="stable")
                if i != 5][:8]
  np.testing.assert_array_equal(got.ids[0], want)
  assert got.ids[0].tolist() == [5, 0, 1, 2, 3, 4, 6, 7, 8]
  np.testing.assert_array_equal(got.positions[0, 0], units[-1])   # its strongest unit
  np.testing.assert_array_equal(got.values[0], [108, 12, 11, 10, 9, 8, 6, 5, 4])
  np.testing.assert_array_equal(got.ids[1], np.arange(9))          # ties: the lower ids,
  np.testing.assert_array_equal(got.positions[1], np.tile([[0, 2]], (9, 1)))  # first max
  v, i, p = _brute_top_images(act, ids, 9)
  np.testing.assert_array_equal(got.ids, i)
  np.testing.assert_array_equal(got.positions, p)
  np.testing.assert_array_equal(got.values, v)
  per_unit = atlas.scan(net, {}, batches(), layers=["x"], k=9, progress=False,
                        distinct_images=False).topk["x"]
  np.testing.assert_array_equal(per_unit.ids[0], np.full(9, 5))
  np.testing.assert_array_equal(per_unit.positions[0], units[::-1])
  v, i, p = _brute_top_k(act, ids, 9)
  np.testing.assert_array_equal(per_unit.ids, i)
  np.testing.assert_array_equal(per_unit.positions, p)


@pytest.mark.parametrize("h", [7, 300])   # the running-maximum loop, and plain reductions
def test_max_argmax_equals_numpy(h):
  """Per image and map: the maximum over positions and its first row-major argmax, with
  ties (a plateau of the maximum, all-zero maps) and -0.0."""
  rng = np.random.default_rng(1)
  act = np.maximum(rng.normal(size=(3, h, 5, 4)), 0).astype(np.float32)
  act[0, 2:5, 1:4, 0] = 9.0
  act[1, :, :, 1] = 0.0
  act[2, 0, 0, 2], act[2, :, :, 2] = -0.0, np.minimum(act[2, :, :, 2], 0.0)
  m, pos = jax.jit(atlas._max_argmax)(jnp.asarray(act))
  flat = act.reshape(3, -1, 4)
  np.testing.assert_array_equal(m, flat.max(1))
  np.testing.assert_array_equal(pos, flat.argmax(1))
  assert pos[0, 0] == 2 * 5 + 1 and pos[1, 1] == 0


@pytest.mark.parametrize("batch_size,k,distinct", [
    (8, 9, True), (8, 9, False), (16, 4, True),           # k < batch: maps are preselected
    pytest.param(16, 4, False, marks=pytest.mark.slow)])
def test_streaming_top_k_equals_brute_force_sort(data, batch_size, k, distinct):
  images, ids, labels = data
  model = _model()
  variables = _init(model)
  # conv2 map 0 dead (all zeros): its top-k is decided by the tie rule alone.
  params = jax.tree_util.tree_map(np.array, variables["params"])
  params["conv2"]["bias"][0] = -1e4
  variables = {"params": params}
  layers = ("conv1", "conv2", "pool2", "conv5")
  result = atlas.scan(model, variables, _batches(images, ids, labels, batch_size), layers=layers,
                      k=k, progress=False, distinct_images=distinct)
  assert result.num_examples == 21
  feats = jax.jit(lambda v, x: model.apply(v, x, method="features"))(variables, images)
  brute = _brute_top_images if distinct else _brute_top_k
  for layer in layers:
    v, i, p = brute(np.asarray(feats[layer]), ids, k)
    if distinct:
      assert all(len(set(row)) == k for row in result.topk[layer].ids), layer
    got = result.topk[layer]
    np.testing.assert_array_equal(got.ids, i, err_msg=layer)
    np.testing.assert_array_equal(got.positions, p, err_msg=layer)
    # Values to 1e-5 on purpose: XLA may sum a convolution in another order for a batch of
    # 8 than for all 21 images.  Ids and positions exactly: the only ties in these random
    # maps are exact zeros (ReLU), which every summation order computes alike.
    np.testing.assert_allclose(got.values, v, rtol=1e-5, atol=1e-5, err_msg=layer)
  dead = result.topk["conv2"]
  assert np.all(dead.values[0] == 0)
  if distinct:   # the k lowest ids, each at its first position
    np.testing.assert_array_equal(dead.ids[0], np.arange(100, 100 + k))
    np.testing.assert_array_equal(dead.positions[0], np.zeros((k, 2)))
  else:          # the lowest id, then row-major
    np.testing.assert_array_equal(dead.ids[0], np.full(k, 100))
    np.testing.assert_array_equal(dead.positions[0], [divmod(p, 6) for p in range(k)])
  # More slots than candidates: pool5 is 1x1, so 21 units fill k = 25, the rest are empty.
  r = atlas.scan(model, variables, _batches(images, ids, labels, 8), layers=["pool5"], k=25,
                 progress=False, distinct_images=distinct)
  v, i, _ = _brute_top_k(np.asarray(feats["pool5"]), ids, 21)
  np.testing.assert_array_equal(r.topk["pool5"].ids[:, :21], i)
  assert np.all(r.topk["pool5"].ids[:, 21:] == -1)
  assert np.all(r.topk["pool5"].values[:, 21:] == -np.inf)


def test_saved_atlas_round_trips_in_rank_order(built, data, tmp_path):
  """atlas_<layer>.npz holds, per shown map, the distinct images' ids, positions and
  values of the NumPy reference, best first; load() gives back what save() wrote."""
  model, variables, out, result, _, _ = built
  images, ids, _ = data
  feats = jax.jit(lambda v, x: model.apply(v, x, method="features"))(variables, images)
  for layer in ("conv2", "conv5"):
    a = out[layer]
    path = atlas.save(a, str(tmp_path / f"atlas_{layer}.npz"), distinct_images=True,
                      num_examples=result.num_examples)
    got = atlas.load(path)
    assert (got["layer"], got["distinct_images"], got["num_examples"]) == (layer, True, 21)
    for key in ("channels", "values", "ids", "positions", "labels"):
      np.testing.assert_array_equal(got[key], getattr(a, key), err_msg=key)
    v, i, p = _brute_top_images(np.asarray(feats[layer]), ids, 9)
    np.testing.assert_array_equal(got["ids"], i[a.channels])
    np.testing.assert_array_equal(got["positions"], p[a.channels])
    np.testing.assert_allclose(got["values"], v[a.channels], rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(got["values"], axis=1) <= 0)        # rank order



def test_merge_tie_goes_to_the_lower_id_not_the_larger_maximum():
  """Hand case: id 1 has the largest maximum (5) and also a 3; id 0's maximum is 3.
  By (-value, id, position) the top 2 are (5, id 1, col 0) and (3, id 0, col 0)."""
  act = jnp.asarray([[3.0, 0.0], [5.0, 3.0], [0.0, 0.0]]).reshape(3, 1, 2, 1)
  empty = np.iinfo(np.int32).max
  state = (jnp.full((1, 2), -jnp.inf), jnp.full((1, 2), empty, jnp.int32),
           jnp.zeros((1, 2), jnp.int32))
  values, ids, pos = atlas._merge_units(state, act, jnp.arange(3, dtype=jnp.int32),
                                  jnp.ones(3, bool))
  np.testing.assert_array_equal(values, [[5.0, 3.0]])
  np.testing.assert_array_equal(ids, [[1, 0]])
  np.testing.assert_array_equal(pos, [[0, 0]])

def _perturbation_windows(model, variables, layer):
  """Brute force receptive fields: with positive weights and inputs every path
  is active, so a unit changes iff a pixel it sees changes.  Returns
  {(i, j): (row0, row1, col0, col1)} bounding box of the pixels that move it."""
  base = np.full((1, S, S, 1), 10.0, np.float32)
  f = jax.jit(lambda x: model.apply(variables, x, method="features")[layer][..., 0])
  ref = np.asarray(f(base))[0]
  hits = []
  for start in range(0, S * S, 512):
    pix = np.arange(start, start + 512)
    x = np.repeat(base, 512, 0)
    x[np.arange(512), pix // S, pix % S, 0] += 1000.0
    hits.append(np.abs(np.asarray(f(x)) - ref) > 1e-3)
  hits = np.concatenate(hits).reshape(S, S, *ref.shape)  # pixel row, col, unit i, j
  boxes = {}
  for i in range(ref.shape[0]):
    for j in range(ref.shape[1]):
      rows, cols = np.nonzero(hits[:, :, i, j])
      boxes[(i, j)] = (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1)
  return boxes


@pytest.fixture(scope="module")
def positive():
  """A model whose weights are all positive (no contrast norm): every unit sees its
  whole receptive field."""
  model = _model(conv_features=(2, 2, 2, 2, 2), contrast_norm=False)
  variables = _init(model, 1)
  params = jax.tree_util.tree_map(lambda w: np.abs(np.asarray(w)) + 0.01, variables["params"])
  return model, {"params": params}


@pytest.mark.parametrize("layer", ["conv1", "pool1", "conv2", "conv5"])
def test_receptive_field_windows_match_perturbation(positive, layer):
  model, variables = positive
  rf = geometry.receptive_fields(model, S)[layer]
  for (i, j), box in _perturbation_windows(model, variables, layer).items():
    assert rf.window(i, j, S) == box, (layer, i, j)


@pytest.fixture(scope="module")
def built(data):
  model = _model()
  variables = _init(model, 2)
  images, ids, labels = data
  mean = np.full((S, S, 1), 120.0, np.float32)
  out, result = atlas.build(model, variables, _batches(images, ids, labels, 8), mean,
                            layers=("conv1", "pool1", "conv2", "conv5"), k=9, num_maps=3,
                            rule="guided", chunk_size=16, seed=3, progress=False)
  return model, variables, out, result, dict(zip(ids.tolist(), images)), mean


def test_patches_are_the_receptive_field_crops(built, positive):
  model, _, out, _, by_id, mean = built
  for layer in ("conv1", "pool1", "conv2"):
    boxes = _perturbation_windows(*positive, layer)
    a = out[layer]
    t = a.patches.shape[2]
    assert t == geometry.receptive_fields(model, S)[layer].size  # RF smaller than the image
    for m in range(len(a.channels)):
      for u in (0, 4, 8):
        r0, r1, c0, c1 = boxes[tuple(a.positions[m, u])]
        expect = np.clip((by_id[int(a.ids[m, u])][r0:r1, c0:c1] + mean[r0:r1, c0:c1]) / 255, 0, 1)
        tile = a.patches[m, u]
        # The part outside the image is grey, on the side where the window was clipped.
        dr = t - (r1 - r0) if r0 == 0 else 0
        dc = t - (c1 - c0) if c0 == 0 else 0
        np.testing.assert_allclose(tile[dr:dr + r1 - r0, dc:dc + c1 - c0], expect, atol=1e-6)
        assert np.sum(tile == 0.5) >= t * t - (r1 - r0) * (c1 - c0)
  # conv5 sees more than the 64x64 image: its tile is the whole image.
  a = out["conv5"]
  assert a.patches.shape[2] == S
  np.testing.assert_allclose(a.patches[0, 0], np.clip((by_id[int(a.ids[0, 0])] + mean) / 255,
                                                      0, 1), atol=1e-6)


def test_tiles_are_projections_of_the_recorded_units(built, positive):
  model, variables, out, result, by_id, _ = built
  for layer in ("conv2", "conv5"):
    a = out[layer]
    topk = result.topk[layer]
    np.testing.assert_array_equal(a.ids, topk.ids[a.channels])
    boxes = _perturbation_windows(*positive, layer) if layer == "conv2" else None
    for m, u in [(0, 0), (1, 4), (2, 8)]:
      c, (i, j) = int(a.channels[m]), a.positions[m, u]
      proj = deconv.project(model, variables, jnp.asarray(by_id[int(a.ids[m, u])])[None],
                            layer=layer, channel=c, position=(int(i), int(j)), rule="guided")
      img = deconv.to_image(proj)[0]
      if boxes is None:
        expect = img  # conv5: the whole image
      else:
        r0, r1, c0, c1 = boxes[(int(i), int(j))]
        t = a.projections.shape[2]
        expect = np.full((t, t, 1), 0.5, np.float32)
        dr = t - (r1 - r0) if r0 == 0 else 0
        dc = t - (c1 - c0) if c0 == 0 else 0
        expect[dr:dr + r1 - r0, dc:dc + c1 - c0] = img[r0:r1, c0:c1]
        # Nothing of the projection lies outside the receptive field.
        outside = np.ones(img.shape[:2], bool)
        outside[r0:r1, c0:c1] = False
        np.testing.assert_allclose(img[outside], 0.5, atol=1e-6)
      np.testing.assert_allclose(a.projections[m, u], expect, atol=1e-5)
      assert a.values[m, u] == pytest.approx(float(topk.values[c, u]))
    # The panel shows these tiles: left grid projections, right grid patches.
    panel = figures.atlas_panel(a.projections, a.patches, a.channels)
    k, t = 9, a.projections.shape[2]
    s = figures.tile_scale(t)
    assert figures.panel_origin(0, 0, "projection", t, k) == (figures.LABEL_H, 0)
    for m, u in [(0, 0), (1, 4), (2, 8)]:
      for which, tiles in (("projection", a.projections), ("patch", a.patches)):
        y, x = figures.panel_origin(m, u, which, t, k)
        shown = panel[y:y + t * s:s, x:x + t * s:s, 0]
        np.testing.assert_array_equal(shown, np.round(tiles[m, u, :, :, 0] * 255).astype(np.uint8))


def test_bad_options_are_rejected_before_work():
  model = _model()
  with pytest.raises(ValueError, match="'conv9'.*allowed: conv1"):
    atlas.check_options(model, S, layers=["conv1", "conv9"], k=9, rule="deconvnet")
  with pytest.raises(ValueError, match="'fc6'"):
    atlas.check_options(model, S, layers=["fc6"], k=9, rule="deconvnet")
  with pytest.raises(ValueError, match="'magic'.*deconvnet"):
    atlas.check_options(model, S, layers=["conv1"], k=9, rule="magic")
  with pytest.raises(ValueError, match="top_k.*0"):
    atlas.check_options(model, S, layers=["conv1"], k=0, rule="deconvnet")
  with pytest.raises(ValueError, match="num_maps.*-2"):
    atlas.check_options(model, S, layers=["conv1"], k=9, rule="deconvnet", num_maps=-2)
  report = ml_collections.ConfigDict(configs.default_config().report.to_dict()
                                     | {"distinct_images": "yes"})
  with pytest.raises(ValueError, match="distinct_images must be True.*'yes'"):
    atlas.validate(report, model, content.Data("x", S, S, 1))
  removed = _model(removed=("conv3",))
  with pytest.raises(ValueError, match="'conv3'"):
    atlas.check_options(removed, S, layers=["conv3"], k=9, rule="deconvnet")


def test_atlas_of_a_hand_built_cnn(tmp_path):
  """Fig. 2 for a Flax CNN that is not ours: the streaming top-k equals the NumPy sort, the
  patches are the hand-derived receptive fields, the tiles are gradient x value (backprop)."""
  net, variables = helpers.plain_network()
  cnn = helpers.PlainCNN()
  rng = np.random.default_rng(3)
  images = rng.normal(0, 40, (10, 32, 32, 1)).astype(np.float32)
  ids, labels = np.arange(50, 60), rng.integers(0, 3, 10).astype(np.int32)
  mean = np.full((32, 32, 1), 100.0, np.float32)
  out, result = atlas.build(net, variables, _batches(images, ids, labels, 4), mean,
                            layers=("c1", "p2"), k=3, num_maps=2, rule="backprop",
                            chunk_size=4, progress=False)
  feats = cnn.apply(variables, images, method="features")
  by_id = dict(zip(ids.tolist(), images))
  for layer in ("c1", "p2"):
    v, i, p = _brute_top_images(np.asarray(feats[layer]), ids, 3)   # the default mode
    np.testing.assert_array_equal(result.topk[layer].ids, i)
    np.testing.assert_array_equal(result.topk[layer].positions, p)
    np.testing.assert_allclose(result.topk[layer].values, v, rtol=1e-5, atol=1e-5)
    a, rf = out[layer], helpers.PLAIN_FIELDS[layer]
    for m, u in [(0, 0), (1, 2)]:
      c, (r, q), image = int(a.channels[m]), a.positions[m, u], by_id[int(a.ids[m, u])]
      r0, c0 = rf.offset + r * rf.stride, rf.offset + q * rf.stride   # may start outside
      full = np.full((32 + 2 * rf.size, 32 + 2 * rf.size, 1), 0.5, np.float32)
      full[rf.size:rf.size + 32, rf.size:rf.size + 32] = np.clip((image + mean) / 255, 0, 1)
      want = full[rf.size + r0:rf.size + r0 + rf.size, rf.size + c0:rf.size + c0 + rf.size]
      np.testing.assert_allclose(a.patches[m, u], want, atol=1e-6)
      # backprop rule = the plain gradient of the unit, times its value
      unit = lambda x: cnn.apply(variables, x, method="features")[layer][0, r, q, c]
      x = jnp.asarray(image)[None]
      grad = np.asarray(jax.grad(unit)(x)[0]) * float(unit(x))
      gfull = np.zeros((32 + 2 * rf.size, 32 + 2 * rf.size, 1), np.float32)
      gfull[rf.size:rf.size + 32, rf.size:rf.size + 32] = deconv.to_image(grad) - 0.5
      gwant = gfull[rf.size + r0:rf.size + r0 + rf.size, rf.size + c0:rf.size + c0 + rf.size]
      np.testing.assert_allclose(a.projections[m, u], gwant + 0.5, atol=1e-5)
