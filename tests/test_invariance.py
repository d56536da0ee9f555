"""Invariance curves vs a direct computation; transforms checked by hand."""
import jax
import numpy as np
import pytest

from zfnet_jax import models
from zfnet_jax.analyses import invariance

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
