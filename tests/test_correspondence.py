"""Delta (Sec. 4.3) vs a direct NumPy computation; box files; the shipped experiment."""
import itertools
import json

import jax
import numpy as np
import pytest

from zfnet_jax import models
from zfnet_jax.analyses import correspondence


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
