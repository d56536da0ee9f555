"""Measures of a network's first layers, as arrays and numbers (paper Fig. 6, and the
first-layer study).

* Filter RMS: the root mean square weight of each conv1 filter; without feature scale
  clipping a few filters grow far above the others and dominate (Fig. 6(a)).
* Dead filters: a conv1 filter is *dead* when its RMS weight is below
  ``dead_threshold`` (default 0.05) times the largest filter RMS of the layer,
  i.e. it has shrunk to nothing next to its neighbours (Fig. 6(b)'s flat grey
  tiles).  Scale-free, so it works with and without feature scale clipping.
* Radial power spectrum of the conv1 filters: each filter (k, k, Cin) is
  zero-padded to ``fft_size`` (no padding if 0), |FFT2|^2 summed over input
  channels and normalised to total 1; spatial frequencies are binned by radius
  r = |f| in cycles/pixel (bin b holds round(r * n) = b, n the FFT size; the
  corner reaches 0.71), and the filters' spectra averaged.  ``high_freq_fraction``
  = energy at r >= ``high_freq`` (default 0.25 cycles/px, half of Nyquist).
* Aliasing indicator for layer 2: the same high-frequency energy fraction of
  the deconvnet projections (mean over channels, mean removed) of the strongest
  activation of each conv2 map over sample images.  A coarse first-layer stride
  (AlexNet's 4) leaves a grid of period 4 px in these projections, i.e. energy
  at 0.25 cycles/px and its harmonics.
* First-layer sweep measures (``first_layer_measures``): the filter
  spectrum split into bands (``band_fractions``), the share of conv1's response
  that folds back at its stride (``aliased_fraction``), the energy of layer-2
  projections at the stride's grid frequencies (``grid_energy``), and the
  parameters and FLOPs of the first layers (``layer_costs``).

Every function takes a ``deconv.Network`` or one of our models, and NumPy arrays.
"""
from __future__ import annotations

import numpy as np

from zfnet_jax import deconv
from zfnet_jax.analyses import common
from zfnet_jax.nn import geometry


def filter_rms(kernel: np.ndarray) -> np.ndarray:
  """(k, k, Cin, F) -> (F,) root mean square weight of each filter."""
  k = np.asarray(kernel, np.float64)
  return np.sqrt((k.reshape(-1, k.shape[-1]) ** 2).mean(0))


def dead_filters(kernel: np.ndarray, threshold: float = 0.05) -> np.ndarray:
  """(F,) bool: filter RMS < threshold x the largest filter RMS."""
  if not 0 <= threshold < 1:
    raise ValueError(f"dead_threshold {threshold} not allowed: 0 <= threshold < 1")
  rms = filter_rms(kernel)
  return rms < threshold * rms.max()


def _radial_bins(n: int) -> np.ndarray:
  f = np.fft.fftfreq(n)
  r = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
  return np.round(r * n).astype(int)


def power_spectrum(images: np.ndarray, fft_size: int = 0) -> np.ndarray:
  """(..., h, w, C) 2-D signals -> (..., n, n) power |FFT2|^2 summed over C, each normalised to 1.

  n = max(fft_size, h, w); signals are zero-padded to n x n (top/left aligned).
  """
  x = np.asarray(images, np.float64)
  n = max(int(fft_size), x.shape[-3], x.shape[-2])
  p = np.abs(np.fft.fft2(x, s=(n, n), axes=(-3, -2))) ** 2
  p = p.sum(-1)
  total = p.sum((-2, -1), keepdims=True)
  return p / np.where(total > 0, total, 1)


