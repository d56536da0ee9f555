"""The legibility measure on hand-built units whose projections are known, against
NumPy references (a loop of central differences, np.corrcoef)."""
import numpy as np
import pytest

from zfnet_jax.analyses import legibility

T = 16


def _patches(n=24, groups=4, seed=0):
  """n patches (n, T, T, 1): a bright rectangle on black at a random place; groups of n/groups."""
  rng = np.random.default_rng(seed)
  x = np.zeros((n, T, T, 1))
  for i in range(n):
    r0, c0 = rng.integers(0, T - 6, 2)
    h, w = rng.integers(4, 9, 2)
    x[i, r0:r0 + h, c0:c0 + w] = 200.0
  return x, np.repeat(np.arange(groups), n // groups)


def _edges_loop(x):
  """Gradient magnitude of (T, T, C) by a loop: central differences, one-sided at borders."""
  h, w, c = x.shape
  out = np.zeros((h, w))
  for i in range(h):
    for j in range(w):
      s = 0.0
      for k in range(c):
        dy = (x[min(i + 1, h - 1), j, k] - x[max(i - 1, 0), j, k]) / (min(i + 1, h - 1) - max(i - 1, 0))
        dx = (x[i, min(j + 1, w - 1), k] - x[i, max(j - 1, 0), k]) / (min(j + 1, w - 1) - max(j - 1, 0))
        s += dy * dy + dx * dx
      out[i, j] = np.sqrt(s)
  return out


def _baseline_ref(projections, patches, groups, num_shifts=8):
  """Mean over units of the mean corrcoef of each projection's edges with other maps' patches."""
  n = len(groups)
  shifts = sorted(set(int(round(v)) for v in np.linspace(1, n - 1, num_shifts)))
  ep = [_edges_loop(p).ravel() for p in projections]
  ex = [_edges_loop(x).ravel() for x in patches]
  per_unit = []
  for i in range(n):
    cs = [np.corrcoef(ep[i], ex[(i + s) % n])[0, 1] for s in shifts
          if groups[(i + s) % n] != groups[i]]
    per_unit.append(np.mean(cs))
  return np.mean(per_unit)


def test_edge_map_and_correlation_match_numpy():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 7, 6, 3))
  np.testing.assert_allclose(legibility.edge_map(x)[1], _edges_loop(x[1]), rtol=1e-12)
  a, b = rng.normal(size=(2, 7, 6)), rng.normal(size=(2, 7, 6))
  mask = rng.random((2, 7, 6)) < 0.6
  got = legibility.masked_correlation(a, b, mask)
  for i in range(2):
    np.testing.assert_allclose(got[i], np.corrcoef(a[i][mask[i]], b[i][mask[i]])[0, 1],
                               rtol=1e-12)
  # A constant map has no correlation: 0, not NaN.
  assert legibility.masked_correlation(np.ones((1, 3, 3)), a[:1, :3, :3],
                                       np.ones((1, 3, 3), bool))[0] == 0.0


def test_a_projection_that_draws_its_patch_scores_one_minus_the_baseline():
  x, g = _patches()
  p = -3.0 * x + 7.0          # the patch, negated, scaled and offset: the same edges
  got = legibility.legibility(p, x, g)
  np.testing.assert_allclose(got.matched, 1.0, atol=1e-12)
  np.testing.assert_allclose(np.mean(got.baseline), _baseline_ref(p, x, g), atol=1e-12)
  np.testing.assert_allclose(got.score, 1.0 - _baseline_ref(p, x, g), atol=1e-12)
  assert got.score > 0.7
  assert got.as_dict() == {"score": round(1.0 - _baseline_ref(p, x, g), 4), "matched": 1.0,
                           "baseline": round(_baseline_ref(p, x, g), 4), "units": 24}


def test_a_unit_whose_shifts_meet_only_its_own_map_has_baseline_zero():
  """4 units of maps 0, 0, 1, 1 and one shift (1): units 0 and 2 meet only their own map
  (baseline 0, not NaN); unit 1 meets unit 2, unit 3 meets unit 0."""
  x, _ = _patches(n=4)
  p = np.random.default_rng(5).normal(size=x.shape)
  got = legibility.legibility(p, x, np.array([0, 0, 1, 1]), num_shifts=1)
  ep, ex = [_edges_loop(a).ravel() for a in p], [_edges_loop(a).ravel() for a in x]
  want = [0.0, np.corrcoef(ep[1], ex[2])[0, 1], 0.0, np.corrcoef(ep[3], ex[0])[0, 1]]
  np.testing.assert_allclose(got.baseline, want, atol=1e-12)
  matched = [np.corrcoef(ep[i], ex[i])[0, 1] for i in range(4)]
  np.testing.assert_allclose(got.matched, matched, atol=1e-12)
  assert got.as_dict() == {"score": round(np.mean(matched) - np.mean(want), 4),
                           "matched": round(np.mean(matched), 4),
                           "baseline": round(np.mean(want), 4), "units": 4}
  assert round(np.mean(matched), 5) != round(np.mean(matched), 4)   # 4 places, not 5


def test_grain_scores_at_the_baseline_and_a_regression_shows():
  """Adding grain to projections that draw their patches lowers the score toward 0;
  pure grain, or another map's patch, scores at the baseline (|score| small)."""
  x, g = _patches(n=64, groups=8)
  rng = np.random.default_rng(2)
  noise = rng.normal(size=x.shape)
  scores = [legibility.legibility(x + a * noise, x, g).score for a in (0.0, 20.0, 80.0, 1e6)]
  assert scores[0] > scores[1] > scores[2] > scores[3]
  assert abs(scores[3]) < 0.05                     # grain: at the mismatched baseline
  other = np.roll(x, 8, axis=0)                    # each unit shows another map's patch
  assert abs(legibility.legibility(other, x, g).score) < 0.05
  shifted = np.roll(x, 4, axis=2)                  # the right patch, 4 px off
  assert 0 < legibility.legibility(shifted, x, g).score < scores[0] - 0.2


def test_pixels_outside_the_mask_do_not_count():
  x, g = _patches()
  mask = np.zeros(x.shape[:3], bool)
  mask[:, :, :10] = True
  p = x.copy()
  p[:, :, 11:] = np.random.default_rng(3).normal(size=p[:, :, 11:].shape) * 1e3
  got = legibility.legibility(p, x, g, mask)
  ok = got.matched[np.ptp(legibility.edge_map(x)[:, :, :10].reshape(len(x), -1), 1) > 0]
  np.testing.assert_allclose(ok, 1.0, atol=1e-9)


@pytest.mark.parametrize("kw, match", [
    (dict(projections=np.zeros((4, T, T, 1)), patches=np.zeros((4, T, T - 1, 1)),
          groups=np.arange(4)), "must both be"),
    (dict(projections=np.zeros((4, T, T, 1)), patches=np.zeros((4, T, T, 1)),
          groups=np.zeros(4)), "at least 2 feature maps"),
    (dict(projections=np.zeros((4, T, T, 1)), patches=np.zeros((4, T, T, 1)),
          groups=np.arange(3)), "groups must be"),
])
def test_bad_input_is_a_clear_error(kw, match):
  with pytest.raises(ValueError, match=match):
    legibility.legibility(**kw)
