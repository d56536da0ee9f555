"""Occlusion maps vs a plain Python loop over square positions, and by hand."""
import jax
import numpy as np
import pytest

from zfnet_jax import configs, deconv
from zfnet_jax.analyses import occlusion
from zfnet_jax.nn import models
from zfnet_jax.render import content
from zfnet_jax.report import report

import helpers

S = 64


@pytest.fixture(scope="module")
def tiny():
  model = models.ZFNetLowRes(num_classes=5, conv_features=(4, 6, 6, 6, 8), fc_features=16,
                             dropout_rate=0.0)
  x = jax.random.normal(jax.random.PRNGKey(1), (1, S, S, 1))
  variables = {"params": model.init(jax.random.PRNGKey(0), x)["params"]}
  return model, variables


def test_map_equals_python_loop(tiny):
  model, variables = tiny
  image = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (S, S, 1))) * 50
  fill = np.full((S, S, 1), 7.0, np.float32)
  s = occlusion.Settings(size=12, stride=8, fill=-1, layer="conv5", chunk_size=5)
  r = occlusion.scan(model, variables, image, 3, s, fill=fill)
  f0 = model.apply(variables, image[None], method="features")
  ch = int(np.argmax(np.asarray(f0["conv5"][0]).max((0, 1))))
  assert int(r["channel"]) == ch
  apply = jax.jit(lambda x: model.apply(variables, x, method="features"))
  n = -(-S // 8)
  assert r["activation"].shape == (n, n)
  for i in range(n):
    for j in range(n):
      x = image.copy()
      ci, cj = i * 8 + 4, j * 8 + 4            # cell centre; square [c-6, c+6) clipped
      x[max(ci - 6, 0):ci + 6, max(cj - 6, 0):cj + 6] = 7.0
      f = apply(x[None])
      p = np.asarray(jax.nn.softmax(f["logits"][0]))
      np.testing.assert_allclose(r["activation"][i, j], np.asarray(f["conv5"][0, ..., ch]).sum(),
                                 rtol=1e-4, atol=1e-4)
      np.testing.assert_allclose(r["prob_true"][i, j], p[3], rtol=1e-4, atol=1e-6)
      np.testing.assert_allclose(r["top_prob"][i, j], p.max(), rtol=1e-4, atol=1e-6)
      assert r["top_class"][i, j] == np.argmax(p)


def test_square_lands_where_the_map_says(tiny):
  # One bright spot on an all-mean (zero) image; zero biases, so occluding the
  # spot gives an all-zero input -> zero activation and uniform probabilities.
  model, variables = tiny
  image = np.zeros((S, S, 1), np.float32)
  image[20:22, 9:11] = 100.0
  s = occlusion.Settings(size=6, stride=4, fill=-1, layer="conv5", chunk_size=64)
  r = occlusion.scan(model, variables, image, 0, s)
  assert r["activation0"] > 0
  covered = np.isclose(r["activation"], 0.0)
  # By hand: cell (i, j) has centre (4i+2, 4j+2), square rows [4i-1, 4i+5).
  # It covers rows 20..21 only for i = 5 ([19, 25)) and columns 9..10 only for
  # j = 2 ([7, 13)); i = 4 gives [15, 21) (row 21 left out), j = 3 gives [11, 17).
  expected = np.zeros_like(covered)
  expected[5, 2] = True
  np.testing.assert_array_equal(covered, expected)
  np.testing.assert_allclose(r["prob_true"][5, 2], 1 / 5, rtol=1e-5)


def test_strongest_map_is_the_largest_single_activation(tiny):
  """Paper: the map with the largest activation in the unoccluded image, not the largest
  total.  Hand-built conv5 (3x3x8 at 64 px): map 0 = a constant c (bias), map 1 = a random
  kernel scaled so its peak is 2 with a total below 9c; max picks 1, the sum 0."""
  model, variables = tiny
  image = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (S, S, 1))) * 50
  p = jax.tree_util.tree_map(np.array, variables["params"])
  kernel, bias = np.zeros_like(p["conv5"]["kernel"]), np.zeros_like(p["conv5"]["bias"])
  kernel[..., 1] = np.asarray(jax.random.normal(jax.random.PRNGKey(3), kernel.shape[:3]))
  p["conv5"] = {"kernel": kernel, "bias": bias}
  raw = np.asarray(model.apply({"params": p}, image[None], method="features")["conv5"][0, ..., 1])
  kernel[..., 1] *= 2 / raw.max()
  total1 = raw.sum() * 2 / raw.max()
  bias[0] = (total1 / 9 + 2) / 2                      # total1 < 9 c and c < 2
  f = np.asarray(model.apply({"params": p}, image[None], method="features")["conv5"][0])
  assert np.argmax(f.sum((0, 1))) == 0 and np.argmax(f.reshape(-1, 8).max(0)) == 1
  np.testing.assert_allclose(f[..., 0], bias[0], rtol=1e-6)
  s = occlusion.Settings(size=12, stride=32, fill=-1, layer="conv5", chunk_size=4)
  r = occlusion.scan(model, {"params": p}, image, 0, s)
  assert int(r["channel"]) == 1
  hand = np.zeros((2, 3, 3))
  hand[0, 1, 1], hand[1] = 5.0, 1.0                   # map 0: peak 5, total 5; map 1: 9 x 1
  assert occlusion.strongest_map(np.moveaxis(hand, 0, -1)) == 0


