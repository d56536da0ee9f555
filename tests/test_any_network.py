"""Any CNN (issue 19, item 2): receptive fields found by probing equal the ones derived by
hand or from the layer table; project_fn serves many requests in chunks and one
compilation serves every weight set."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zfnet_jax import deconv
from zfnet_jax.nn import geometry, models

import helpers


def test_probed_fields_of_a_hand_built_cnn_equal_the_hand_derivation():
  net, variables = helpers.plain_network()
  cnn = helpers.PlainCNN()
  probed = deconv.probe_receptive_fields(
      lambda v, x: cnn.apply(v, x, method="features"), variables, 1, 32)
  assert probed == helpers.PLAIN_FIELDS          # c1 5/1/0, p1 6/2/0, c2 10/2/-2, p2 12/4/-2


@pytest.mark.parametrize("name,size", [("ZFNet", 224), ("AlexNet", 227), ("ZFNetLowRes", 64)])
def test_probed_fields_of_our_models_give_the_layer_tables_windows(name, size):
  """Where the image shows the whole geometry (ZFNet at 224) it is found exactly; where
  windows are clipped on both sides (conv4 at 64 px) every unit's window still is."""
  model = getattr(models, name)(num_classes=3, conv_features=(4, 6, 6, 6, 6), fc_features=8,
                                dropout_rate=0.0)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 1)))
  variables = jax.tree.map(lambda a: jnp.abs(a) + 0.01, variables)   # no dead units
  probed = deconv.probe_receptive_fields(
      lambda v, x: model.apply(v, x, method="features"), variables, 1, size)
  want = geometry.receptive_fields(model, size)
  assert set(probed) == set(want)
  for layer, rf in want.items():
    side = geometry.layer_shapes(model, size)[layer][0]
    for i in range(side):
      assert probed[layer].window(i, i, size) == rf.window(i, i, size), (layer, i)
    if name == "ZFNet":
      assert probed[layer] == rf, layer


def test_probing_refuses_a_network_that_stops_nan():
  f = lambda v, x: {"c": jnp.where(x > 0, x, 0.0) * v}
  with pytest.raises(ValueError, match="receptive_fields="):
    deconv.probe_receptive_fields(f, jnp.float32(1.0), 1, 8)


def test_from_features_probes_once_per_size(monkeypatch):
  _, variables = helpers.plain_network()
  cnn = helpers.PlainCNN()
  calls = []
  real = deconv.probe_receptive_fields
  monkeypatch.setattr(deconv.networks, "probe_receptive_fields",
                      lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
  net = deconv.from_features(lambda v, x: cnn.apply(v, x, method="features"), variables, 1)
  assert net.receptive_fields(32) == helpers.PLAIN_FIELDS
  assert net.receptive_fields(32) == helpers.PLAIN_FIELDS
  assert calls == [32]


def _np_plain_backprop_c1(kernel, bias, image, channel, position=None):
  """Plain-gradient projection of c1's strongest unit (or the unit at ``position``) by
  hand: the gradient of one ReLU unit of a VALID 5x5 conv is its kernel slice placed at
  the unit's window."""
  x = image[..., 0]
  k = kernel[..., 0, channel]
  act = np.zeros((28, 28))
  for i in range(28):
    for j in range(28):
      act[i, j] = max((x[i:i + 5, j:j + 5] * k).sum() + bias[channel], 0.0)
  i, j = np.unravel_index(np.argmax(act), act.shape) if position is None else position
  out = np.zeros((32, 32))
  if act[i, j] > 0:
    out[i:i + 5, j:j + 5] = k * act[i, j]           # the one-hot cotangent holds the value
  return out


def test_project_fn_params_and_chunks():
  _, variables = helpers.plain_network()
  cnn = helpers.PlainCNN()
  fn = functools.partial(cnn.apply, method="features")    # defined once
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (5, 32, 32, 1)), np.float32)
  chans = np.array([0, 1, 2, 3, 1])
  other = jax.tree.map(lambda a: a * 1.5, variables)
  before = deconv.projection._project_fn_jit._cache_size()
  got = {}
  for name, v in (("a", variables), ("b", other)):
    for chunk in (None, 2):
      got[name, chunk] = np.asarray(deconv.project_fn(
          fn, x, channel=chans, output="c1", rule="backprop", params=v, chunk_size=chunk))
  # one compilation for the whole batch and one for chunks of 2, whatever the weights
  assert deconv.projection._project_fn_jit._cache_size() - before == 2
  for name, v in (("a", variables), ("b", other)):
    k = np.asarray(v["params"]["c1"]["kernel"])
    b = np.asarray(v["params"]["c1"]["bias"])
    for n in range(5):
      want = _np_plain_backprop_c1(k, b, x[n], chans[n])
      for chunk in (None, 2):
        np.testing.assert_allclose(got[name, chunk][n, ..., 0], want, rtol=1e-4,
                                   atol=1e-4 * np.abs(want).max())
  # Chosen units: one position for all images, or one per image.
  k, b = (np.asarray(variables["params"]["c1"][n]) for n in ("kernel", "bias"))
  for pos in ((6, 20), np.array([[0, 0], [27, 27], [3, 14], [14, 3], [9, 9]])):
    got = np.asarray(deconv.project_fn(fn, x, channel=chans, output="c1", rule="backprop",
                                       params=variables, position=pos, chunk_size=2))
    for n in range(5):
      want = _np_plain_backprop_c1(k, b, x[n], chans[n], tuple(np.broadcast_to(pos, (5, 2))[n]))
      np.testing.assert_allclose(got[n, ..., 0], want, rtol=1e-4,
                                 atol=1e-4 * max(np.abs(want).max(), 1e-6))
  with pytest.raises(ValueError, match="chunk_size"):
    deconv.project_fn(fn, x, channel=0, output="c1", params=variables, chunk_size=0)


def test_a_networks_defaults_are_the_deconvnet_and_no_progress_bar(capsys):
  """``Network.project`` without rule or progress: the deconvnet, silent.  At c1 (conv +
  ReLU, the unit active) the deconvnet's projection is the hand one of the gradient."""
  net, variables = helpers.plain_network()
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (3, 32, 32, 1)), np.float32)
  chans = np.array([2, 0, 3])
  got = np.asarray(net.project(variables, x, layer="c1", channels=chans))
  k, b = (np.asarray(variables["params"]["c1"][n]) for n in ("kernel", "bias"))
  for n in range(3):
    want = _np_plain_backprop_c1(k, b, x[n], chans[n])
    np.testing.assert_allclose(got[n, ..., 0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  assert capsys.readouterr().err == ""
  assert net.param(variables, "c1").shape == (5, 5, 1, 4)
  assert net.param((k, b), "c1") is None                       # pure-JAX params: no names
  assert net.param(variables, "c9") is None
