"""Delta (Sec. 4.3) vs a direct NumPy computation; box files; the shipped experiment."""
import csv
import itertools
import json

import jax
import numpy as np
import pytest

from zfnet_jax import configs
from zfnet_jax.analyses import correspondence
from zfnet_jax.nn import models
from zfnet_jax.render import content

import helpers


def direct_delta(eps):
  n = len(eps)
  s = [np.sign(e.ravel()) for e in eps]
  h = [np.sum(s[i] != s[j]) / s[i].size for i, j in itertools.permutations(range(n), 2)]
  return np.mean(h)


def test_delta_equals_formula():
  eps = np.array([[1.0, -2.0, 0.0, 3.0], [1.0, 2.0, 0.0, -1.0], [-1.0, 2.0, 5.0, -1.0]])
  # pairs: (0,1) 2/4, (0,2) 4/4, (1,2) 2/4 -> mean 2/3
  d, std = correspondence.delta(eps)
  np.testing.assert_allclose(d, 2 / 3)
  np.testing.assert_allclose(d, direct_delta(eps))
  np.testing.assert_allclose(std, np.std([.5, .5, 1, 1, .5, .5]))
  eps = np.random.default_rng(0).normal(size=(5, 3, 7))
  np.testing.assert_allclose(correspondence.delta(eps)[0], direct_delta(eps))


def test_consistent_set_gives_zero():
  base = np.random.default_rng(1).normal(size=50)
  eps = np.stack([base * k for k in (0.5, 1.0, 3.0, 7.0)])   # same signs, different sizes
  assert correspondence.delta(eps) == (0.0, 0.0)
  with pytest.raises(ValueError, match="at least 2"):
    correspondence.delta(eps[:1])


def test_measure_equals_direct_computation():
  model = models.ZFNetLowRes(num_classes=3, conv_features=(4, 6, 6, 6, 8), fc_features=16)
  images = np.asarray(np.random.default_rng(2).normal(size=(3, 64, 64, 1)) * 50, np.float32)
  variables = {"params": model.init(jax.random.PRNGKey(0), images[:1])["params"]}
  parts = {"a": np.array([[0, 0, 10, 12], [5, 5, 15, 17], [30, 40, 40, 52]])}
  res = correspondence.measure(model, variables, images, parts, ["conv5", "fc7"], repeats=2,
                               batch_size=2)
  f0 = model.apply(variables, images, method="features")
  occ = images.copy()
  for k, (r0, c0, r1, c1) in enumerate(parts["a"]):
    occ[k, r0:r1, c0:c1] = 0.0
  f1 = model.apply(variables, occ, method="features")
  for layer in ("conv5", "fc7"):
    eps = np.asarray(f0[layer]) - np.asarray(f1[layer])
    np.testing.assert_allclose(res["a"][layer][0], direct_delta(eps), atol=1e-12)
    assert 0 <= res["random"][layer][0] <= 1 and res["random"][layer][1] >= 0
  with pytest.raises(ValueError, match="conv7"):
    correspondence.measure(model, variables, images, parts, ["conv7"])


def test_random_control_is_one_box_in_every_image(monkeypatch):
  """Each random repeat occludes all images at one place; the places differ between repeats."""
  net, variables = helpers.plain_network()
  images = np.asarray(np.random.default_rng(6).normal(size=(4, 32, 32, 1)) * 50, np.float32)
  parts = {"a": np.array([[0, 0, 6, 6], [2, 2, 8, 8], [4, 4, 10, 10], [8, 8, 14, 14]])}
  seen = []
  occlude = correspondence.occlude
  monkeypatch.setattr(correspondence, "occlude",
                      lambda x, boxes, fill: seen.append(np.array(boxes)) or occlude(x, boxes, fill))
  correspondence.measure(net, variables, images, parts, ["c2"], repeats=5, seed=1)
  assert len(seen) == 1 + 5
  np.testing.assert_array_equal(seen[0], parts["a"])
  for boxes in seen[1:]:
    assert boxes.shape == (4, 4) and (boxes == boxes[0]).all()     # same box in every image
    assert (boxes[0, 2:] - boxes[0, :2] == 6).all()                 # the parts' mean size
    assert (boxes[0, :2] >= 0).all() and (boxes[0, 2:] <= 32).all()
  assert len({tuple(b[0]) for b in seen[1:]}) > 1                    # redrawn per repeat


