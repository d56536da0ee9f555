"""bfloat16 compute (``--config.model.dtype=bfloat16``) on CPU, against the float32 run.

bfloat16 keeps 8 significant bits: each rounding costs at most U = 2^-8 relative.
"""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from zfnet_jax import deconv
from zfnet_jax.nn import models
from zfnet_jax.training import loop, steps, train_state

from helpers import small_config

U = 2.0 ** -8   # unit roundoff of bfloat16
STEPS = 3


def train_steps(dtype, batches):
  """(model, initial params, final state, losses) of ``loop.build_train_step`` on one
  device, one step per batch."""
  c = small_config("unused", steps=STEPS)
  c.model.dtype = dtype
  model = models.from_config(c.model, 10)
  tx = train_state.optimizer_from_config(c)
  run = types.SimpleNamespace(config=c, steps_per_epoch=STEPS, num_steps=STEPS, model=model,
                              tx=tx, mesh=Mesh(np.array(jax.devices()[:1]), (steps.AXIS,)))
  step = loop.build_train_step(run)
  state = jax.jit(train_state.init_fn(model, batches[0]["image"].shape, tx, seed=c.seed,
                                      clip_radius=train_state.clip_radius(c)))()
  params0 = jax.device_get(state.params)
  losses = []
  for b in batches:
    state, metrics = step(state, b)
    losses.append(float(metrics["loss"]))
  return model, params0, jax.device_get(state), losses


@pytest.mark.slow
def test_train_steps_in_bf16_stay_finite_and_close_to_fp32():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, (STEPS, 8))
  # Mean-subtracted pixels with a class signal, so the gradients are not noise alone.
  images = rng.normal(0.0, 40.0, (STEPS, 8, 32, 32, 1)) + 12.0 * labels[..., None, None, None]
  batches = [{"image": jnp.asarray(images[i], jnp.float32),
              "label": jnp.asarray(labels[i], jnp.int32)} for i in range(STEPS)]
  _, p0, s32, l32 = train_steps("float32", batches)
  model, _, s16, l16 = train_steps("bfloat16", batches)

  # The model computes in bf16; parameters (and so the optimiser) stay float32.
  assert jax.eval_shape(model.apply, {"params": s16.params},
                        batches[0]["image"]).dtype == jnp.bfloat16
  assert {a.dtype for a in jax.tree.leaves(s16.params)} == {np.dtype("float32")}
  assert int(s16.step) == STEPS and int(s16.nonfinite_step) == -1
  assert np.isfinite(l16).all() and all(np.isfinite(a).all() for a in jax.tree.leaves(s16.params))

  # The parameter updates (params - initial params) agree, in norm over all parameters,
  # within the first-order bound of 16 successive roundings of at most U each (forward
  # and backward through 8 weight layers): 16U.
  flat = lambda tree: np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])
  d32, d16 = flat(s32.params) - flat(p0), flat(s16.params) - flat(p0)
  err = np.linalg.norm(d16 - d32) / np.linalg.norm(d32)
  assert 0.0 < err <= 16 * U, err     # > 0: the bf16 run did compute in bf16
  np.testing.assert_allclose(l16, l32, rtol=4 * U)   # float32 softmax of bf16 logits


@pytest.mark.slow
def test_projections_of_a_bf16_model():
  """The dtype of the images in, bf16 compute inside; conv1 close to float32."""
  m32 = models.ZFNetLowRes(num_classes=4, conv_features=(3, 4, 4, 4, 3), fc_features=5)
  m16 = m32.clone(dtype=jnp.bfloat16)
  x = 50.0 * jax.random.normal(jax.random.PRNGKey(0), (3, 32, 32, 3))
  v = m32.init(jax.random.PRNGKey(1), x[:1])
  v = jax.tree.map(lambda a: a + 0.05 if a.ndim == 1 else a, v)    # nonzero biases
  channels = [0, 1, 2]
  # The strongest conv1 unit of each image in float32, then the same units in both.
  pos = np.stack([np.asarray(deconv.strongest(m32, v, x[i:i + 1], layer="conv1",
                                              channel=c)[0][0]) for i, c in enumerate(channels)])
  p32 = deconv.project_many(m32, v, x, layer="conv1", channels=channels, positions=pos)
  features16 = lambda img: m16.apply(v, img, method="features")
  for images, dtype in ((x, jnp.float32), (x.astype(jnp.bfloat16), jnp.bfloat16)):
    got = {
        "project": jnp.concatenate([deconv.project(m16, v, images[i:i + 1], layer="conv1",
                                                   channel=c, position=tuple(pos[i]))
                                    for i, c in enumerate(channels)]),
        "project_many": deconv.project_many(m16, v, images, layer="conv1", channels=channels,
                                            positions=pos),
        "project_fn": deconv.project_fn(features16, images, output="conv1",
                                        channel=np.asarray(channels), position=pos),
    }
    for name, p16 in got.items():
      assert p16.dtype == dtype, (name, p16.dtype)
      p16 = np.asarray(p16, np.float32)
      # One conv1 unit's projection is its value times its flipped filter: rounding the
      # pixels, the weights, the value and the products costs at most 4U relative (first
      # order; the strongest unit's sum does not cancel).
      for i in range(3):
        err = np.linalg.norm(p16[i] - p32[i]) / np.linalg.norm(p32[i])
        assert 0.0 < err <= 4 * U, (name, i, err)
