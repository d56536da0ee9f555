"""The paper's layers with switchable backward rules (Zeiler & Fergus, Sec. 2.1).

Every op here has the same forward pass whatever the rule; only the signal that
goes *down* (the VJP) changes:

* ``relu(x, rule)``: ``"backprop"`` passes R * 1[X > 0] (the gradient),
  ``"deconvnet"`` passes ``rectify(R)`` = relu(R) (the paper's forward
  rectification of the reconstruction), ``"guided"`` passes R * 1[X > 0] * 1[R > 0].
* ``max_pool``: records the *switches* (argmax of each window) and ``unpool``\\ s
  through them on the way down.  Ties go to the first maximum in row-major order
  within the window, as cuda-convnet and PyTorch do; padded positions (ceil-mode
  windows that run past the bottom/right edge) hold -inf and are never chosen.
* convolution needs nothing special: its VJP *is* the paper's "filter" step
  (the transposed, i.e. flipped, filters; biases play no part in a VJP).
* ``contrast_norm`` (local response normalisation across maps) goes down with
  its exact VJP (``norm_rule="exact"``, the default: the deconvnet then inverts
  exactly the function the forward pass computed) or unchanged
  (``norm_rule="identity"``, an approximation some deconvnet ports use; with
  AlexNet's small alpha the two differ only by a per-unit rescaling close to
  k^-beta).

All arrays are NHWC.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

RULES = ("backprop", "deconvnet", "guided")
NORM_RULES = ("exact", "identity")


def check_rule(rule: str) -> str:
  if rule not in RULES:
    raise ValueError(f"unknown rule {rule!r}; allowed: {', '.join(RULES)}")
  return rule


def rectify(r: jax.Array) -> jax.Array:
  """The deconvnet's rectification of the reconstructed signal: relu(R)."""
  return jnp.maximum(r, 0)


# ----------------------------------------------------------------------------
# ReLU with a switchable backward rule.
# ----------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _relu_rule(x, rule):
  return jnp.maximum(x, 0)


def _relu_fwd(x, rule):
  return jnp.maximum(x, 0), x


def _relu_bwd(rule, x, r):
  if rule == "deconvnet":
    return (rectify(r),)
  if rule == "guided":
    return (jnp.where(x > 0, rectify(r), 0),)
  return (jnp.where(x > 0, r, 0),)


_relu_rule.defvjp(_relu_fwd, _relu_bwd)


def relu(x: jax.Array, rule: str = "backprop") -> jax.Array:
  """max(x, 0); the VJP follows ``rule`` (see module docstring)."""
  check_rule(rule)
  if rule == "backprop":
    return jax.nn.relu(x)  # exact gradient R * 1[X > 0]; keeps jvp working
  return _relu_rule(x, rule)


# ----------------------------------------------------------------------------
# Max-pooling with switches.
# ----------------------------------------------------------------------------

