"""Architecture diagnostics (paper Sec. 4 "architecture selection", Fig. 6).

* First-layer filters as a grid (each filter scaled on its own).
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

``comparison``: the same numbers for ZFNet and AlexNet trained with the same
recipe on the same data (the other model is trained in a sub-workdir when
``analyses.diagnostics.train_comparison`` is on).
"""
from __future__ import annotations

import copy
import os

import numpy as np

from zfnet_jax.analyses import common

COUNTERPART = {"ZFNet": "AlexNet", "AlexNet": "ZFNet",
               "ZFNetLowRes": "AlexNetLowRes", "AlexNetLowRes": "ZFNetLowRes"}


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


def layer2_projections(model, variables, images: np.ndarray, num_maps: int = 16,
                       rule: str = "deconvnet", layer: str = "conv2") -> np.ndarray:
  """(M, S, S, C): projection of the strongest activation over ``images`` of each of
  maps 0..M-1 of ``layer``."""
  from zfnet_jax import deconv
  size = images.shape[1]
  common.check_layer(model, size, layer, "aliasing layer", common.spatial_layers(model, size))
  m = min(num_maps, common.num_channels(model, size, layer))
  f = common.batched(common.features_fn(model, [layer]), variables, images, 64)[layer]
  best = f[..., :m].reshape(len(f), -1, m).max(1).argmax(0)         # (M,) image index
  return np.asarray(deconv.project_many(model, variables, images[best], layer=layer,
                                        channels=np.arange(m), rule=rule))


def measure(model, variables, images: np.ndarray | None, *, dead_threshold=0.05, fft_size=32,
            high_freq=0.25, rule="deconvnet") -> dict:
  """All Fig. 6 numbers of one model; aliasing only when ``images`` is given."""
  kernel = np.asarray(variables["params"]["conv1"]["kernel"])
  dead = dead_filters(kernel, dead_threshold)
  freqs, energy = radial_spectrum(np.moveaxis(kernel, -1, 0), fft_size)
  out = {"kernel": kernel, "dead": dead, "dead_fraction": float(dead.mean()),
         "frequencies": freqs, "spectrum": energy,
         "filter_high_freq": float(energy[freqs >= high_freq - 1e-12].sum()),
         "filter_low_freq": float(energy[freqs < 0.1].sum())}
  if images is not None:
    proj = layer2_projections(model, variables, images, rule=rule)
    proj = proj.mean(-1, keepdims=True)
    proj = proj - proj.mean((1, 2), keepdims=True)
    out["aliasing"] = high_freq_fraction(proj, high_freq)
    out["aliasing_mean"] = float(out["aliasing"].mean())
    out["projections"] = proj
  return out


def comparison_workdir(config, workdir: str) -> str:
  d = config.analyses.diagnostics
  other = COUNTERPART.get(config.model.name)
  return d.comparison_workdir or os.path.join(workdir, f"comparison_{other}")


def train_comparison(config, workdir: str) -> str | None:
  """Train the counterpart (AlexNet <-> ZFNet, same widths and recipe) in a sub-workdir.

  Epochs: ``analyses.diagnostics.comparison_epochs`` (-1 = this run's).  The
  sub-run writes no report and no analyses.  Skipped when that workdir already
  has results.json.  Returns the sub-workdir (None if there is no counterpart).
  """
  from zfnet_jax import train
  other = COUNTERPART.get(config.model.name)
  if other is None:
    return None
  sub = comparison_workdir(config, workdir)
  if os.path.exists(os.path.join(sub, "results.json")):
    return sub
  c = copy.deepcopy(config)
  with c.unlocked():
    c.model.name = other
    if config.analyses.diagnostics.comparison_epochs > 0:
      c.num_epochs = float(config.analyses.diagnostics.comparison_epochs)
      c.num_train_steps = -1
      if not config.evolution_reference_epochs > 0:   # unscaled epochs must fit the run
        c.evolution_epochs = tuple(e for e in config.evolution_epochs if e <= c.num_epochs)
    c.report.enabled = False
    c.analyses.enabled = False
    c.analyses.diagnostics.train_comparison = False
  train.train_and_evaluate(c, sub)
  return sub


def _at_epoch(workdir: str, epoch: float):
  """(model, variables, epoch) of ``workdir``'s evolution checkpoint nearest ``epoch``
  (within 5%), else (None, None, None)."""
  from zfnet_jax import train
  try:
    evo = dict(train.evolution_checkpoints(workdir))
  except FileNotFoundError:
    evo = {}
  near = min(evo, key=lambda e: abs(e - epoch), default=None)
  if near is None or abs(near - epoch) > 0.05 * epoch + 1e-3:
    return None, None, None
  model, variables, _ = train.load_trained(workdir, evo[near])
  return model, variables, near


