"""Feature-evolution grids come from the evolution checkpoints (Fig. 4)."""
import os

import jax
import numpy as np
import pytest

from zfnet_jax import deconv, models, train
from zfnet_jax.analyses import evolution


def brute_force_tile(model, variables, images, layer, ch):
  """Strongest activation by a plain NumPy argmax, projected and cropped."""
  f = np.asarray(model.apply(variables, images, method="features")[layer][..., ch])
  n, i, j = np.unravel_index(np.argmax(f), f.shape)
  p = deconv.project(model, variables, images[n:n + 1], layer=layer, channel=ch, position=(i, j))
  return deconv.to_image(deconv.receptive_patch(model, np.asarray(p[0]), layer, (i, j)))


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
  panel = evolution.tensorboard_panel(model, variables, images, ["conv1", "conv2"], [0, 1, 2])
  assert panel.dtype == np.uint8 and panel.shape == (2 * 48 + 2, 3 * 48 + 2 * 2, 3)


def test_grids_come_from_evolution_checkpoints(tiny_workdir):
  from zfnet_jax.analyses import common
  from conftest import tiny_config
  images, _, _ = common.load_examples(tiny_config(), tiny_workdir, 32, split="train")
  ckpts = train.evolution_checkpoints(tiny_workdir)
  assert len(ckpts) >= 2
  epochs, g = evolution.grids(tiny_workdir, images, ["conv1", "conv2"], [0, 1, 2], tile=None)
  assert epochs == [e for e, _ in ckpts]
  for e, (_, step) in enumerate(ckpts):
    model, variables, _ = train.load_trained(tiny_workdir, step)
    for k, layer in enumerate(("conv1", "conv2")):
      for m in range(3):
        want = brute_force_tile(model, variables, images, layer, m)
        np.testing.assert_allclose(g[layer][e][m], want, atol=2e-3)
  # training changed the features: the first and last epochs' tiles differ
  assert np.abs(g["conv1"][0] - g["conv1"][-1]).max() > 0.01


def test_tensorboard_hook_writes_images(tiny_workdir, tmp_path):
  import glob
  import tensorflow as tf
  from clu import metric_writers
  model, variables, config = train.load_trained(tiny_workdir)
  with config.unlocked():
    config.analyses.evolution.tensorboard_every_steps = 0
  assert evolution.tensorboard_hook(config, tiny_workdir, model) is None   # 0 = off
  with config.unlocked():
    config.analyses.evolution.tensorboard_every_steps = 5
    config.analyses.evolution.layers = ("conv1", "conv2")
    config.analyses.evolution.tensorboard_maps = (0, 1)
  hook = evolution.tensorboard_hook(config, tiny_workdir, model, num_images=8)
  writer = metric_writers.create_default_writer(str(tmp_path), asynchronous=False)
  hook(3, variables["params"], writer)      # not a multiple of 5: nothing
  hook(10, variables["params"], writer)
  writer.close()
  tags = [(e.step, v.tag) for f in glob.glob(str(tmp_path / "events.out.tfevents.*"))
          for e in tf.compat.v1.train.summary_iterator(f) for v in e.summary.value]
  assert tags == [(10, "evolution/projections")]


def test_training_writes_projection_images_to_tensorboard(tiny_workdir):
  """The training loop calls the evolution hook (every 24 of the 48 steps in tiny_config)."""
  import glob
  import tensorflow as tf
  tags = [(e.step, v.tag) for f in glob.glob(os.path.join(tiny_workdir, "events.out.tfevents.*"))
          for e in tf.compat.v1.train.summary_iterator(f) for v in e.summary.value
          if v.tag.startswith("evolution/")]
  assert tags == [(24, "evolution/projections"), (48, "evolution/projections")]
