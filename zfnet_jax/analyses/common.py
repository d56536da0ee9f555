"""Shared helpers of the analyses: validation, images of a split, batched features, plotting."""
from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zfnet_jax import models


def layer_names(model: models.PaperNet, input_size: int) -> list[str]:
  """Every named activation of ``model.apply(..., method="features")``."""
  return [s.name for s in model.layer_table(input_size)]


def check_layer(model, input_size: int, layer: str, what: str = "layer",
                allowed: Sequence[str] | None = None) -> str:
  """ValueError unless ``layer`` is an activation of the model (or in ``allowed``)."""
  names = layer_names(model, input_size)
  if allowed is not None:
    names = [n for n in names if n in allowed]
  if layer not in names:
    raise ValueError(f"unknown {what} {layer!r}; allowed: {', '.join(names)}")
  return layer


def num_channels(model, input_size: int, layer: str) -> int:
  """Number of maps (conv/pool/norm) or units (fc) of a layer."""
  for spec in model.layer_table(input_size):
    if spec.name == layer:
      return spec.features
  raise ValueError(f"unknown layer {layer!r}; allowed: {', '.join(layer_names(model, input_size))}")


def check_channels(model, input_size: int, layer: str, channels: Sequence[int],
                   what: str = "channel") -> list[int]:
  """ValueError unless every channel is in [0, maps of ``layer``)."""
  n = num_channels(model, input_size, layer)
  bad = [int(c) for c in channels if not 0 <= int(c) < n]
  if bad:
    raise ValueError(f"{what} {bad} out of range for {layer}: allowed 0..{n - 1}")
  return [int(c) for c in channels]


def spatial_layers(model, input_size: int) -> list[str]:
  return [s.name for s in model.layer_table(input_size) if s.kind != "fc"]


def features_fn(model, layers: Sequence[str]):
  """jit (variables, images (N,S,S,C)) -> {layer: activation} for the given layers (+ logits)."""
  keep = tuple(dict.fromkeys(list(layers) + ["logits"]))

  @jax.jit
  def fn(variables, x):
    f = model.apply(variables, x, method="features")
    return {k: f[k] for k in keep}
  return fn


def batched(fn, variables, images: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
  """Apply ``features_fn`` over ``images`` in batches (last batch padded, one compile)."""
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


def load_examples(config, workdir: str, num: int = -1, ids: Sequence[int] | None = None,
                  split: str | None = None):
  """(images (N,S,S,C) float32 mean-subtracted, labels (N,), ids (N,)) of a split.

  The first ``num`` examples, or exactly the examples with these ``ids``
  (index in the split; ValueError if the split is shorter).
  """
  from zfnet_jax import input_pipeline
  split = split or config.analyses.split or config.dataset.eval_split
  want = None if ids is None else [int(i) for i in ids]
  max_examples = num if want is None else max(want) + 1
  images, labels, got = [], [], []
  for batch in input_pipeline.create_eval_iterator(config, workdir, split=split,
                                                   max_examples=max_examples):
    m = np.asarray(batch["mask"])
    images.append(np.asarray(batch["image"])[m])
    labels.append(np.asarray(batch["label"])[m])
    got.append(np.asarray(batch["id"])[m])
  images, labels, got = (np.concatenate(a) for a in (images, labels, got))
  if want is None:
    return images[:num] if num > 0 else images, labels[:num] if num > 0 else labels, \
        got[:num] if num > 0 else got
  index = {int(i): k for k, i in enumerate(got)}
  missing = [i for i in want if i not in index]
  if missing:
    raise ValueError(f"image ids {missing} not in split {split!r} ({len(got)} examples read)")
  sel = [index[i] for i in want]
  return images[sel], labels[sel], got[sel]


def to_display(images: np.ndarray, mean: np.ndarray | None) -> np.ndarray:
  """Mean-subtracted images -> float [0, 1] for display; (.., S, S) when grey."""
  x = np.asarray(images, np.float32)
  x = (x + (0 if mean is None else mean)) / 255.0 if mean is not None else \
      (x - x.min()) / max(float(x.max() - x.min()), 1e-8)
  x = np.clip(x, 0, 1)
  return x[..., 0] if x.shape[-1] == 1 else x


def imshow(ax, image: np.ndarray, **kw):
  """Show a display image (grey if 2-D) without axes."""
  if image.ndim == 2:
    ax.imshow(image, cmap="gray", vmin=0, vmax=1, **kw)
  else:
    ax.imshow(image, **kw)
  ax.set_xticks([])
  ax.set_yticks([])


def pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=100, bbox_inches="tight")
  pyplot().close(fig)
  return path


def default_size(value: float, at_224: float, input_size: int) -> float:
  """``value`` unless it is negative, else the paper's 224-pixel value scaled to ``input_size``."""
  return value if value >= 0 else at_224 * input_size / 224.0


def ref(path: str, workdir: str) -> str:
  """A file's path for a report Section: relative to ``workdir`` when inside it, else absolute."""
  path, workdir = os.path.abspath(path), os.path.abspath(workdir)
  rel = os.path.relpath(path, workdir)
  return path if rel.startswith("..") else rel


def analysed_examples(config, workdir: str):
  """The images of ``config.analyses``: ``image_ids`` if given, else the first ``num_images``."""
  ids = list(config.analyses.image_ids)
  return load_examples(config, workdir, config.analyses.num_images, ids=ids or None)