def test_write_boxes_round_trips(tmp_path):
  ids = [4012, 17, 23051, 9, 30000]
  rng = np.random.default_rng(0)
  r0, c0 = rng.integers(0, 150, (2, 3, 5))
  parts = {name: np.stack([r0[k], c0[k], r0[k] + 30 + k, c0[k] + 20], 1)
           for k, name in enumerate(("left eye", "right eye", "nose"))}
  path = correspondence.write_boxes(str(tmp_path / "dogs.json"), ids, parts, 224,
                                    dataset="imagenet2012", split="validation",
                                    description="Five dogs.")
  doc = correspondence.load_boxes(path, 224, 256)
  assert doc["ids"] == ids and list(doc["parts"]) == list(parts)
  for name, boxes in parts.items():
    np.testing.assert_array_equal(doc["parts"][name], boxes)
  assert (doc["dataset"], doc["split"], doc["description"]) == (
      "imagenet2012", "validation", "Five dogs.")
  assert correspondence.box_file_dataset(path) == "imagenet2012"
  # at another crop side the boxes scale with it: 224 -> 112 halves them
  np.testing.assert_array_equal(correspondence.load_boxes(path, 112)["parts"]["nose"],
                                np.round(parts["nose"] / 2))
  with pytest.raises(ValueError, match="at least 2 distinct"):
    correspondence.write_boxes(str(tmp_path / "x.json"), [3, 3], parts, 224)
  with pytest.raises(ValueError, match="'nose': boxes of shape \\(5, 3\\)"):
    correspondence.write_boxes(str(tmp_path / "x.json"), ids, {"nose": np.ones((5, 3))}, 224)
  bad = dict(parts, nose=np.array([[0, 0, 10, 10]] * 4 + [[200, 0, 230, 10]]))
  with pytest.raises(ValueError, match="\\[200, 0, 230, 10\\] of image 30000 is empty or "
                     "outside the 224x224 input"):
    correspondence.write_boxes(str(tmp_path / "x.json"), ids, bad, 224)
  assert not (tmp_path / "x.json").exists()


def test_source_pixels_of_non_square_images(tmp_path):
  """A 300 x 400 (h x w) source: x 256/300, width 341 -> 42 px cut left, then the 224
  centre crop cuts 16 more; rows lose only the 16."""
  p = tmp_path / "b.json"
  p.write_text(json.dumps({"units": "source_pixels", "boxes": [
      {"image": 1, "part": "eye", "box": [30, 100, 90, 150], "source_size": [300, 400]},
      {"image": 2, "part": "eye", "box": [0, 0, 100, 100], "source_size": 100}]}))
  doc = correspondence.load_boxes(str(p), 224, 256)
  s = 256 / 300
  want = np.round([30 * s - 16, 100 * s - 42 - 16, 90 * s - 16, 150 * s - 42 - 16])
  np.testing.assert_array_equal(doc["parts"]["eye"][0], want)
  np.testing.assert_array_equal(doc["parts"]["eye"][1], [0, 0, 224, 224])   # clipped
  p.write_text(json.dumps({"units": "source_pixels", "boxes": [
      {"image": 1, "part": "eye", "box": [0, 0, 9, 9]},
      {"image": 2, "part": "eye", "box": [0, 0, 9, 9]}]}))
  with pytest.raises(ValueError, match="need source_size"):
    correspondence.load_boxes(str(p), 224, 256)


def test_box_file(tmp_path):
  doc = correspondence.load_boxes("experiments/correspondence_fashion_mnist.json", 64, 72)
  assert doc["ids"] == [19, 35, 59, 88, 113] and doc["dataset"] == "fashion_mnist_idx"
  # [3, 3, 11, 9] at 28 px -> x 72/28, minus the (72 - 64)/2 = 4 px crop: [3.7, 3.7, 24.3, 19.1]
  np.testing.assert_array_equal(doc["parts"]["left sleeve"][0], [4, 4, 24, 19])
  p = tmp_path / "b.json"
  p.write_text(json.dumps({"units": "input_pixels", "boxes": [
      {"image": 1, "part": "eye", "box": [0, 0, 4, 4]},
      {"image": 2, "part": "nose", "box": [0, 0, 4, 4]}]}))
  with pytest.raises(ValueError, match="'eye' has no box in images \\[2\\]"):
    correspondence.load_boxes(str(p), 64)
  p.write_text(json.dumps({"units": "cm", "boxes": []}))
  with pytest.raises(ValueError, match="cm"):
    correspondence.load_boxes(str(p), 64)


