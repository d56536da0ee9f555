"""The paper's preprocessing (Sec. 3) of one image or a batch, in NumPy.

The smaller side resized to ``resize_size`` (R, paper 256) by area-weighted taps and the
centre R x R square kept; random ``crop_size`` (S, paper 224) crops and horizontal flips
for training, the centre crop or the paper's ten crops for evaluation; the per-pixel
mean of the training split subtracted (``Preprocessing``).
"""
from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np

from zfnet_jax.data.sources import IMAGE_EXTENSIONS

# ----------------------------------------------------------------------------
# NumPy preprocessing (in-memory datasets).
# ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) matrix of jax.image.resize's linear (antialiased) resize."""
  import jax
  return np.asarray(jax.image.resize(np.eye(n_in, dtype=np.float32), (n_out, n_in), "linear"),
                    np.float32)


@functools.lru_cache(maxsize=16)
def _resize_taps(n_in: int, n_out: int, start: int, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Rows [start, start + size) of ``_resize_matrix`` as taps: (index, weight), each (T, size).

  Output pixel i is sum_t weight[t, i] * input[index[t, i]], with the nonzero
  weights of row i in ascending input order (unused taps: weight 0).
  """
  a = _resize_matrix(n_in, n_out)[start:start + size]
  taps = max(1, int((a != 0).sum(1).max()))
  index, weight = np.zeros((taps, size), np.intp), np.zeros((taps, size), np.float32)
  for i, row in enumerate(a):
    nz = np.flatnonzero(row)
    index[:len(nz), i], weight[:len(nz), i] = nz, row[nz]
  return index, weight


def _resize_axis(x: np.ndarray, taps: tuple[np.ndarray, np.ndarray], axis: int) -> np.ndarray:
  """Linear resize of one axis by element-wise multiply-adds in a fixed tap order."""
  index, weight = taps
  shape = [1] * x.ndim
  shape[axis] = -1
  out = np.take(x, index[0], axis=axis) * weight[0].reshape(shape)
  for t in range(1, len(index)):
    out += np.take(x, index[t], axis=axis) * weight[t].reshape(shape)
  return out


def _np_resize_centre(images: np.ndarray, size: int) -> np.ndarray:
  """uint8 (N, H, W, C) -> float32 (N, size, size, C): smaller side to size, centre crop.

  Separable, with the same weights as ``jax.image.resize(..., "linear")``, and
  computed by element-wise float32 multiply-adds in a fixed order (no BLAS): an
  image's result is bit-identical whatever batch it comes in, on any CPU.
  """
  h, w = images.shape[1:3]
  scale = size / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  x = images.astype(np.float32)
  x = _resize_axis(x, _resize_taps(h, nh, (nh - size) // 2, size), 1)
  return _resize_axis(x, _resize_taps(w, nw, (nw - size) // 2, size), 2)


def crops_and_flips(images: np.ndarray, crop: int, tops, lefts, flips) -> np.ndarray:
  """(N, R, R, C) -> (N, crop, crop, C): the window at (tops[i], lefts[i]) of image i,
  mirrored left-right where flips[i]."""
  out = np.empty((images.shape[0], crop, crop, images.shape[3]), np.float32)
  for i, (t, l, f) in enumerate(zip(tops, lefts, flips)):
    x = images[i, t:t + crop, l:l + crop]
    out[i] = x[:, ::-1] if f else x
  return out


def centre_crop(images, crop: int):
  """(..., R, R, C) -> (..., crop, crop, C), top-left at (R - crop) // 2."""
  r = images.shape[-3]
  o = (r - crop) // 2
  return images[..., o:o + crop, o:o + crop, :]


def ten_crop_offsets(size: int, crop: int) -> list[tuple[int, int, bool]]:
  """The paper's 10 crops: (top, left, flipped) for 4 corners + centre, each also flipped."""
  c, e = (size - crop) // 2, size - crop
  pos = [(0, 0), (0, e), (e, 0), (e, e), (c, c)]
  return [(t, l, f) for f in (False, True) for t, l in pos]


# ----------------------------------------------------------------------------
# One image from a file or an array (``zfnet_jax.report.visualize``).
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class Preprocessing:
  """How an image becomes a model input, as the model was trained.

  The smaller side is resized to ``resize_size`` (R) and the centre R x R square
  kept (``_np_resize_centre``, the in-memory pipeline's resize), then the centre
  ``crop_size`` (S) square; the input is (pixels - mean) / std, pixels in 0..255.
  mean: (S, S, C) per-pixel or (C,) per-channel, in 0..255 units; std: 1 (our
  models: mean-subtracted pixels) or (C,) in 0..255 units (ImageNet-normalised models).
  channels: 1 (an RGB image is converted to grey) or 3 (a grey one to RGB).
  """
  resize_size: int
  crop_size: int
  channels: int
  mean: np.ndarray
  std: float | np.ndarray = 1.0

  def __call__(self, pixels: np.ndarray) -> np.ndarray:
    """uint8 or float pixels (H, W, C) in 0..255 -> float32 (S, S, C) model input."""
    x = np.asarray(pixels, np.float32)
    if x.ndim == 2:
      x = x[..., None]
    if x.ndim != 3 or x.shape[-1] != self.channels:
      raise ValueError(f"image must be (H, W, {self.channels}) pixels, got shape {x.shape}")
    x = _np_resize_centre(x[None], self.resize_size)
    x = centre_crop(x, self.crop_size)[0]
    return ((x - np.asarray(self.mean, np.float32)) /
            np.asarray(self.std, np.float32)).astype(np.float32)

  def display(self, x: np.ndarray) -> np.ndarray:
    """Model inputs (..., S, S, C) -> display pixels in [0, 1]."""
    return np.clip((np.asarray(x, np.float32) * np.asarray(self.std, np.float32) +
                    np.asarray(self.mean, np.float32)) / 255.0, 0.0, 1.0)


def preprocessing(config, pixel_mean: np.ndarray) -> Preprocessing:
  """Our models' preprocessing: ``config.dataset`` sizes, the (S, S, C) training mean."""
  mean = np.asarray(pixel_mean, np.float32)
  return Preprocessing(int(config.dataset.resize_size), int(config.dataset.crop_size),
                       int(mean.shape[-1]), mean)


def read_image(path: str, channels: int) -> np.ndarray:
  """uint8 (H, W, channels) pixels of a JPEG/PNG/... file (EXIF rotation applied,
  converted to grey or RGB); ValueError naming the path if it is missing, not an
  image or corrupt."""
  from PIL import Image, ImageOps, UnidentifiedImageError
  if not os.path.exists(path):
    raise ValueError(f"{path}: no such file")
  if os.path.isdir(path):
    raise ValueError(f"{path}: a folder, not an image file")
  try:
    with Image.open(path) as im:
      im = ImageOps.exif_transpose(im)
      im = im.convert("L" if channels == 1 else "RGB")
      pixels = np.asarray(im, np.uint8)
  except UnidentifiedImageError:
    raise ValueError(f"{path}: not an image (allowed: {', '.join(IMAGE_EXTENSIONS)})") from None
  except (OSError, SyntaxError, ValueError) as e:
    raise ValueError(f"{path}: corrupt or truncated image ({e})") from None
  return pixels.reshape(pixels.shape[0], pixels.shape[1], channels)

