"""The training state and the paper's optimisation recipe (Sec. 3).

SGD with momentum (or Adam) and weight decay on kernels; learning-rate
schedules (constant, step, cosine, reduce-on-plateau); feature scale clipping
(every conv filter whose RMS exceeds ``clip_radius`` is rescaled to it after
each update).  Used by ``train`` and by ``transfer``'s from-scratch control.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

SCHEDULES = ("constant", "step", "cosine", "plateau")
OPTIMIZERS = ("sgd", "adam")
MOMENTUM_FORMS = ("paper", "pytorch")


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # int32 ()
  params: Any
  opt_state: Any
  rng: jax.Array             # uint32 (2,) raw key of the run
  lr_scale: jax.Array        # float32 (): reduce-on-plateau factor so far
  best_error: jax.Array      # float32 (): best validation top-1 error so far
  bad_evals: jax.Array       # int32 (): evaluations since it last improved
  nonfinite_step: jax.Array  # int32 (): first step with a non-finite loss, -1 if none
  nonfinite_loss: jax.Array  # float32 (): that loss


def validate(config) -> None:
  """ValueError naming the first impossible optimisation setting and what is allowed."""
  def need(ok, msg):
    if not ok:
      raise ValueError(msg)

  def non_negative(name):
    value = config[name]
    need(isinstance(value, (int, float)) and not isinstance(value, bool) and
         math.isfinite(value) and value >= 0,
         f"{name}={value!r}; allowed: a non-negative number")
  need(config.optimizer in OPTIMIZERS,
       f"unknown optimizer {config.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
  need(config.schedule in SCHEDULES,
       f"unknown schedule {config.schedule!r}; allowed: {', '.join(SCHEDULES)}")
  for name in ("learning_rate", "weight_decay", "warmup_epochs"):
    non_negative(name)
  need(0.0 <= config.momentum <= 1.0, f"momentum={config.momentum!r}; allowed: 0 <= x <= 1")
  need(config.momentum_form in MOMENTUM_FORMS,
       f"momentum_form={config.momentum_form!r}; allowed: {', '.join(MOMENTUM_FORMS)}")
  need(config.plateau_patience >= 1,
       f"plateau_patience={config.plateau_patience!r}; allowed: a positive int")
  need(0.0 < config.plateau_factor <= 1.0,
       f"plateau_factor={config.plateau_factor!r}; allowed: 0 < x <= 1")
  r = config.clip_radius
  need(not config.clip_filters or (isinstance(r, (int, float)) and not isinstance(r, bool)
                                   and math.isfinite(r) and r > 0),
       f"clip_radius={r!r} with clip_filters=True; allowed: a positive number (the paper: "
       "0.1), or clip_filters=False to train without feature scale clipping")


def clip_conv_filters(params, radius: float):
  """Feature scale clipping: every conv filter (HWIO kernel, one filter per O)
  whose RMS over (H, W, I) exceeds ``radius`` is rescaled to RMS ``radius``."""
  def clip(path, x):
    if x.ndim != 4 or path[-1].key != "kernel":
      return x
    rms = jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), axis=(0, 1, 2), keepdims=True))
    return (x * jnp.minimum(1.0, radius / jnp.maximum(rms, 1e-30))).astype(x.dtype)
  return jax.tree_util.tree_map_with_path(clip, params)


def learning_rate_fn(config, steps_per_epoch: int, total_steps: int):
  """step -> base learning rate (before the plateau factor)."""
  lr = config.learning_rate
  warm = int(config.warmup_epochs * steps_per_epoch)
  if config.schedule == "step":
    main = optax.piecewise_constant_schedule(
        lr, {int(e * steps_per_epoch) - warm: 0.1 for e in config.step_epochs})
  elif config.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, max(total_steps - warm, 1))
  else:
    main = optax.constant_schedule(lr)
  if warm > 0:
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])
  return main


class PaperTraceState(NamedTuple):
  """cuda-convnet's velocity, which holds the learning rate (``paper_momentum``)."""
  velocity: Any