def _occluded(images, boxes, value):
  x = images.copy()
  for k, (r0, c0, r1, c1) in enumerate(boxes):
    x[k, r0:r1, c0:c1] = value
  return x


def test_measure_on_a_hand_built_cnn_equals_direct_computation():
  """Delta of a Flax CNN that is not ours, parts and the random control, written out."""
  net, variables = helpers.plain_network()
  apply = lambda x: helpers.PlainCNN().apply(variables, x, method="features")
  images = np.asarray(np.random.default_rng(4).normal(size=(3, 32, 32, 1)) * 50, np.float32)
  parts = {"a": np.array([[0, 0, 8, 10], [4, 6, 12, 16], [20, 20, 28, 30]]),
           "b": np.array([[10, 2, 16, 8], [12, 20, 18, 26], [2, 2, 8, 8]])}
  fill = np.full((32, 32, 1), 30.0, np.float32)
  layers = ["c2", "p2", "logits"]
  res = correspondence.measure(net, variables, images, parts, layers, fill, repeats=3, seed=5,
                               batch_size=2)
  f0 = apply(images)

  def pair_hamming(occluded):
    f = apply(occluded)
    out = {}
    for layer in layers:
      s = np.sign(np.asarray(f0[layer], np.float64) - np.asarray(f[layer], np.float64))
      s = s.reshape(3, -1)
      out[layer] = [np.mean(s[i] != s[j]) for i in range(3) for j in range(3) if i != j]
    return out

  def delta_of(occluded):
    return {l: (np.mean(h), np.std(h)) for l, h in pair_hamming(occluded).items()}

  for p, boxes in parts.items():
    want = delta_of(_occluded(images, boxes, 30.0))
    for layer in layers:
      np.testing.assert_allclose(res[p][layer], want[layer], atol=1e-12)
  # random control: the parts' mean box (7 x 8 px here) at one uniform place per repeat,
  # the same place in all 3 images; ± = std over the pairs of all 3 repeats pooled
  rng = np.random.default_rng(5)
  r, c = rng.integers(0, 32 - 7 + 1, 3), rng.integers(0, 32 - 8 + 1, 3)
  pooled = {layer: [] for layer in layers}
  for k in range(3):
    box = np.array([[r[k], c[k], r[k] + 7, c[k] + 8]] * 3)
    for layer, h in pair_hamming(_occluded(images, box, 30.0)).items():
      pooled[layer] += h
  for layer in layers:
    assert len(pooled[layer]) == 3 * 6
    np.testing.assert_allclose(res["random"][layer], (np.mean(pooled[layer]),
                                                      np.std(pooled[layer])), atol=1e-12)
  # the same rule for every row: a part that is the first random box gives the random row
  # of one repeat
  box = np.array([[r[0], c[0], r[0] + 7, c[0] + 8]] * 3)
  one = correspondence.measure(net, variables, images, {"p": box}, layers, fill, repeats=1,
                               seed=5)
  for layer in layers:
    assert one["p"][layer] == one["random"][layer]
  with pytest.raises(ValueError, match="unknown correspondence layer 'conv5'"):
    correspondence.measure(net, variables, images, parts, ["conv5"])
  with pytest.raises(ValueError, match="correspondence repeats 0 not allowed"):
    correspondence.measure(net, variables, images, parts, ["c2"], repeats=0)


def _box_file(path, dataset="toy", boxes=None):
  boxes = boxes or [[2, 3, 10, 12], [4, 4, 12, 13], [0, 20, 8, 29]]
  entries = [{"image": i, "part": "top", "box": b} for i, b in zip((3, 5, 11), boxes)] + \
            [{"image": i, "part": "side", "box": [16, 0, 24, 6]} for i in (3, 5, 11)]
  path.write_text(json.dumps({"dataset": dataset, "split": "test", "units": "input_pixels",
                              "description": "Toy boxes.", "boxes": entries}))
  return str(path)


def _options(boxes, layers=("c2", "p2"), repeats=2, fill=200.0):
  o = configs.default_config().analyses.correspondence
  o.boxes, o.layers, o.repeats = boxes, layers, repeats
  with o.unlocked():
    o.fill = fill
  return o


