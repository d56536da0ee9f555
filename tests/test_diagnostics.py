"""Dead filters, radial spectra and the high-frequency indicator on hand-made filters."""
import numpy as np
import pytest

from zfnet_jax.analyses import diagnostics


def test_dead_fraction_by_hand():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(5, 5, 3, 8))
  kernel[..., 2] *= 0.01          # RMS ~ 0.01 of the others -> dead
  kernel[..., 5] = 0.0            # all zero -> dead
  kernel[..., 6] *= 0.2           # weak but alive at threshold 0.05
  dead = diagnostics.dead_filters(kernel, 0.05)
  np.testing.assert_array_equal(np.where(dead)[0], [2, 5])
  rms = np.sqrt((kernel ** 2).mean((0, 1, 2)))
  np.testing.assert_allclose(diagnostics.filter_rms(kernel), rms)
  assert diagnostics.dead_filters(kernel, 0.5).sum() == 3
  with pytest.raises(ValueError, match="1.5"):
    diagnostics.dead_filters(kernel, 1.5)


def test_radial_spectrum_of_hand_made_filters():
  k = 8
  y, x = np.mgrid[:k, :k]
  const = np.ones((k, k, 1))
  checker = ((-1.0) ** (x + y))[..., None]                      # frequency (1/2, 1/2)
  wave = np.cos(2 * np.pi * x / 4)[..., None]                   # 1/4 cycles/px along columns
  freqs, e = diagnostics.radial_spectrum(const[None])
  np.testing.assert_allclose(freqs, np.arange(len(e)) / k)
  np.testing.assert_allclose(e[0], 1.0)
  freqs, e = diagnostics.radial_spectrum(checker[None])
  np.testing.assert_allclose(e[round(np.sqrt(0.5) * k)], 1.0)    # corner: r = 0.707 -> bin 6
  freqs, e = diagnostics.radial_spectrum(wave[None])
  np.testing.assert_allclose(e[2], 1.0, atol=1e-12)               # r = 1/4 = bin 2 of 8
  np.testing.assert_allclose(e.sum(), 1.0)
  # averaged over filters, each normalised: half DC, half at 1/4 (different amplitudes)
  _, e = diagnostics.radial_spectrum(np.stack([3 * const, wave]))
  np.testing.assert_allclose(e[[0, 2]], [0.5, 0.5], atol=1e-12)
  # zero-padding keeps the energy where it was, spread around it
  freqs, e = diagnostics.radial_spectrum(wave[None], fft_size=32)
  assert abs(freqs[np.argmax(e)] - 0.25) <= 1 / 32


def test_high_freq_fraction():
  k = 8
  y, x = np.mgrid[:k, :k]
  sig = np.stack([np.ones((k, k)), (-1.0) ** (x + y), np.cos(2 * np.pi * x / 8),
                  np.ones((k, k)) + (-1.0) ** x])[..., None]
  # ones + (-1)^x: energy 64^2 at DC and 64^2 at (0, 1/2) -> half high
  np.testing.assert_allclose(diagnostics.high_freq_fraction(sig, 0.25), [0, 1, 0, 0.5], atol=1e-12)
  with pytest.raises(ValueError, match="high_freq 0"):
    diagnostics.high_freq_fraction(sig, 0.0)