def test_companions_are_the_top_images_of_the_map_but_the_occluded_one(tiny):
  """Top 9 images by the image's largest activation of the map, brute force over 14
  images in batches (padding masked); ``others`` leaves out the occluded image (id 107,
  same pixels), not another image under its id."""
  model, variables = tiny
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(11), (14, S, S, 1))) * 50
  ids = np.arange(100, 114)
  batches = [{"image": x[:8], "id": ids[:8], "mask": np.ones(8, bool)},
             {"image": np.concatenate([x[8:], x[:2]]), "id": np.concatenate([ids[8:], [0, 0]]),
              "mask": np.arange(8) < 6}]
  found = occlusion.companions(model, variables, iter(batches), "conv5", [1, 3], k=10)
  f = np.asarray(model.apply(variables, x, method="features")["conv5"])
  for row, ch in enumerate((1, 3)):
    a = f[..., ch].reshape(14, -1)
    order = sorted(range(14), key=lambda n: (-a[n].max(), ids[n]))[:10]
    np.testing.assert_array_equal(found["ids"][row], ids[order])
    slots = occlusion.others(found, row, 107, x[7])
    want = [ids[n] for n in order if n != 7][:9]
    np.testing.assert_array_equal(found["ids"][row][slots], want)
    np.testing.assert_array_equal(found["ids"][row][occlusion.others(found, row, 107, x[8])],
                                  ids[order][:9])
    np.testing.assert_allclose(found["values"][row], a[order].max(1), rtol=1e-6)
    w = f.shape[2]
    np.testing.assert_array_equal(found["positions"][row],
                                  [divmod(int(a[n].argmax()), w) for n in order])
  assert set(found["images"]) == set(found["ids"].ravel().tolist())


def test_squares_clip_at_border():
  np.testing.assert_array_equal(occlusion.squares(10, 4, 3), [[0, 3], [2, 6], [5, 9], [8, 10]])


def test_bad_settings(tiny):
  model, variables = tiny
  with pytest.raises(ValueError, match="conv9"):
    occlusion.check(occlusion.Settings(8, 4, -1, "conv9", 8), model, S)
  with pytest.raises(ValueError, match="size 80"):
    occlusion.check(occlusion.Settings(80, 4, -1, "conv5", 8), model, S)
  with pytest.raises(ValueError, match=r"\[9\]"):
    occlusion.scan(model, variables, np.zeros((S, S, 1)), 0,
                   occlusion.Settings(8, 4, -1, "conv5", 8), channel=9)


def _validate(config, model):
  """The report's validation of every analysis (what runs before any long work)."""
  data = content.Data(config.dataset.name, S, config.dataset.resize_size, 1)
  analyses = [e for e in report.REGISTRY if e.analysis]
  return report.validate(config, model, data, analyses)


def test_config_validated_before_work(tiny):
  model, _ = tiny
  c = configs.default_config()
  c.dataset.crop_size = S
  c.analyses.evolution.maps = (0, 1, 2, 3)         # the tiny model's conv1 has 4 maps
  _validate(c, model)                              # ImageNet config: Fashion-MNIST boxes skipped
  c.dataset.name, c.dataset.resize_size = "fashion_mnist_idx", 72
  _validate(c, model)                              # the defaults are valid
  for field, value, match in (("occlusion.layer", "fc7", "occlusion layer 'fc7'"),
                              ("occlusion.companion_examples", -1, "companion_examples -1"),
                              ("evolution.maps", (0, 8), r"evolution map \[8\]"),
                              ("invariance.layers", ("conv1", "fc9"), "fc9"),
                              ("correspondence.boxes", "missing.json", "missing.json"),
                              ("diagnostics.dead_threshold", 2.0, "2.0"),
                              ("walkthrough.layers", ("conv2", "conv9"),
                               "walkthrough layer 'conv9'")):
    bad = configs.default_config()
    bad.dataset.crop_size = S
    bad.dataset.name, bad.dataset.resize_size = "fashion_mnist_idx", 72
    bad.analyses.evolution.maps = (0, 1, 2, 3)
    section, name = field.split(".")
    bad.analyses[section][name] = value
    with pytest.raises(ValueError, match=match):
      _validate(bad, model)