def test_validate(tmp_path):
  net, _ = helpers.plain_network()
  data = content.Data("toy", 32, 32, 1)
  path = _box_file(tmp_path / "boxes.json")
  o = correspondence.validate(_options(path), net, data)
  assert (o.boxes_path, o.layers, o.repeats, o.fill) == (path, ("c2", "p2"), 2, 200.0)
  assert o.boxes["ids"] == [3, 5, 11] and list(o.boxes["parts"]) == ["top", "side"]
  np.testing.assert_array_equal(o.boxes["parts"]["top"][2], [0, 20, 8, 29])
  other = correspondence.validate(_options(path), net, content.Data("other", 32, 32, 1))
  assert other.boxes is None and other.dataset == "toy"
  for options, match in ((_options(path, layers=("c2", "fc7")),
                          "unknown correspondence layer 'fc7'"),
                         (_options(path, repeats=0), "correspondence repeats 0 not allowed"),
                         (_options(str(tmp_path / "none.json")), "none.json"),
                         (_options(_box_file(tmp_path / "empty.json",
                                             boxes=[[2, 3, 2, 12]] * 3)), "is empty")):
    with pytest.raises(ValueError, match=match):
      correspondence.validate(options, net, data)


def test_sections_on_a_hand_built_cnn(tmp_path):
  net, variables = helpers.plain_network()
  images = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (3, 32, 32, 1))) * 40
  data = content.Data("toy", 32, 32, 1)
  options = correspondence.validate(_options(_box_file(tmp_path / "boxes.json")), net, data)
  asked = []

  def examples(ids, split=None):
    asked.append((list(ids), split))
    return images, np.array([0, 0, 0]), np.array(ids)

  mean = np.full((32, 32, 1), 100.0, np.float32)
  ctx = content.Context(net=net, variables=variables, images=images[:1], labels=np.array([0]),
                         ids=np.array([0]), pixel_mean=mean, class_names=("a", "b", "c"),
                         out_dir=str(tmp_path / "out"), data=data, seed=3, batch_size=2,
                         examples=examples)
  (sec,) = correspondence.sections(ctx, options)
  assert asked == [([3, 5, 11], "test")]
  assert (sec.title, sec.anchor) == ("Correspondence analysis", "correspondence")
  assert [f for f, _ in sec.figures] == ["correspondence_boxes.png"]
  assert sec.paragraphs[0] == f"Toy boxes. Boxes: {tmp_path / 'boxes.json'}."
  assert sec.paragraphs[1].endswith("Tables: correspondence.md and .csv.")
  header, rows = sec.tables[0]
  assert header == ["occluded", "Delta c2", "Delta p2"]
  assert [r[0] for r in rows] == ["top", "side", "random"]
  out = tmp_path / "out"
  assert (out / "correspondence_boxes.png").stat().st_size > 0
  assert (out / "correspondence.md").read_text(encoding="utf-8").splitlines()[2].startswith(
      "| top | ")
  # the csv holds the numbers of measure() with the occluder at pixel value 200 (= 100 + mean)
  want = correspondence.measure(net, variables, images, options.boxes["parts"], ["c2", "p2"],
                                np.full((32, 32, 1), 100.0, np.float32), repeats=2, seed=3)
  with open(out / "correspondence.csv", encoding="utf-8") as f:
    table = list(csv.reader(f))
  assert table[0] == ["occluded", "c2_mean", "c2_std", "p2_mean", "p2_std"]
  for row in table[1:]:
    np.testing.assert_allclose([float(v) for v in row[1:]],
                               [v for l in ("c2", "p2") for v in want[row[0]][l]], atol=1e-6)
  # a box file for another dataset: a note, no work
  skipped = correspondence.validate(_options(options.boxes_path), net,
                                    content.Data("other", 32, 32, 1))
  ctx_other = content.Context(net=net, variables=variables, images=images[:1],
                               labels=np.array([0]), ids=np.array([0]), pixel_mean=mean,
                               class_names=("a", "b", "c"), out_dir=str(tmp_path / "other"),
                               data=content.Data("other", 32, 32, 1))
  (note,) = correspondence.sections(ctx_other, skipped)
  assert note.anchor == "correspondence" and not note.figures and not note.tables
  assert note.paragraphs == [f"Skipped: the box file {options.boxes_path} is for dataset "
                             "'toy', this run uses 'other' (set analyses.correspondence.boxes)."]
