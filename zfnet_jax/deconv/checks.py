"""Argument checks of the deconvnet's entry points, made before any computation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from zfnet_jax.nn import geometry, models, rules

RULES = tuple(rules.RULES)   # the rule names


# ----------------------------------------------------------------------------
# Validation (before any computation).
# ----------------------------------------------------------------------------

def _check_images(images, what="images"):
  shape = getattr(images, "shape", None)
  if shape is None or len(shape) != 4 or shape[1] != shape[2]:
    raise ValueError(f"{what} must be square NHWC (N, S, S, C), got shape {shape}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"{what} must be floating point (mean-subtracted pixels), "
                     f"got dtype {images.dtype}")


MAX_ABS_PIXEL = 255.0  # mean-subtracted 0..255 pixels lie in [-255, 255]


def check_images(model: models.PaperNet, variables, images, what="images"):
  """ValueError unless ``images`` fit the model: (N, S, S, C) float, C the model's
  input channels, S the size its fc layers were built for (any size that fits the
  convs for a model with an adaptive pool before fc6), and (when not traced)
  finite mean-subtracted pixels in [-255, 255]."""
  _check_images(images, what)
  params = variables.get("params", {}) if hasattr(variables, "get") else {}
  kernel = params.get("conv1", {}).get("kernel") if hasattr(params, "get") else None
  size, channels = images.shape[1], images.shape[3]
  if kernel is not None and kernel.shape[2] != channels:
    raise ValueError(f"{what} have {channels} channels; the model takes {kernel.shape[2]} "
                     f"(shape {tuple(images.shape)})")
  fc = next((params[n]["kernel"] for n in ("fc6", "fc7", "fc8") if n in params), None)
  if fc is not None and not getattr(model, "adaptive_pool", False):
    try:
      h, w, c = geometry.layer_shapes(model, size)["pool5"]
      ok = h * w * c == fc.shape[0]
    except Exception:  # pylint: disable=broad-except  (too small for the layer table)
      ok = False
    if not ok:
      raise ValueError(f"{what} are {size}x{size}, not the input size the model's "
                       f"parameters were trained for (fc input {fc.shape[0]} features)")
  if not isinstance(images, jax.core.Tracer):
    x = np.asarray(images)
    if not np.isfinite(x).all():
      raise ValueError(f"{what} contain NaN or infinite values")
    top = float(np.abs(x).max()) if x.size else 0.0
    if top > MAX_ABS_PIXEL * 1.01:
      raise ValueError(f"{what} have values up to {top:.4g}; allowed: mean-subtracted "
                       f"pixels (0..255 minus the pixel mean), within +-{MAX_ABS_PIXEL:g}")


def _check_layer(model, input_size, layer):
  shapes = geometry.layer_shapes(model, input_size)
  if not isinstance(layer, str) or layer not in shapes:
    raise ValueError(f"unknown layer {layer!r}; allowed: {', '.join(shapes)}")
  return shapes[layer]


def _check_channel(layer, shape, channel):
  c = shape[2]
  if isinstance(channel, (bool, np.bool_)) or not isinstance(channel, (int, np.integer)):
    raise ValueError(f"channel must be an int, got {channel!r}")
  if not 0 <= channel < c:
    raise ValueError(f"channel {channel} out of range for layer {layer!r}: "
                     f"allowed 0..{c - 1}")


def _check_position(layer, shape, position):
  if position is None:
    return
  try:
    row, col = (int(v) for v in position)
    ok = all(float(v) == int(v) for v in position)
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f"position must be None or (row, col) ints, got {position!r}")
  if not (0 <= row < shape[0] and 0 <= col < shape[1]):
    raise ValueError(f"position {(row, col)} outside the {shape[0]}x{shape[1]} map of "
                     f"layer {layer!r}: allowed rows 0..{shape[0] - 1}, "
                     f"cols 0..{shape[1] - 1}")

