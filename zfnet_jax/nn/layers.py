"""The paper's layers with switchable backward rules (Zeiler & Fergus, Sec. 2.1).

Every op here has the same forward pass whatever the rule; only the signal that
goes *down* (the VJP) changes:

* ``relu(x, rule)``: the VJP is the rule's (``rules``): ``"backprop"`` passes
  R * 1[X > 0] (the gradient), ``"deconvnet"`` passes ``rectify(R)`` = relu(R) (the
  paper's forward rectification of the reconstruction), ``"guided"`` passes
  R * 1[X > 0] * 1[R > 0].
* ``max_pool`` (cuda-convnet ceil mode) and ``general_max_pool`` (any
  ``lax.reduce_window`` max: any rank, layout and padding): record the
  *switches* (argmax of each window) and ``unpool`` through them on the way
  down.  Ties go to the first maximum in row-major order within the window, as
  cuda-convnet and PyTorch do; padded positions hold -inf and are never chosen.
  The forward value is ``lax.reduce_window``'s; the same in every rule.
* ``reduce_max`` (a max-pool written as reshape + max): the first maximum over
  the reduced axes takes the whole signal on the way down, in every rule.
* ``adaptive_avg_pool``: torch's ``AdaptiveAvgPool2d`` (linear; its own VJP).
* convolution needs nothing special: its VJP *is* the paper's "filter" step
  (the transposed, i.e. flipped, filters; biases play no part in a VJP).
* ``contrast_norm`` (local response normalisation across maps) goes down with
  its exact VJP (``norm_rule="exact"``, the default: the signal goes down
  through the transpose of exactly the function the forward pass computed, like
  every other layer) or unchanged
  (``norm_rule="identity"``, an approximation some deconvnet ports use; with
  AlexNet's small alpha the two differ only by a per-unit rescaling close to
  k^-beta).

All arrays are NHWC.
"""
from __future__ import annotations

import functools
import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from zfnet_jax.nn import rules

NORM_RULES = ("exact", "identity")


# ----------------------------------------------------------------------------
# ReLU with a switchable backward rule.
# ----------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _relu_rule(x, rule):
  return jnp.maximum(x, 0)


def _relu_fwd(x, rule):
  return jnp.maximum(x, 0), x


def _relu_bwd(rule, x, r):
  return (rules.get(rule).backward(x, r),)


_relu_rule.defvjp(_relu_fwd, _relu_bwd)


def relu(x: jax.Array, rule: str = "backprop") -> jax.Array:
  """max(x, 0); the VJP follows ``rule``, a name in ``rules.RULES``."""
  if rules.get(rule).exact_gradient:
    return jax.nn.relu(x)  # keeps jvp working
  return _relu_rule(x, rule)


# ----------------------------------------------------------------------------
# Max-pooling with switches.
# ----------------------------------------------------------------------------