def radial_spectrum(images: np.ndarray, fft_size: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Mean radial energy distribution of a stack of 2-D signals (N, h, w, C).

  Returns (frequencies (B,) cycles/px = b / n, energy (B,) summing to 1).
  """
  p = power_spectrum(images, fft_size)
  n = p.shape[-1]
  p = p.reshape(-1, n, n).mean(0)
  b = _radial_bins(n)
  energy = np.bincount(b.ravel(), weights=p.ravel(), minlength=b.max() + 1)
  return np.arange(len(energy)) / n, energy


def high_freq_fraction(images: np.ndarray, cutoff: float = 0.25, fft_size: int = 0) -> np.ndarray:
  """(N, h, w, C) -> (N,) fraction of each signal's energy at radius >= ``cutoff`` cycles/px."""
  if not 0 < cutoff <= 0.75:
    raise ValueError(f"high_freq {cutoff} not allowed: 0 < cutoff <= 0.75 cycles/px")
  p = power_spectrum(images, fft_size)
  n = p.shape[-1]
  f = np.fft.fftfreq(n)
  r = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
  return (p * (r >= cutoff - 1e-12)).sum((-2, -1))


def layer2_projections(net, variables, images: np.ndarray, rule: str = "deconvnet",
                       layer: str = "conv2", num_maps: int = 16) -> np.ndarray:
  """(M, S, S, C): for each of maps 0..M-1 of ``layer`` (M = min(num_maps, its maps)),
  the projection of its strongest activation over ``images`` (N, S, S, C)."""
  net = deconv.as_network(net)
  size = images.shape[1]
  geometry.check_layer(net, size, layer, "aliasing layer", spatial=True)
  m = min(num_maps, geometry.layer_shapes(net, size)[layer][2])
  f = common.activations(net, variables, images, [layer])[layer]
  best = f[..., :m].reshape(len(f), -1, m).max(1).argmax(0)         # (M,) image index
  return np.asarray(net.project(variables, images[best], layer=layer, channels=np.arange(m),
                                positions=None, rule=rule))


def measure(net, variables, images: np.ndarray | None, *, dead_threshold=0.05, fft_size=32,
            high_freq=0.25, rule="deconvnet", first_layer="conv1", second_layer="conv2"
            ) -> dict:
  """All Fig. 6 numbers of one network: dead filters and radial spectrum of the
  ``first_layer`` kernel (k, k, Cin, F); aliasing of ``second_layer`` projections only
  when ``images`` is given."""
  net = deconv.as_network(net)
  kernel = net.param(variables, first_layer)
  if kernel is None:
    raise ValueError(f"{net.name} has no {first_layer} kernel (variables['params']"
                     f"[{first_layer!r}]['kernel'])")
  kernel = np.asarray(kernel)
  dead = dead_filters(kernel, dead_threshold)
  rms = filter_rms(kernel)
  freqs, energy = radial_spectrum(np.moveaxis(kernel, -1, 0), fft_size)
  out = {"kernel": kernel, "dead": dead, "dead_fraction": float(dead.mean()),
         "rms": rms, "rms_max": float(rms.max()), "rms_median": float(np.median(rms)),
         "frequencies": freqs, "spectrum": energy,
         "filter_high_freq": float(energy[freqs >= high_freq - 1e-12].sum()),
         "filter_low_freq": float(energy[freqs < 0.1].sum())}
  if images is not None:
    proj = layer2_projections(net, variables, images, rule=rule, layer=second_layer)
    proj = proj.mean(-1, keepdims=True)
    proj = proj - proj.mean((1, 2), keepdims=True)
    out["aliasing"] = high_freq_fraction(proj, high_freq)
    out["aliasing_mean"] = float(out["aliasing"].mean())
    out["projections"] = proj
  return out


# ----------------------------------------------------------------------------
# First-layer sweep: bands, aliasing at a stride, costs.
# ----------------------------------------------------------------------------

# Band edges in cycles/px (radius |f|): sampling at stride s keeps |f| < 1/(2s), so
# low (< 1/8) survives stride 4, mid (1/8 .. 1/4) survives stride 2 but folds back at
# stride 4, high (>= 1/4, up to 0.71 in the corners) survives only stride 1.
BAND_EDGES = (0.125, 0.25)
BAND_NAMES = ("low", "mid", "high")


def band_fractions(images: np.ndarray, edges=BAND_EDGES, fft_size: int = 0) -> np.ndarray:
  """(N, h, w, C) -> (N, len(edges) + 1) share of each signal's energy per radial band
  [0, e0), [e0, e1), ..., [e_last, 0.71] cycles/px (``power_spectrum``; rows sum to 1)."""
  edges = [float(e) for e in edges]
  if not edges or edges[0] <= 0 or edges[-1] > 0.75 or any(
      a >= b for a, b in zip(edges, edges[1:])):
    raise ValueError(f"band edges {tuple(edges)} not allowed: increasing, in (0, 0.75] cycles/px")
  p = power_spectrum(images, fft_size)
  n = p.shape[-1]
  f = np.fft.fftfreq(n)
  r = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
  band = np.searchsorted(np.asarray(edges) - 1e-12, r, side="right")   # (n, n) band index
  return np.stack([(p * (band == b)).sum((-2, -1)) for b in range(len(edges) + 1)], -1)


def _check_stride(stride) -> int:
  if isinstance(stride, bool) or int(stride) != stride or stride < 1:
    raise ValueError(f"stride {stride!r} not allowed: an int >= 1")
  return int(stride)


def grid_mask(n: int, stride: int) -> np.ndarray:
  """(n, n) bool: the FFT bins of the frequencies (i/s, j/s) cycles/px, (i, j) != (0, 0)
  (bin round(i n / s)): where a pattern of period ``stride`` px puts its energy."""
  s = _check_stride(stride)
  idx = np.unique(np.round(np.arange(s) * n / s).astype(int) % n)
  m = np.zeros((n, n), bool)
  m[np.ix_(idx, idx)] = True
  m[0, 0] = False
  return m


def grid_energy(images: np.ndarray, stride: int) -> np.ndarray:
  """(N, h, w, C) -> (N,) share of each signal's energy (mean removed per channel) at the
  grid frequencies of ``stride`` (``grid_mask``; 0 for stride 1).  A signal with a flat
  spectrum scores (s^2 - 1) / n^2; a pattern repeating every s px scores 1."""
  x = np.asarray(images, np.float64)
  x = x - x.mean((-3, -2), keepdims=True)
  p = power_spectrum(x)
  return (p * grid_mask(p.shape[-1], stride)).sum((-2, -1))


def aliased_fraction(kernel: np.ndarray, images: np.ndarray, stride: int) -> float:
  """Share of a conv layer's response energy that sampling at ``stride`` folds back.

  kernel (k, k, C, F), images (N, n, n, C), n >= k.  The response of every filter at
  stride 1 (cross-correlation, periodic, mean removed) has spectrum
  R_f(u) = sum_c X_c(u) conj(K_cf(u)); the result is the energy of R at frequencies
  with max(|u_x|, |u_y|) >= 1 / (2 stride) over all its energy, pooled over images and
  filters (a dead filter adds nothing).  0 for stride 1 (nothing is sampled away, the
  Nyquist bin included); in [0, 1].
  """
  s = _check_stride(stride)
  k = np.asarray(kernel, np.float64)
  x = np.asarray(images, np.float64)
  n = x.shape[1]
  if x.ndim != 4 or k.ndim != 4 or x.shape[-1] != k.shape[2] or k.shape[0] > n:
    raise ValueError(f"kernel {k.shape} (k, k, C, F) and images {x.shape} (N, n, n, C) "
                     "need the same C and k <= n")
  kf = np.conj(np.fft.fft2(k, s=(n, n), axes=(0, 1)))               # (n, n, C, F)
  f = np.abs(np.fft.fftfreq(n))
  outside = (np.maximum(f[:, None], f[None, :]) >= 1 / (2 * s) - 1e-12) & (s > 1)
  outside[0, 0] = False
  folded = total = 0.0
  for i in range(0, len(x), 8):                                      # bounded memory
    xf = np.fft.fft2(x[i:i + 8], axes=(1, 2))                        # (8, n, n, C)
    power = np.abs(np.einsum("nuvc,uvcf->nuvf", xf, kf)) ** 2       # (8, n, n, F)
    folded += power[:, outside].sum()
    total += power.sum() - power[:, 0, 0].sum()
  return float(folded / total) if total > 0 else 0.0


def layer_costs(net, input_size: int, channels: int, names=("conv1", "conv2")) -> dict:
  """{layer: {"params", "flops"}} of conv layers from the layer table: params
  k^2 Cin F + F, flops 2 k^2 Cin F out^2 (a multiply-add is 2) per image."""
  table = deconv.as_network(net).layer_table(input_size)
  cin, out = channels, {}
  for spec in table:
    if spec.kind == "conv" and spec.name in names:
      macs = spec.kernel ** 2 * cin * spec.features
      out[spec.name] = {"params": macs + spec.features, "flops": 2 * macs * spec.out ** 2}
    if spec.kind in ("conv", "fc"):
      cin = spec.features
  missing = [n for n in names if n not in out]
  if missing:
    raise ValueError(f"no conv layer {missing} in {getattr(net, 'name', 'the network')}")
  return out


def first_layer_measures(net, variables, images: np.ndarray, *, dead_threshold=0.05,
                         fft_size=32, high_freq=0.25, edges=BAND_EDGES, rule="deconvnet",
                         first_layer="conv1", second_layer="conv2") -> dict:
  """``measure`` plus the first-layer sweep's numbers for one network; images (N, S, S, C).

  Adds: kernel_size, stride, pad, conv1_out (output side) of ``first_layer`` (layer
  table); filter_<band> the
  mean ``band_fractions`` of its live filters (all filters if none lives);
  conv1_aliased ``aliased_fraction`` of its response to ``images``; aliasing_grid
  the mean ``grid_energy`` at its stride of the ``second_layer`` projections (their
  ``aliasing_mean`` is the high-frequency indicator); <layer>_params / _flops.
  """
  m = measure(net, variables, images, dead_threshold=dead_threshold, fft_size=fft_size,
              high_freq=high_freq, rule=rule, first_layer=first_layer,
              second_layer=second_layer)
  size, channels = images.shape[1], images.shape[-1]
  spec = next(s for s in deconv.as_network(net).layer_table(size) if s.name == first_layer)
  kernel = np.moveaxis(m["kernel"], -1, 0)                             # (F, k, k, C)
  alive = kernel[~m["dead"]] if (~m["dead"]).any() else kernel
  bands = band_fractions(alive, edges, fft_size).mean(0)
  m.update(kernel_size=spec.kernel, stride=spec.stride, pad=spec.pad[0], conv1_out=spec.out,
           conv1_aliased=aliased_fraction(m["kernel"], images, spec.stride),
           aliasing_grid=float(grid_energy(m["projections"], spec.stride).mean()),
           **{f"filter_{b}": float(v) for b, v in zip(BAND_NAMES, bands)})
  for name, c in layer_costs(net, size, channels, (first_layer, second_layer)).items():
    m[f"{name}_params"], m[f"{name}_flops"] = c["params"], c["flops"]
  return m
