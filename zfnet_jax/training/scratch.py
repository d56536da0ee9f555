"""The from-scratch control of transfer (Sec. 5.2): the same architecture trained from a
fresh initialisation on the target images, with the paper's recipe (``train_state``).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zfnet_jax import console, xla
from zfnet_jax.training import train_state

# -- from-scratch control -------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _scratch_step(model, learning_rate: float, multilabel: bool, flip: bool, clip_radius: float):
  """(optimiser, jitted step) for ``train_scratch``; cached so folds share one compile."""
  tx = train_state.make_optimizer("sgd", momentum=0.9, weight_decay=5e-4)

  def loss_fn(p, x, y, key):
    logits = model.apply({"params": p}, x, train=True, rngs={"dropout": key})
    if multilabel:
      return optax.sigmoid_binary_cross_entropy(logits, y).sum(-1).mean()
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @xla.jit
  def step(p, s, x, y, mean, key):
    flip_key, drop_key = jax.random.split(key)
    if flip:
      flips = jax.random.bernoulli(flip_key, 0.5, (x.shape[0], 1, 1, 1))
      x = jnp.where(flips, x[:, :, ::-1], x)
    x = x - mean
    loss, grads = jax.value_and_grad(loss_fn)(p, x, y, drop_key)
    p, s = train_state.step_update(tx, grads, s, p, learning_rate, clip_radius)
    return p, s, loss

  return tx, step


def train_scratch(model, images, labels, mean, *, steps: int, batch_size: int,
                  learning_rate: float, multilabel: bool, flip: bool = True, seed: int = 0,
                  clip_radius: float = 0.1):
  """Trains ``model`` from a fresh init on pixel images (N, S, S, C) -> variables.

  The training recipe of ``train_state``: SGD momentum 0.9, weight decay 5e-4
  on kernels, feature scale clipping of conv filters at ``clip_radius`` (0 =
  off); random flips (``flip``), dropout; batches drawn at random without
  replacement.
  """
  tx, step = _scratch_step(model, float(learning_rate), bool(multilabel), bool(flip),
                           float(clip_radius))
  shape = (1, *images.shape[1:])
  # Not jitted: the seed is a constant of init_fn, and eager ops compile once for all folds.
  state = train_state.init_fn(model, shape, tx, seed=seed, clip_radius=clip_radius)()
  params, opt_state = state.params, state.opt_state
  rng = np.random.default_rng(seed)
  key = jax.random.PRNGKey(seed + 1)
  mean = jnp.asarray(mean, jnp.float32)
  loss = 0.0
  for i in console.progress(range(steps), desc="scratch", unit="step"):
    idx = rng.choice(len(images), size=min(batch_size, len(images)), replace=False)
    params, opt_state, loss = step(params, opt_state, images[idx], labels[idx], mean,
                                   jax.random.fold_in(key, i))
  if not np.isfinite(float(loss)):
    raise FloatingPointError(f"from-scratch control diverged (loss {float(loss)}); "
                             "lower transfer.scratch_learning_rate")
  return {"params": params}


def scratch_outputs(model, variables, images, mean, multilabel, batch_size=128) -> np.ndarray:
  """A (from-scratch) model's own classifier on pixel images: logits (N, K) for
  multi-label data, else predicted labels (N,)."""
  apply = _jitted_apply(model)
  logits = []
  for i in range(0, len(images), batch_size):
    x = np.zeros((batch_size, *images.shape[1:]), np.float32)   # one shape: one compile
    x[:len(images[i:i + batch_size])] = images[i:i + batch_size]
    logits.append(np.asarray(apply(variables, x, mean))[:len(images[i:i + batch_size])])
  logits = np.concatenate(logits)
  return logits if multilabel else logits.argmax(-1)


@functools.lru_cache(maxsize=8)
def _jitted_apply(model):
  return xla.jit(lambda variables, x, mean: model.apply(variables, x - mean))

