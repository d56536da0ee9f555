"""Shared helpers of the analyses: batched activations, probabilities, display."""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zfnet_jax import deconv, xla
from zfnet_jax.nn import geometry


@functools.lru_cache(maxsize=64)
def _subset_fn(net: deconv.Network, keep: tuple[str, ...]):
  return xla.jit(lambda variables, x: {k: v for k, v in net.features(variables, x).items()
                                       if k in keep})


def activations(net, variables, images: np.ndarray, layers: Sequence[str],
                batch_size: int = 64) -> dict[str, np.ndarray]:
  """{layer: (N, ...)} of ``layers`` (and "logits" when the network has it) over
  ``images`` (N, S, S, C), in batches (the last one padded: one compilation)."""
  net = deconv.as_network(net)
  names = geometry.layer_names(net, images.shape[1])
  keep = tuple(dict.fromkeys(list(layers) + (["logits"] if "logits" in names else [])))
  fn = _subset_fn(net, keep)
  n = len(images)
  out = []
  bs = max(1, min(batch_size, n))
  for i in range(0, n, bs):
    x = images[i:i + bs]
    pad = bs - len(x)
    if pad:
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    f = jax.device_get(fn(variables, jnp.asarray(x)))
    out.append({k: v[:bs - pad] for k, v in f.items()})
  return {k: np.concatenate([o[k] for o in out]) for k in out[0]}


def softmax(logits: np.ndarray) -> np.ndarray:
  z = logits - logits.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def to_display(images: np.ndarray, mean: np.ndarray | None) -> np.ndarray:
  """Mean-subtracted images -> float [0, 1] for display; (.., S, S) when grey."""
  x = np.asarray(images, np.float32)
  x = (x + (0 if mean is None else mean)) / 255.0 if mean is not None else \
      (x - x.min()) / max(float(x.max() - x.min()), 1e-8)
  x = np.clip(x, 0, 1)
  return x[..., 0] if x.shape[-1] == 1 else x


def default_size(value: float, at_224: float, input_size: int) -> float:
  """``value`` unless it is negative, else the paper's 224-pixel value scaled to ``input_size``."""
  return value if value >= 0 else at_224 * input_size / 224.0

