"""Legibility of projections: does a unit's projection show its patch's structure?

For unit i with projection P_i and input patch X_i (both cropped to its
receptive field, (t, t, C)), the *match* is the Pearson correlation, over the
pixels of the window that lie inside the image, of the edge map of P_i with
the edge map of X_i (``edge_map``: gradient magnitude, channels in
quadrature): 1 when the projection draws the patch's edges and contours (up to
sign, offset and scale, e.g. a projection equal to the patch), lower as grain
or checkerboard adds edges the patch does not have.

Both edge maps share a spatial prior (units fire on centred structure,
projections gather at the centre, windows at the image border are cut), so a
match alone says little.  The *baseline* pairs each projection with the
patches of units of other feature maps (other images, same kind of window):
a projection that shows its own patch matches it better than the others, one
that is grain or a fixed pattern does not.  The *legibility* of a set of
units is mean(match) - mean(baseline), in correlation units: ~0 for
projections unrelated to their patches, up to 1 - baseline for projections
that reproduce them.

Everything here is NumPy on arrays: a function of projections, patches and
masks, nothing of a model, config or workdir.
"""
from __future__ import annotations

import dataclasses

import numpy as np


def edge_map(patches: np.ndarray) -> np.ndarray:
  """(n, t, t, C) -> (n, t, t) gradient magnitude sqrt(sum_c dy^2 + dx^2), central
  differences inside, one-sided at the border (``np.gradient``)."""
  x = np.asarray(patches, np.float64)
  if x.ndim != 4:
    raise ValueError(f"patches must be (n, t, t, C), got shape {x.shape}")
  dy, dx = np.gradient(x, axis=(1, 2))
  return np.sqrt(np.sum(dy * dy + dx * dx, axis=-1))


def masked_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Pearson correlation of a[i] and b[i] over the pixels where mask[i]: (n, ...) -> (n,).

  0 where either map is constant on the mask (or the mask has < 2 pixels).
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  m = np.asarray(mask, bool)
  n = a.shape[0]
  a, b, m = a.reshape(n, -1), b.reshape(n, -1), m.reshape(n, -1)
  cnt = np.maximum(m.sum(1), 1)
  ma = (a * m).sum(1) / cnt
  mb = (b * m).sum(1) / cnt
  da, db = (a - ma[:, None]) * m, (b - mb[:, None]) * m
  va, vb = (da * da).sum(1), (db * db).sum(1)
  ok = (va > 1e-300) & (vb > 1e-300) & (m.sum(1) >= 2)
  return np.where(ok, (da * db).sum(1) / np.sqrt(np.where(ok, va * vb, 1.0)), 0.0)


@dataclasses.dataclass
class Legibility:
  """matched: (n,) match of each unit with its own patch; baseline: (n,) its mean
  match with other maps' patches; score = mean(matched) - mean(baseline)."""
  matched: np.ndarray
  baseline: np.ndarray

  @property
  def score(self) -> float:
    return float(np.mean(self.matched) - np.mean(self.baseline))

  def as_dict(self) -> dict:
    return {"score": round(self.score, 4), "matched": round(float(np.mean(self.matched)), 4),
            "baseline": round(float(np.mean(self.baseline)), 4), "units": int(len(self.matched))}


def legibility(projections: np.ndarray, patches: np.ndarray, groups: np.ndarray,
               mask: np.ndarray | None = None, *, num_shifts: int = 8) -> Legibility:
  """Legibility of n units (module docstring).

  projections: (n, t, t, C) projections (any offset and scale per unit); patches: (n, t, t, C) input pixels (any affine scale); groups: (n,)
  feature map of each unit (the baseline uses only other groups); mask: (n, t, t)
  bool, True where the window lies inside the image (default all).  The
  baseline of unit i averages its match with the patches of units
  (i + s) mod n, for ``num_shifts`` shifts s spread over [1, n) (pairs within
  a group skipped), each on the two units' common mask.
  """
  p, x = np.asarray(projections), np.asarray(patches)
  groups = np.asarray(groups)
  n = p.shape[0]
  if p.shape != x.shape or p.ndim != 4:
    raise ValueError(f"projections {p.shape} and patches {x.shape} must both be (n, t, t, C)")
  if groups.shape != (n,):
    raise ValueError(f"groups must be (n,) = ({n},), got shape {groups.shape}")
  if len(np.unique(groups)) < 2:
    raise ValueError("legibility needs units of at least 2 feature maps (groups) for its "
                     "baseline")
  mask = np.ones(p.shape[:3], bool) if mask is None else np.asarray(mask, bool)
  if mask.shape != p.shape[:3]:
    raise ValueError(f"mask must be (n, t, t) = {p.shape[:3]}, got shape {mask.shape}")
  e, edges = edge_map(p), edge_map(x)
  matched = masked_correlation(e, edges, mask)
  shifts = np.unique(np.linspace(1, n - 1, num_shifts).round().astype(int))
  total, count = np.zeros(n), np.zeros(n)
  for s in shifts:
    j = (np.arange(n) + s) % n
    other = groups[j] != groups
    c = masked_correlation(e, edges[j], mask & mask[j])
    total += np.where(other, c, 0.0)
    count += other
  baseline = np.where(count > 0, total / np.maximum(count, 1), 0.0)
  return Legibility(matched, baseline)