def test_occlusion_of_a_hand_built_cnn_equals_a_python_loop():
  """The analysis on a Flax CNN that is not ours (no config, no workdir)."""
  net, variables = helpers.plain_network()
  cnn = helpers.PlainCNN()
  image = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (32, 32, 1))) * 40
  s = occlusion.Settings(size=8, stride=8, fill=-1, layer="c2", chunk_size=3)
  r = occlusion.scan(net, variables, image, 2, s)
  feats = lambda x: cnn.apply(variables, x[None], method="features")
  ch = int(np.argmax(np.asarray(feats(image)["c2"][0]).max((0, 1))))
  assert int(r["channel"]) == ch
  for i in range(4):
    for j in range(4):
      x = image.copy()
      x[i * 8:i * 8 + 8, j * 8:j * 8 + 8] = 0.0     # centre 8i+4, square [8i, 8i+8)
      f = feats(x)
      p = np.asarray(jax.nn.softmax(f["logits"][0]))
      np.testing.assert_allclose(r["activation"][i, j], np.asarray(f["c2"][0, ..., ch]).sum(),
                                 rtol=1e-4, atol=1e-4)
      np.testing.assert_allclose(r["prob_true"][i, j], p[2], rtol=1e-4, atol=1e-6)
      assert r["top_class"][i, j] == np.argmax(p)


def test_sections_on_a_hand_built_cnn(tmp_path):
  net, variables = helpers.plain_network()
  images = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (2, 32, 32, 1))) * 40
  data = content.Data("toy", 32, 32, 1)
  options = occlusion.validate(_occlusion_options("c2"), net, data)
  split = np.asarray(jax.random.normal(jax.random.PRNGKey(6), (12, 32, 32, 1))) * 40
  split[9] = images[1]                    # the occluded image 9 is in the scanned split
  batches = lambda: iter([{"image": split[i:i + 6], "id": np.arange(i, i + 6)}
                          for i in (0, 6)])
  ctx = content.Context(net=net, variables=variables, images=images, labels=np.array([0, 2]),
                         ids=np.array([7, 9]), pixel_mean=np.full((32, 32, 1), 100.0, np.float32),
                         class_names=("a", "b", "c"), out_dir=str(tmp_path), data=data,
                         split_batches=batches, split_name="toy")
  (sec,) = occlusion.sections(ctx, options)
  assert (sec.title, sec.anchor) == ("Occlusion sensitivity", "occlusion")
  assert [f for f, _ in sec.figures] == ["occlusion_7.png", "occlusion_7_others.png",
                                         "occlusion_9.png", "occlusion_9_others.png"]
  others = np.load(tmp_path / "occlusion_9.npz")["others_ids"]
  assert len(others) == 9 and 9 not in others and len(set(others.tolist())) == 9
  assert len(np.load(tmp_path / "occlusion_7.npz")["others_ids"]) == 9
  assert [row[:2] for row in sec.tables[0][1]] == [["7", "a"], ["9", "c"]]
  saved = np.load(tmp_path / "occlusion_9.npz")
  assert int(saved["label"]) == 2
  # (c): the projection of the map's strongest unit, cropped to its 10-px receptive field.
  cnn, ch = helpers.PlainCNN(), int(saved["channel"])
  features = lambda x: cnn.apply(variables, x, method="features")
  a = np.asarray(features(images[1:])["c2"][0, ..., ch])
  i, j = np.unravel_index(np.argmax(a), a.shape)
  assert tuple(saved["projection_position"]) == (i, j)
  p = deconv.project_fn(features, images[1:], output="c2", channel=ch, position=(i, j))
  want = helpers.crop_to_field(deconv.to_image(p[0]), helpers.PLAIN_FIELDS["c2"], i, j)
  assert saved["projection"].shape == (10, 10, 1) and want.std() > 0.02
  np.testing.assert_allclose(saved["projection"], want, atol=1e-5)
  assert (options.size, options.stride) == (8, 1)   # 56 and 8 px at 224, scaled to 32


def _occlusion_options(layer):
  o = configs.default_config().analyses.occlusion
  o.layer = layer
  return o