def ceil_pool_padding(n: int, window: int, stride: int) -> int:
  """Bottom/right padding for cuda-convnet's ceil-mode pooling of ``n`` pixels.

  Output size is ceil((n - window) / stride) + 1 with windows starting at 0.
  """
  out = -(-(n - window) // stride) + 1
  return max((out - 1) * stride + window - n, 0)


def _window_stack(x, window, stride, pad_hi):
  """All window offsets as a leading axis: (window*window, N, Ho, Wo, C).

  Offsets are enumerated in row-major order, so argmax over axis 0 breaks ties
  by the first maximum in row-major order within the window.
  """
  x = jnp.pad(x, ((0, 0), (0, pad_hi[0]), (0, pad_hi[1]), (0, 0)),
              constant_values=-jnp.inf)
  h, w = x.shape[1], x.shape[2]
  ho = (h - window) // stride + 1
  wo = (w - window) // stride + 1
  views = []
  for di in range(window):
    for dj in range(window):
      views.append(lax.slice(
          x, (0, di, dj, 0),
          (x.shape[0], di + (ho - 1) * stride + 1, dj + (wo - 1) * stride + 1, x.shape[3]),
          (1, stride, stride, 1)))
  return jnp.stack(views)


def _pool_pads(x, window, stride):
  return (ceil_pool_padding(x.shape[1], window, stride),
          ceil_pool_padding(x.shape[2], window, stride))


def pool_switches(x: jax.Array, window: int = 3, stride: int = 2) -> jax.Array:
  """Switches of a ceil-mode max-pool: the window offset of each maximum.

  Args:
    x: (N, H, W, C) pool input.
  Returns:
    int32 (N, Ho, Wo, C) in [0, window*window): offset ``di * window + dj`` of
    the first maximum (row-major) in each window.  ``switch_positions`` turns
    these into input coordinates.
  """
  return jnp.argmax(_window_stack(x, window, stride, _pool_pads(x, window, stride)),
                    axis=0).astype(jnp.int32)


def switch_positions(switches: jax.Array, window: int = 3, stride: int = 2) -> jax.Array:
  """(N, Ho, Wo, C) switches -> (N, Ho, Wo, C, 2) input (row, col) of each max."""
  n, ho, wo, c = switches.shape
  rows = jnp.arange(ho)[None, :, None, None] * stride + switches // window
  cols = jnp.arange(wo)[None, None, :, None] * stride + switches % window
  return jnp.stack(jnp.broadcast_arrays(rows, cols), axis=-1)


def unpool(r: jax.Array, switches: jax.Array, in_shape: Sequence[int],
           window: int = 3, stride: int = 2) -> jax.Array:
  """Put each value of ``r`` (N, Ho, Wo, C) back where its switch says.

  Overlapping windows that chose the same input add up (as the VJP does).
  Returns an array of ``in_shape`` (N, H, W, C).
  """
  n, h, w, c = in_shape
  ho, wo = r.shape[1], r.shape[2]
  hp, wp = (ho - 1) * stride + window, (wo - 1) * stride + window
  out = jnp.zeros((n, hp, wp, c), r.dtype)
  zero = jnp.zeros((), r.dtype)
  for k in range(window * window):
    di, dj = divmod(k, window)
    part = jnp.where(switches == k, r, zero)
    # Dilate by the stride (interior padding) and shift to offset (di, dj).
    out = out + lax.pad(part, zero, ((0, 0, 0),
                                     (di, hp - di - ((ho - 1) * stride + 1), stride - 1),
                                     (dj, wp - dj - ((wo - 1) * stride + 1), stride - 1),
                                     (0, 0, 0)))
  return out[:, :h, :w, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool(x: jax.Array, window: int = 3, stride: int = 2) -> jax.Array:
  """Ceil-mode (cuda-convnet) max-pool; the VJP unpools through the switches.

  (N, H, W, C) -> (N, ceil((H - window) / stride) + 1, ..., C).
  """
  ph, pw = _pool_pads(x, window, stride)
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1),
                           (1, stride, stride, 1),
                           ((0, 0), (0, ph), (0, pw), (0, 0)))


def _max_pool_fwd(x, window, stride):
  stack = _window_stack(x, window, stride, _pool_pads(x, window, stride))
  switches = jnp.argmax(stack, axis=0).astype(jnp.int32)
  y = jnp.max(stack, axis=0)
  return y, (switches, jnp.zeros((0,) + x.shape, x.dtype))


def _max_pool_bwd(window, stride, res, r):
  switches, shape_carrier = res
  return (unpool(r, switches, shape_carrier.shape[1:], window, stride),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


# ----------------------------------------------------------------------------
# Contrast normalisation across feature maps (AlexNet's LRN).
# ----------------------------------------------------------------------------

def _lrn(x, k, n, alpha, beta):
  sq = lax.reduce_window(jnp.square(x), 0.0, lax.add, (1, 1, 1, n), (1, 1, 1, 1),
                         ((0, 0), (0, 0), (0, 0), (n // 2, (n - 1) // 2)))
  return x / jnp.power(k + alpha * sq, beta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _lrn_identity(x, k, n, alpha, beta):
  return _lrn(x, k, n, alpha, beta)


_lrn_identity.defvjp(lambda x, k, n, a, b: (_lrn(x, k, n, a, b), None),
                     lambda k, n, a, b, _, r: (r,))


def contrast_norm(x: jax.Array, k: float = 2.0, n: int = 5, alpha: float = 1e-4,
                  beta: float = 0.75, norm_rule: str = "exact") -> jax.Array:
  """Local response normalisation across maps (Krizhevsky et al. 2012).

  b_c = a_c / (k + alpha * sum_{c'=c-n//2}^{c+n//2} a_{c'}^2) ** beta, over the
  channels that exist.  ``alpha`` is NOT divided by ``n`` (the AlexNet paper's
  formula; Caffe and PyTorch's LocalResponseNorm divide it by n).
  ``norm_rule`` picks the backward pass: "exact" VJP or "identity".
  """
  if norm_rule not in NORM_RULES:
    raise ValueError(f"unknown norm_rule {norm_rule!r}; allowed: {', '.join(NORM_RULES)}")
  if norm_rule == "identity":
    return _lrn_identity(x, k, n, alpha, beta)
  return _lrn(x, k, n, alpha, beta)
