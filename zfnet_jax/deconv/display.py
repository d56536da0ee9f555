"""Projections as the paper shows them, and the part of the input a unit sees.
"""
from __future__ import annotations

import numpy as np

from zfnet_jax.deconv.checks import _check_layer, _check_position
from zfnet_jax.deconv.networks import as_network
from zfnet_jax.nn import geometry

# ----------------------------------------------------------------------------
# Display.
# ----------------------------------------------------------------------------

def to_image(projections) -> np.ndarray:
  """Projections -> float32 images in [0, 1] as the paper shows them.

  Each projection (each leading index of an (N, H, W, C) batch, or a single
  (H, W, C) array) is scaled on its own by its largest absolute value, with zero
  at mid-grey 0.5: 0.5 + p / (2 max|p|).  An all-zero projection is flat grey.
  """
  p = np.asarray(projections, np.float32)
  if p.ndim not in (3, 4):
    raise ValueError(f"projections must be (H, W, C) or (N, H, W, C), got shape {p.shape}")
  axes = tuple(range(p.ndim - 3, p.ndim))
  scale = np.max(np.abs(p), axis=axes, keepdims=True)
  scale = np.where(scale > 0, 2 * scale, 1.0)
  return np.clip(0.5 + p / scale, 0.0, 1.0)


def receptive_patch(model, images, layer: str, position, *,
                    fill: float = 0.0, clip: bool = False):
  """The part of the input that unit ``position`` of ``layer`` sees.

  Args:
    images: (N, S, S, C) or (S, S, C); also works on projections.
    layer: a spatial layer (conv*, pool*, norm*); fc layers see the whole image.
    position: (row, col), or (N, 2) one per image.
    fill: value outside the image (0 = the mean pixel for mean-subtracted images).
    clip: False -> crops of the full receptive-field size (size x size, parts
      outside the image set to ``fill``), so every crop is centred alike; True ->
      only the part inside the image (a list for a batch).
  Returns:
    (N, size, size, C) (or (size, size, C)) array, or clipped crops.
  """
  x = np.asarray(images)
  single = x.ndim == 3
  if single:
    x = x[None]
  if x.ndim != 4 or x.shape[1] != x.shape[2]:
    raise ValueError(f"images must be (S, S, C) or (N, S, S, C), got shape {np.shape(images)}")
  n, s = x.shape[0], x.shape[1]
  shape = _check_layer(model, s, layer)
  fields = as_network(model).receptive_fields(s)
  if layer not in fields:  # fc: the whole image
    return [c for c in x] if (clip and not single) else (x[0] if single else x)
  pos = np.asarray(position)
  pos = np.broadcast_to(pos, (n, 2)) if pos.shape == (2,) else pos
  if pos.shape != (n, 2):
    raise ValueError(f"position must be (row, col) or ({n}, 2), got shape {pos.shape}")
  for p in pos:
    _check_position(layer, shape, tuple(p))
  rf = fields[layer]
  if clip:
    windows = [rf.window(int(i), int(j), s) for i, j in pos]
    crops = [img[a:b, c:d] for img, (a, b, c, d) in zip(x, windows)]
    return crops[0] if single else crops
  crops = crop_receptive_field(x, rf, pos, fill, full=True)
  return crops[0] if single else crops


def crop_receptive_field(images: np.ndarray, rf: geometry.ReceptiveField,
                         positions: np.ndarray, fill: float = 0.5, *,
                         full: bool = False) -> np.ndarray:
  """Crop each image to its unit's receptive field (the project's one cropper).

  images (R, S, S, C); positions (R, 2) (row, col) of the units -> (R, t, t, C).
  ``full``: t = rf.size, each crop placed where it lies in the full field, parts
  outside the image ``fill`` (so every crop is centred alike).  Else t = min(rf.size,
  S), float32: when rf.size <= S as with ``full``; when rf.size > S the crop is the S
  pixels of each axis that start at the field's first pixel or, when the field starts
  before the image, end at its last pixel inside the image (the whole image when the
  field covers it).
  """
  s = images.shape[1]
  t = rf.size if full else min(rf.size, s)
  out = np.full((images.shape[0], t, t, images.shape[3]), fill,
                images.dtype if full else np.float32)
  for n, (i, j) in enumerate(np.asarray(positions)):
    r0, r1, c0, c1 = rf.window(int(i), int(j), s)
    top, left = rf.offset + int(i) * rf.stride, rf.offset + int(j) * rf.stride
    if full:
      dr, dc = r0 - top, c0 - left
    else:
      dr = t - (r1 - r0) if top < 0 else 0
      dc = t - (c1 - c0) if left < 0 else 0
    out[n, dr:dr + r1 - r0, dc:dc + c1 - c0] = images[n, r0:r1, c0:c1]
  return out
