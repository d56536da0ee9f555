"""The layer table and what follows from it: map sizes, receptive fields, checks.

A network's ``layer_table(input_size)`` is a list of ``LayerSpec`` (name, kind,
kernel, stride, padding, maps, map side); one table drives both the forward pass and
the receptive fields, so the two cannot disagree.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

CONV_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5")


FC_NAMES = ("fc6", "fc7")


REMOVABLE = ("conv3", "conv4", "fc6", "fc7")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One row of the layer table.

  kind: "conv", "pool", "norm", "fc".  For conv/pool: ``kernel``, ``stride``,
  ``pad`` = (top/left, bottom/right) padding in pixels, ``out`` = output side.
  """
  name: str
  kind: str
  features: int = 0
  kernel: int = 1
  stride: int = 1
  pad: tuple[int, int] = (0, 0)
  out: int = 0


def conv_out(n: int, kernel: int, stride: int, pad: int) -> tuple[int, tuple[int, int]]:
  """cuda-convnet convolution: (output size, (pad_lo, pad_hi))."""
  out = 1 + -(-(2 * pad + n - kernel) // stride)
  hi = (out - 1) * stride + kernel - n - pad
  return out, (pad, max(hi, 0))


@dataclasses.dataclass(frozen=True)
class ReceptiveField:
  """Input-space window of a unit: unit (i, j) sees rows
  [offset + i * stride, offset + i * stride + size) (and the same for columns),
  clipped to the image.  ``offset`` is negative where padding lies top/left."""
  size: int
  stride: int
  offset: int

  def window(self, i: int, j: int, input_size: int) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1) of unit (i, j), clipped to the image."""
    r0, c0 = self.offset + i * self.stride, self.offset + j * self.stride
    clip = lambda v: min(max(v, 0), input_size)
    return clip(r0), clip(r0 + self.size), clip(c0), clip(c0 + self.size)


def receptive_fields(model, input_size: int) -> dict[str, ReceptiveField]:
  """Receptive field of every spatial layer, from the layer table.

  Composition rule per layer (kernel k, stride s, top/left pad p):
  size += (k - 1) * jump; offset -= p * jump; jump *= s.
  """
  size, jump, offset, out = 1, 1, 0, {}
  for spec in model.layer_table(input_size):
    if spec.kind == "fc":
      break
    if spec.kind in ("conv", "pool"):
      size += (spec.kernel - 1) * jump
      offset -= spec.pad[0] * jump
      jump *= spec.stride
    out[spec.name] = ReceptiveField(size, jump, offset)
  return out


# ----------------------------------------------------------------------------
# Layer introspection: for anything with ``layer_table(input_size)`` (our
# models, and ``deconv.Network`` for any other CNN).
# ----------------------------------------------------------------------------

def layer_shapes(model, input_size: int) -> dict[str, tuple[int, int, int]]:
  """{layer name: (rows, cols, channels)} of every activation; fc layers are (1, 1, units)."""
  return {s.name: (1, 1, s.features) if s.kind == "fc" else (s.out, s.out, s.features)
          for s in model.layer_table(input_size)}


def layer_names(model, input_size: int) -> list[str]:
  """Every named activation of ``features``, in order."""
  return [s.name for s in model.layer_table(input_size)]


def spatial_layers(model, input_size: int) -> dict[str, int]:
  """{name: maps} of every conv/pool/norm layer (not fc) at this input size."""
  return {s.name: s.features for s in model.layer_table(input_size) if s.kind != "fc"}


def check_layer(model, input_size: int, layer: str, what: str = "layer", *,
                spatial: bool = False) -> str:
  """ValueError unless ``layer`` is an activation of the model (a spatial one if asked)."""
  names = list(spatial_layers(model, input_size)) if spatial else layer_names(model, input_size)
  if not isinstance(layer, str) or layer not in names:
    raise ValueError(f"unknown {what} {layer!r}; allowed: {', '.join(names)}")
  return layer


def check_channels(model, input_size: int, layer: str, channels: Sequence[int],
                   what: str = "channel") -> list[int]:
  """ValueError unless every channel is in [0, maps (or units) of ``layer``)."""
  n = layer_shapes(model, input_size)[check_layer(model, input_size, layer)][2]
  bad = [c for c in channels if isinstance(c, bool) or int(c) != c or not 0 <= int(c) < n]
  if bad:
    raise ValueError(f"{what} {list(bad)} out of range for {layer}: allowed 0..{n - 1}")
  return [int(c) for c in channels]