def paper_momentum(momentum: float) -> optax.GradientTransformationExtraArgs:
  """Momentum as cuda-convnet wrote it, and both papers trained with it:
  v <- momentum v + learning_rate (g + wd w), w <- w - v.  The rate is inside the
  velocity: after a x0.1 drop the old velocity keeps its size and fades by ``momentum``
  per step, where PyTorch's form (``optax.trace``, the rate applied after) shrinks it
  at once.  At a constant rate the two are the same.  The rate comes as
  ``update(..., learning_rate=lr)``; the updates returned are the velocity itself."""
  def init(params):
    return PaperTraceState(jax.tree.map(jnp.zeros_like, params))

  def update(updates, state, params=None, *, learning_rate, **extra_args):
    del params, extra_args
    v = jax.tree.map(lambda v, g: momentum * v + learning_rate * g, state.velocity, updates)
    return v, PaperTraceState(v)
  return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(optimizer: str = "sgd", *, momentum: float = 0.9, weight_decay: float = 0.0,
                   momentum_form: str = "pytorch") -> optax.GradientTransformation:
  """Weight decay on kernels + momentum (or Adam).  The learning rate is given at each
  step (``step_update``), so schedules and the plateau factor stay outside the optimiser.
  ``momentum_form`` (SGD): "pytorch" (v <- momentum v + g, w <- w - lr v) or "paper"
  (``paper_momentum``: the rate inside the velocity)."""
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
  if momentum_form not in MOMENTUM_FORMS:
    raise ValueError(f"momentum_form={momentum_form!r}; allowed: {', '.join(MOMENTUM_FORMS)}")
  parts = []
  if weight_decay:
    parts.append(optax.add_decayed_weights(
        weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)))
  if optimizer == "adam":
    parts.append(optax.scale_by_adam())
  elif momentum_form == "paper":
    parts.append(paper_momentum(momentum))
  else:
    parts.append(optax.trace(decay=momentum))
  return optax.chain(*parts)


def optimizer_from_config(config) -> optax.GradientTransformation:
  return make_optimizer(config.optimizer, momentum=config.momentum,
                        weight_decay=config.weight_decay, momentum_form=config.momentum_form)


def apply_update(params, updates, learning_rate, clip_radius: float = 0.0):
  """params - learning_rate * updates, then feature scale clipping (if clip_radius > 0)."""
  params = jax.tree.map(lambda p, u: p - learning_rate * u, params, updates)
  return clip_conv_filters(params, clip_radius) if clip_radius else params


def step_update(tx, grads, opt_state, params, learning_rate, clip_radius: float = 0.0):
  """(params, opt_state) after one step of ``tx`` (``make_optimizer``) at this rate:
  params - learning_rate * updates, or params - updates where the rate is already in the
  velocity (``paper_momentum``); then feature scale clipping."""
  updates, opt_state = tx.update(grads, opt_state, params, learning_rate=learning_rate)
  inside = any(isinstance(s, PaperTraceState) for s in jax.tree.leaves(
      opt_state, is_leaf=lambda s: isinstance(s, PaperTraceState)))
  return apply_update(params, updates, 1.0 if inside else learning_rate, clip_radius), opt_state


def plateau_update(state_vals: dict, error: float, patience: int, factor: float) -> dict:
  """Reduce-on-plateau on the host: x factor after ``patience`` evals without improvement.

  ``state_vals`` has lr_scale, best_error, bad_evals; returns the new values.
  """
  scale, best, bad = (float(state_vals["lr_scale"]), float(state_vals["best_error"]),
                      int(state_vals["bad_evals"]))
  error = float(np.float32(error))     # best_error is kept in float32
  if error < best - 1e-9:
    return {"lr_scale": scale, "best_error": error, "bad_evals": 0}
  bad += 1
  if bad >= patience:
    return {"lr_scale": scale * factor, "best_error": best, "bad_evals": 0}
  return {"lr_scale": scale, "best_error": best, "bad_evals": bad}


def init_fn(model, input_shape: tuple[int, ...], tx: optax.GradientTransformation, *,
            seed: int, clip_radius: float = 0.0):
  """() -> a fresh TrainState: parameters from ``seed`` for inputs of ``input_shape``
  (clipped when ``clip_radius`` > 0), the run's key, plateau bookkeeping."""
  init_rng, run_rng = jax.random.split(jax.random.PRNGKey(seed))

  def init():
    params = model.init(init_rng, jnp.zeros(input_shape, jnp.float32))["params"]
    if clip_radius:
      params = clip_conv_filters(params, clip_radius)
    return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                      rng=run_rng, lr_scale=jnp.float32(1.0), best_error=jnp.float32(np.inf),
                      bad_evals=jnp.int32(0), nonfinite_step=jnp.int32(-1),
                      nonfinite_loss=jnp.float32(0.0))
  return init


def clip_radius(config) -> float:
  """The radius of feature scale clipping, 0 when it is off."""
  return float(config.clip_radius) if config.clip_filters else 0.0