def ceil_pool_padding(n: int, window: int, stride: int) -> int:
  """Bottom/right padding for cuda-convnet's ceil-mode pooling of ``n`` pixels.

  Output size is max(ceil((n - window) / stride) + 1, 1) with windows starting
  at 0 (an input smaller than the window gives one output).
  """
  out = max(-(-(n - window) // stride) + 1, 1)
  return max((out - 1) * stride + window - n, 0)


def _pool_geometry(shape, window_dimensions, window_strides, padding):
  """Output shape and row-major list of window offsets of a max-pool."""
  if not (len(shape) == len(window_dimensions) == len(window_strides) == len(padding)):
    raise ValueError(f"max-pool of a rank-{len(shape)} array needs {len(shape)} window "
                     f"dimensions, strides and paddings; got {window_dimensions}, "
                     f"{window_strides}, {padding}")
  if any(lo < 0 or hi < 0 for lo, hi in padding):
    raise ValueError(f"negative max-pool padding {padding} is not supported")
  out = tuple((n + lo + hi - w) // s + 1
              for n, w, s, (lo, hi) in zip(shape, window_dimensions, window_strides, padding))
  if any(o < 1 for o in out):
    raise ValueError(f"max-pool window {window_dimensions} with padding {padding} does not "
                     f"fit an input of shape {shape}")
  return out, list(itertools.product(*(range(w) for w in window_dimensions)))


def _window_views(x, window_dimensions, window_strides, padding):
  """Every window offset's strided view, a list of prod(window) arrays of out_shape.

  Offsets are enumerated in row-major order, so the first maximum in the list
  is the first in row-major order within the window.  Padding holds -inf and
  is never chosen (unless a whole window is padding).  The input is padded once
  (XLA fuses the pad into the op that produces ``x``): padding each view on its
  own made the quickstart's training step 10% slower on CPU.
  """
  out, offsets = _pool_geometry(x.shape, window_dimensions, window_strides, padding)
  x = lax.pad(x, jnp.array(-jnp.inf, x.dtype), [(lo, hi, 0) for lo, hi in padding])
  return [lax.slice(x, off, [o + (n - 1) * s + 1 for o, n, s in zip(off, out, window_strides)],
                    window_strides) for off in offsets]


def _max_and_switches(x, window_dimensions, window_strides, padding):
  """Max of each window and its switch (first maximum, row-major).

  Elementwise over the window offsets, so XLA fuses it into one loop (a
  variadic argmax reduction is much slower on CPU).
  """
  views = _window_views(x, window_dimensions, window_strides, padding)
  y = functools.reduce(jnp.maximum, views)
  switches = jnp.full(y.shape, len(views) - 1, jnp.int32)
  for k in range(len(views) - 2, -1, -1):
    switches = jnp.where(views[k] == y, jnp.int32(k), switches)
  return y, switches


def general_unpool(r: jax.Array, switches: jax.Array, in_shape: Sequence[int],
                   window_dimensions: Sequence[int], window_strides: Sequence[int],
                   padding: Sequence[tuple[int, int]]) -> jax.Array:
  """Put each value of ``r`` back at its switch (index of a row-major window offset).

  Values of overlapping windows that chose the same input add up (as the VJP
  does).  Returns an array of ``in_shape``; what lands on padding is dropped.

  Built phase by phase: window offset k lands on input index o * s + k, i.e. on
  phase k % s at o + k // s, so each phase of the input is a sum of shifted
  selections the size of ``r``, and one interleave assembles them (no
  stride-dilated arrays of the input's size).
  """
  out_shape, offsets = _pool_geometry(tuple(in_shape), window_dimensions, window_strides,
                                      padding)
  strides = tuple(window_strides)
  side = [o + (w - 1) // s for o, w, s in zip(out_shape, window_dimensions, strides)]
  zero = jnp.zeros((), r.dtype)
  phases = {}
  for k, off in enumerate(offsets):
    phase = tuple(o % s for o, s in zip(off, strides))
    shift = [o // s for o, s in zip(off, strides)]
    part = lax.pad(jnp.where(switches == k, r, zero), zero,
                   [(d, n - o - d, 0) for d, n, o in zip(shift, side, out_shape)])
    phases[phase] = part if phase not in phases else phases[phase] + part
  zeros = jnp.zeros(side, r.dtype)
  stacked = jnp.stack([phases.get(p, zeros) for p in itertools.product(*map(range, strides))],
                      axis=-1).reshape(side + list(strides))
  nd = len(side)
  out = stacked.transpose([a for d in range(nd) for a in (d, nd + d)]).reshape(
      [n * s for n, s in zip(side, strides)])
  return lax.slice(out, [lo for lo, _ in padding],
                   [lo + n for n, (lo, _) in zip(in_shape, padding)])


def tuple_padding(padding):
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def general_switches(x: jax.Array, window_dimensions: tuple[int, ...],
                     window_strides: tuple[int, ...],
                     padding: tuple[tuple[int, int], ...]) -> jax.Array:
  """Switches of ``general_max_pool``: int32, the output's shape, the row-major window
  offset of each window's first maximum (``general_unpool`` takes them)."""
  return _max_and_switches(x, window_dimensions, window_strides, tuple_padding(padding))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def general_max_pool(x: jax.Array, window_dimensions: tuple[int, ...],
                     window_strides: tuple[int, ...],
                     padding: tuple[tuple[int, int], ...]) -> jax.Array:
  """``lax.reduce_window`` max (-inf padding) whose VJP unpools through the switches.

  Any rank and layout; no base or window dilation.  Ties: first maximum in
  row-major order within the window.  The arguments after ``x`` must be tuples.
  """
  return lax.reduce_window(x, -jnp.inf, lax.max, window_dimensions,
                           window_strides, padding)


def _general_max_pool_fwd(x, window_dimensions, window_strides, padding):
  y, switches = _max_and_switches(x, window_dimensions, window_strides, padding)
  # A zero-size array carries the input shape (residuals must be arrays).
  return y, (switches, jnp.zeros((0,) + x.shape, x.dtype))


def _general_max_pool_bwd(window_dimensions, window_strides, padding, res, r):
  switches, shape_carrier = res
  return (general_unpool(r, switches, shape_carrier.shape[1:], window_dimensions,
                         window_strides, padding),)


general_max_pool.defvjp(_general_max_pool_fwd, _general_max_pool_bwd)


def _nhwc_pool_args(shape, window, stride):
  ph, pw = (ceil_pool_padding(shape[1], window, stride),
            ceil_pool_padding(shape[2], window, stride))
  return (1, window, window, 1), (1, stride, stride, 1), ((0, 0), (0, ph), (0, pw), (0, 0))


def max_pool(x: jax.Array, window: int = 3, stride: int = 2) -> jax.Array:
  """Ceil-mode (cuda-convnet) max-pool; the VJP unpools through the switches.

  (N, H, W, C) -> (N, max(ceil((H - window) / stride) + 1, 1), ..., C).
  """
  return general_max_pool(x, *_nhwc_pool_args(x.shape, window, stride))


def pool_switches(x: jax.Array, window: int = 3, stride: int = 2) -> jax.Array:
  """Switches of a ceil-mode max-pool: the window offset of each maximum.

  Args:
    x: (N, H, W, C) pool input.
  Returns:
    int32 (N, Ho, Wo, C) in [0, window*window): offset ``di * window + dj`` of
    the first maximum (row-major) in each window.  ``switch_positions`` turns
    these into input coordinates.
  """
  return _max_and_switches(x, *_nhwc_pool_args(x.shape, window, stride))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool_and_switches(x: jax.Array, window: int = 3,
                          stride: int = 2) -> tuple[jax.Array, jax.Array]:
  """``(max_pool(x), pool_switches(x))`` from one pass over the windows (the VJP of
  the pooled output unpools through the switches, as ``max_pool``'s)."""
  return _max_and_switches(x, *_nhwc_pool_args(x.shape, window, stride))


def _max_pool_and_switches_fwd(x, window, stride):
  y, switches = max_pool_and_switches(x, window, stride)
  return (y, switches), (switches, jnp.zeros((0,) + x.shape, x.dtype))


def _max_pool_and_switches_bwd(window, stride, res, cts):
  switches, shape_carrier = res
  return (unpool(cts[0], switches, shape_carrier.shape[1:], window, stride),)


max_pool_and_switches.defvjp(_max_pool_and_switches_fwd, _max_pool_and_switches_bwd)


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
  return general_unpool(r, switches, tuple(in_shape),
                        *_nhwc_pool_args(tuple(in_shape), window, stride))


def _reduce_switches(x, axes):
  """x with ``axes`` moved last and flattened, and the first argmax over them."""
  moved = jnp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
  flat = moved.reshape(moved.shape[:x.ndim - len(axes)] + (-1,))
  return moved.shape, jnp.argmax(flat, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def reduce_max(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """``lax.reduce_max`` over ``axes`` (a max-pool written as reshape + max) whose
  VJP gives each output's whole signal to its switch: the first maximum in
  row-major order over the reduced axes (as ``max_pool``; the plain gradient
  splits it among tied maxima)."""
  return lax.reduce_max(x, axes)


def _reduce_max_fwd(x, axes):
  shape, switch = _reduce_switches(x, axes)
  return lax.reduce_max(x, axes), (switch, jnp.zeros((0,) + shape, x.dtype))


def _reduce_max_bwd(axes, res, r):
  switch, carrier = res
  shape = carrier.shape[1:]
  k = len(axes)
  ndim = len(shape)
  onehot = jax.nn.one_hot(switch, int(np.prod(shape[ndim - k:])), dtype=r.dtype) * r[..., None]
  moved = onehot.reshape(shape)
  return (jnp.moveaxis(moved, tuple(range(ndim - k, ndim)), axes),)


reduce_max.defvjp(_reduce_max_fwd, _reduce_max_bwd)


def adaptive_bins(n: int, out: int) -> list[tuple[int, int]]:
  """PyTorch's adaptive-pooling bins of ``n`` pixels into ``out``:
  [floor(i n / out), ceil((i + 1) n / out)) for i < out (they overlap when out does
  not divide n, and repeat pixels when out > n)."""
  return [((i * n) // out, -(-((i + 1) * n) // out)) for i in range(out)]


def adaptive_avg_pool(x: jax.Array, out: tuple[int, int]) -> jax.Array:
  """(N, H, W, C) -> (N, out_h, out_w, C): torch's ``AdaptiveAvgPool2d(out)``.

  The mean of each bin (``adaptive_bins``); the identity where a side already
  has that size.  Linear, so its VJP spreads each value evenly over its bin.
  """
  for axis, size in ((1, out[0]), (2, out[1])):
    n = x.shape[axis]
    if n == size:
      continue
    a = np.zeros((size, n), np.float32)
    for i, (lo, hi) in enumerate(adaptive_bins(n, size)):
      a[i, lo:hi] = 1.0 / (hi - lo)
    eq = "in,bnwc->biwc" if axis == 1 else "jw,bhwc->bhjc"
    x = jnp.einsum(eq, jnp.asarray(a, x.dtype), x, precision=lax.Precision.HIGHEST)
  return x


# ----------------------------------------------------------------------------
# Contrast normalisation across feature maps (AlexNet's LRN).
# ----------------------------------------------------------------------------

def _lrn(x, k, n, alpha, beta):
  # Sum of squares over the maps c - n//2 .. c + (n-1)//2 that exist, as a
  # matmul with a band of ones: XLA's CPU reduce_window over C and pow (and
  # their gradients) are ~15x slower than this matmul and exp/log.
  c = x.shape[-1]
  offset = jnp.arange(c)[None, :] - jnp.arange(c)[:, None]   # [c', c] -> c - c'
  band = ((offset >= -((n - 1) // 2)) & (offset <= n // 2)).astype(x.dtype)
  sq = jnp.matmul(jnp.square(x), band, precision=lax.Precision.HIGHEST)
  return x * jnp.exp(-beta * jnp.log(k + alpha * sq))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _lrn_identity(x, k, n, alpha, beta):
  return _lrn(x, k, n, alpha, beta)


_lrn_identity.defvjp(lambda x, k, n, a, b: (_lrn(x, k, n, a, b), None),
                     lambda k, n, a, b, _, r: (r,))


def contrast_norm(x: jax.Array, k: float = 2.0, n: int = 5, alpha: float = 1e-4,
                  beta: float = 0.75, norm_rule: str = "exact",
                  alpha_over_n: bool = False) -> jax.Array:
  """Local response normalisation across maps (Krizhevsky et al. 2012).

  b_c = a_c / (k + alpha' * sum_{c'=c-n//2}^{c+(n-1)//2} a_{c'}^2) ** beta over the
  channels that exist, with alpha' = alpha (``alpha_over_n=False``: the AlexNet paper's
  formula, our default) or alpha / n (``alpha_over_n=True``: cuda-convnet's cmrnorm,
  Caffe's LRN and PyTorch's LocalResponseNorm).
  ``norm_rule`` picks the backward pass: "exact" VJP or "identity".
  """
  if norm_rule not in NORM_RULES:
    raise ValueError(f"unknown norm_rule {norm_rule!r}; allowed: {', '.join(NORM_RULES)}")
  if alpha_over_n:
    alpha = alpha / n
  if norm_rule == "identity":
    return _lrn_identity(x, k, n, alpha, beta)
  return _lrn(x, k, n, alpha, beta)
