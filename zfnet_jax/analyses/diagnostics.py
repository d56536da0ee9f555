"""Architecture diagnostics (paper Sec. 4 "architecture selection", Fig. 6): the report's
section and figures.

First-layer filters as a grid (each filter scaled on its own), their radial power
spectra, dead filters, filter RMS and the layer-2 aliasing indicator, for the model
and every comparison model of the context (AlexNet trained with ZFNet's recipe on the
same data, and the same model trained without feature scale clipping, trained by the
job (``report.comparisons``) when ``analyses.diagnostics.train_comparison`` is on).
The numbers are ``spectra.measure``'s.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from zfnet_jax import deconv
from zfnet_jax.analyses import spectra
from zfnet_jax.nn import geometry
from zfnet_jax.render import content, figures


@dataclasses.dataclass(frozen=True)
class Options:
  """dead_threshold: fraction of the largest filter RMS; fft_size: px (0 = no padding);
  high_freq: cycles/px."""
  dead_threshold: float
  fft_size: int
  high_freq: float
  first_layer: str = "conv1"     # its kernel: dead filters, spectra
  second_layer: str = "conv2"    # its projections: aliasing


def validate(options, net, data: content.Data) -> Options:
  """Validated options from ``config.analyses.diagnostics`` (its train_comparison,
  comparison_epochs and comparison_workdir are ``report.comparisons``', not read here)."""
  spectra.dead_filters(np.ones((1, 1, 1, 1)), options.dead_threshold)
  spectra.high_freq_fraction(np.zeros((1, 2, 2, 1)), options.high_freq)
  if options.fft_size < 0:
    raise ValueError(f"diagnostics.fft_size {options.fft_size} not allowed: >= 0")
  if "conv1" not in geometry.layer_names(deconv.as_network(net), data.input_size):
    raise ValueError("diagnostics need a conv1 layer")
  return Options(float(options.dead_threshold), int(options.fft_size), float(options.high_freq))


def plot(results: dict, path: str, high_freq: float, layer: str = "conv1") -> str:
  """Fig. 6: per model a filter grid of ``layer``; spectra overlaid."""
  plt = figures.pyplot()
  names = list(results)
  fig, axes = plt.subplots(1, len(names) + 1, figsize=(4.2 * (len(names) + 1), 4), squeeze=False)
  for ax, name in zip(axes[0], names):
    r = results[name]
    ax.imshow(figures.filter_grid(r["kernel"]), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{name} {layer} {r['kernel'].shape[0]}x{r['kernel'].shape[1]}: "
                 f"{100 * r['dead_fraction']:.0f}% dead", fontsize=9)
  ax = axes[0, -1]
  for name in names:
    r = results[name]
    ax.semilogy(r["frequencies"], np.maximum(r["spectrum"], 1e-8), marker=".", label=name)
  ax.axvline(high_freq, color="grey", ls=":")
  ax.set_xlabel("spatial frequency (cycles/px)")
  ax.set_ylabel("fraction of filter energy")
  ax.set_title(f"radial power spectrum of {layer} filters", fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return figures.save_figure(fig, path)


def plot_projections(results: dict, path: str, cols: int = 8, layer: str = "conv2"
                     ) -> str | None:
  """A row of ``layer`` projections per model with them; None (nothing written) if none."""
  plt = figures.pyplot()
  names = [n for n in results if "projections" in results[n]]
  if not names:
    return None
  fig, axes = plt.subplots(len(names), cols, figsize=(1.3 * cols, 1.5 * len(names)), squeeze=False)
  for r, name in enumerate(names):
    proj = deconv.to_image(results[name]["projections"])[..., 0]
    for c in range(cols):
      ax = axes[r, c]
      if c < len(proj):
        figures.imshow(ax, proj[c])
      ax.axis("off")
    axes[r, 0].set_title(f"{name}: {layer} projections, high-freq energy "
                         f"{results[name]['aliasing_mean']:.2f}", fontsize=8, loc="left")
  return figures.save_figure(fig, path)


ALIASING_IMAGES = 64   # at least this many images of the split for the aliasing indicator


def sections(context: content.Context, options: Options) -> list[content.Section]:
  """Fig. 6 for the context's network and each of ``context.comparisons``:
  diagnostics.npz, diagnostics.png, diagnostics_<second layer>.png, one Section."""
  o = options
  first, second = o.first_layer, o.second_layer
  kw = dict(dead_threshold=o.dead_threshold, fft_size=o.fft_size, high_freq=o.high_freq,
            rule=context.rule, first_layer=first, second_layer=second)
  images = context.images
  if context.examples is not None and len(images) < ALIASING_IMAGES:
    images = context.examples(num=ALIASING_IMAGES)[0]
  images = images if len(images) else None
  results = {context.net.name: spectra.measure(context.net, context.variables, images, **kw)}
  notes = []
  for name, (net, variables, note) in context.comparisons.items():
    results[name] = spectra.measure(net, variables, images, **kw)
    notes.append(note)
  if not context.comparisons:
    notes.append("No comparison model: set --config.analyses.diagnostics.train_comparison=True "
                 "to train one.")
  np.savez_compressed(context.path("diagnostics.npz"),
                      **{f"{n}/{k}": v for n, r in results.items() for k, v in r.items()})
  plot(results, context.path("diagnostics.png"), o.high_freq, first)
  proj_name = f"diagnostics_{second}.png"
  proj = plot_projections(results, context.path(proj_name), layer=second)
  rows = [[n, f"{r['kernel'].shape[0]}x{r['kernel'].shape[1]}", f"{r['dead_fraction']:.3f}",
           f"{r['rms_max']:.4g}", f"{r['rms_median']:.4g}",
           f"{r['rms_max'] / max(r['rms_median'], 1e-30):.3g}",
           f"{r['filter_low_freq']:.3f}", f"{r['filter_high_freq']:.3f}",
           f"{r['aliasing_mean']:.3f}" if "aliasing_mean" in r else "-"]
          for n, r in results.items()]
  num_images = 0 if images is None else len(images)
  sec = content.Section(
      "Architecture diagnostics", "diagnostics",
      paragraphs=[
          "Paper Fig. 6: AlexNet's 11x11/4 first layer gives filters mixing very high and very "
          "low frequencies, many dead filters and aliasing in layer 2; ZFNet's 7x7/2 fixes both. "
          "Fig. 6(a): trained without feature scale clipping, a few first-layer filters grow "
          "far above the others and dominate (largest / median filter RMS); with clipping "
          "no filter's RMS exceeds the clip radius. "
          f"Dead filter: RMS weight < {o.dead_threshold:g} x the layer's largest filter RMS. "
          f"Spectrum: |FFT|^2 of each filter zero-padded to {max(o.fft_size, 1)} px, normalised, "
          f"binned by radius, averaged over filters. High frequency: >= {o.high_freq:g} "
          "cycles/px. Aliasing indicator: that high-frequency share of the energy of the "
          f"{context.rule} projections of the strongest activation of each of the first 16 "
          f"{second} maps over {num_images} images."] + notes,
      figures=[("diagnostics.png", f"{first} filters and their radial power spectra.")],
      tables=[(["model", f"{first} kernel", "dead fraction", "filter RMS: largest", "median",
                "largest / median", "filter energy < 0.1 c/px",
                f"filter energy >= {o.high_freq:g} c/px", f"{second} aliasing indicator"], rows)])
  if proj:
    sec.figures.append((proj_name, "Layer-2 projections (mean over colour)."))
  return [sec]