def plot(results: dict, path: str, high_freq: float) -> str:
  """Fig. 6: per model a filter grid; spectra overlaid; aliasing bars."""
  from zfnet_jax import figures
  plt = common.pyplot()
  names = list(results)
  fig, axes = plt.subplots(1, len(names) + 1, figsize=(4.2 * (len(names) + 1), 4), squeeze=False)
  for ax, name in zip(axes[0], names):
    r = results[name]
    ax.imshow(figures.filter_grid(r["kernel"]), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{name} conv1 {r['kernel'].shape[0]}x{r['kernel'].shape[1]}: "
                 f"{100 * r['dead_fraction']:.0f}% dead", fontsize=9)
  ax = axes[0, -1]
  for name in names:
    r = results[name]
    ax.semilogy(r["frequencies"], np.maximum(r["spectrum"], 1e-8), marker=".", label=name)
  ax.axvline(high_freq, color="grey", ls=":")
  ax.set_xlabel("spatial frequency (cycles/px)")
  ax.set_ylabel("fraction of filter energy")
  ax.set_title("radial power spectrum of conv1 filters", fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return common.save(fig, path)


def plot_projections(results: dict, path: str, cols: int = 8) -> str | None:
  plt = common.pyplot()
  from zfnet_jax import deconv
  names = [n for n in results if "projections" in results[n]]
  if not names:
    return None
  fig, axes = plt.subplots(len(names), cols, figsize=(1.3 * cols, 1.5 * len(names)), squeeze=False)
  for r, name in enumerate(names):
    proj = deconv.to_image(results[name]["projections"])[..., 0]
    for c in range(cols):
      ax = axes[r, c]
      if c < len(proj):
        common.imshow(ax, proj[c])
      ax.axis("off")
    axes[r, 0].set_title(f"{name}: conv2 projections, high-freq energy "
                         f"{results[name]['aliasing_mean']:.2f}", fontsize=8, loc="left")
  return common.save(fig, path)


def section(config, workdir: str, model, variables, out_dir: str):
  from zfnet_jax import report
  d = config.analyses.diagnostics
  kw = dict(dead_threshold=d.dead_threshold, fft_size=d.fft_size, high_freq=d.high_freq,
            rule=config.report.rule)
  dead_filters(np.zeros((1, 1, 1, 1)), d.dead_threshold)        # validate before work
  high_freq_fraction(np.zeros((1, 2, 2, 1)), d.high_freq)
  if d.fft_size < 0:
    raise ValueError(f"diagnostics.fft_size {d.fft_size} not allowed: >= 0")
  images, _, _ = common.load_examples(config, workdir, max(config.analyses.num_images, 64))
  results = {config.model.name: measure(model, variables, images, **kw)}
  notes = []
  sub = train_comparison(config, workdir) if d.train_comparison else None
  if sub is None and COUNTERPART.get(config.model.name):
    cand = comparison_workdir(config, workdir)
    sub = cand if os.path.exists(os.path.join(cand, "results.json")) else None
  if sub is not None:
    from zfnet_jax import train
    other, ovars, ocfg = train.load_trained(sub)
    epochs = float(ocfg.num_epochs)
    results[ocfg.model.name] = measure(other, ovars, images, **kw)
    if epochs < float(config.num_epochs):   # compare at the same epoch when kept
      m, v, at = _at_epoch(workdir, epochs)
      if at is not None:
        results = {config.model.name: results[config.model.name],
                   f"{config.model.name} (epoch {at:g})": measure(m, v, images, **kw),
                   ocfg.model.name: results[ocfg.model.name]}
        notes.append(f"{config.model.name} is also shown at its epoch-{at:g} evolution "
                     f"checkpoint, as long as {ocfg.model.name} was trained.")
    notes.append(f"{ocfg.model.name}: trained in {sub} for {epochs:g} epochs with this run's "
                 "recipe.")
  else:
    other = COUNTERPART.get(config.model.name, "the other model")
    notes.append(f"No {other} run to compare with: set --config.analyses.diagnostics."
                 f"train_comparison=True to train one in {comparison_workdir(config, workdir)}.")
  np.savez_compressed(os.path.join(out_dir, "diagnostics.npz"),
                      **{f"{n}/{k}": v for n, r in results.items() for k, v in r.items()})
  fig = plot(results, os.path.join(out_dir, "diagnostics.png"), d.high_freq)
  proj = plot_projections(results, os.path.join(out_dir, "diagnostics_conv2.png"))
  rows = [[n, f"{r['kernel'].shape[0]}x{r['kernel'].shape[0]}", f"{r['dead_fraction']:.3f}",
           f"{r['filter_low_freq']:.3f}", f"{r['filter_high_freq']:.3f}",
           f"{r['aliasing_mean']:.3f}"] for n, r in results.items()]
  sec = report.Section(
      "Architecture diagnostics", "diagnostics",
      paragraphs=[
          "Paper Fig. 6: AlexNet's 11x11/4 first layer gives filters mixing very high and very "
          "low frequencies, many dead filters and aliasing in layer 2; ZFNet's 7x7/2 fixes both. "
          f"Dead filter: RMS weight < {d.dead_threshold:g} x the layer's largest filter RMS. "
          f"Spectrum: |FFT|^2 of each filter zero-padded to {max(d.fft_size, 1)} px, normalised, "
          f"binned by radius, averaged over filters. High frequency: >= {d.high_freq:g} cycles/px. "
          "Aliasing indicator: that high-frequency share of the energy of the deconvnet "
          "projections of the strongest activation of each of the first 16 conv2 maps over "
          f"{len(images)} images."] + notes,
      figures=[(common.ref(fig, workdir), "conv1 filters and their radial power spectra.")],
      tables=[(["model", "conv1 kernel", "dead fraction", "filter energy < 0.1 c/px",
                f"filter energy >= {d.high_freq:g} c/px", "conv2 aliasing indicator"], rows)])
  if proj:
    sec.figures.append((common.ref(proj, workdir), "Layer-2 projections (mean over colour)."))
  return sec
