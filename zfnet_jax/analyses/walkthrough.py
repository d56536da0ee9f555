"""The way down, stage by stage (paper Fig. 1, Sec. 2.1), for one unit per layer.

For each chosen layer: the unit with the strongest activation over the analysed
images (first in (image, row, col, map) order on ties) is projected with
``deconv.walkthrough``, and every stage is drawn: the one non-zero activation,
then per layer below "normalise" (contrast normalisation), "unpool" (red dots: the
recorded switches of the windows that carry signal), "rectify" and "filter", down to
the pixel projection, beside the input and the unit's receptive field.
"""
from __future__ import annotations

import dataclasses

import matplotlib.patches
import numpy as np

from zfnet_jax import deconv
from zfnet_jax.analyses import common
from zfnet_jax.nn import geometry, models, torchvision
from zfnet_jax.render import content, figures

COLUMNS = ("normalise", "unpool", "rectify", "filter")   # one row per layer group


@dataclasses.dataclass(frozen=True)
class Options:
  """layers: the layers walked down from (one unit each)."""
  layers: tuple[str, ...]


def validate(options, net, data: content.Data) -> Options:
  """Validated options from ``config.analyses.walkthrough``; layers () = every conv layer."""
  net = deconv.as_network(net)
  layers = tuple(options.layers) or tuple(
      s.name for s in net.layer_table(data.input_size) if s.kind == "conv")
  for layer in layers:
    geometry.check_layer(net, data.input_size, layer, "walkthrough layer")
  return Options(layers)


def strongest_units(net, variables, images: np.ndarray, layers, batch_size: int = 64
                    ) -> dict[str, tuple[int, int, tuple[int, int], float]]:
  """{layer: (image index, map, (row, col), value)} of the largest activation of each
  layer over ``images`` (N, S, S, C); first in (image, row, col, map) order on ties."""
  acts = common.activations(net, variables, images, list(layers), batch_size)
  out = {}
  for layer in layers:
    a = acts[layer].reshape(len(images), 1, 1, -1) if acts[layer].ndim == 2 else acts[layer]
    (n, i, j, c), value = deconv.strongest_in(a, 4)
    out[layer] = int(n), int(c), (int(i), int(j)), float(value)
  return out


def _groups(stages: list[deconv.Stage]) -> list[list[deconv.Stage]]:
  """Stages below the unit in rows: a conv/fc layer's rectify and filter, with the
  pool and norm steps just above them."""
  if any(s.step == "signal" for s in stages):   # a network known by its named layers
    rest = stages[1:]
    return [rest[i:i + len(COLUMNS)] for i in range(0, len(rest), len(COLUMNS))]
  rows, row = [], []
  for s in stages[1:]:
    row.append(s)
    if s.step == "filter":
      rows.append(row)
      row = []
  return rows + ([row] if row else [])


def _active_switches(prev: deconv.Stage, stage: deconv.Stage) -> np.ndarray:
  """(K, 2) (row, col) switches of the pool windows whose incoming signal is non-zero."""
  return stage.switches[prev.signal != 0].reshape(-1, 2)


def plot(stages: list[deconv.Stage], display: np.ndarray, field, channel: int, title: str,
         path: str) -> str:
  """Fig. 1 for one unit.  Top row: the input (receptive field boxed), the receptive
  field's patch and projection (cropped as the atlas crops them), the unit.  Then one
  row per layer: normalise, unpool (or torchvision's average), rectify, filter (a network
  known by its named layers: the signal arriving at each, four per row); each summed over channels
  (zero = mid-grey, each scaled on its own), the last the pixel projection.
  display: (S, S) or (S, S, 3) in [0, 1]; field: the layer's ``geometry.ReceptiveField``
  (None: the whole image)."""
  plt = figures.pyplot()
  rows = _groups(stages)
  fig, axes = plt.subplots(1 + len(rows), len(COLUMNS),
                           figsize=(2.0 * len(COLUMNS), 2.1 * (1 + len(rows))), squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  unit, size = stages[0], display.shape[0]
  image = display.reshape(size, size, -1)
  projection = deconv.to_image(stages[-1].signal)
  if field is None:
    r0, r1, c0, c1 = 0, size, 0, size
    patch, crop = image, projection
  else:
    r0, r1, c0, c1 = field.window(*unit.position, size)
    patch, crop = (deconv.crop_receptive_field(a[None], field, np.asarray([unit.position]))[0]
                   for a in (image, projection))
  figures.imshow(axes[0, 0], display)
  axes[0, 0].add_patch(matplotlib.patches.Rectangle((c0 - .5, r0 - .5), c1 - c0, r1 - r0,
                                                    fill=False, ec="red", lw=1.5))
  axes[0, 0].set_title("input, receptive field", fontsize=8)
  for ax, picture, what in ((axes[0, 1], patch, "patch"), (axes[0, 2], crop, "projection")):
    figures.imshow(ax, picture[..., 0] if picture.shape[-1] == 1 else picture,
                   interpolation="nearest")
    ax.set_title(f"receptive field: {what}\n{picture.shape[0]}x{picture.shape[1]}", fontsize=8)
  unit = stages[0]
  _show(axes[0, 3], unit.signal)
  axes[0, 3].set_title(f"{unit.name}\nmap {channel} at {unit.position}", fontsize=8)
  for ax in axes[0]:
    ax.axis("on")
  prev = unit
  for r, row in enumerate(rows, start=1):
    for stage in row:
      column = (COLUMNS.index(stage.step) if stage.step in COLUMNS else
                COLUMNS.index("unpool") if stage.step == "average" else row.index(stage))
      ax = axes[r, column]
      ax.axis("on")
      last = stage is stages[-1]
      _show(ax, stage.signal, pixels=last)
      h, w, c = stage.signal.shape
      ax.set_title(f"{stage.name}{' = projection' if last else ''}\n{h}x{w}x{c}", fontsize=8)
      if stage.step == "unpool":
        pts = _active_switches(prev, stage)
        ax.scatter(pts[:, 1], pts[:, 0], s=float(np.clip((40 / h) ** 2, 1, 12)), c="red",
                   marker="o", linewidths=0)
      prev = stage
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return figures.save_figure(fig, path)


def _show(ax, signal: np.ndarray, pixels: bool = False) -> None:
  """A stage as a picture: the pixel projection as an image, any other signal summed
  over its channels; zero at mid-grey, each scaled by its largest absolute value."""
  img = deconv.to_image(signal if pixels else signal.sum(-1, keepdims=True))
  figures.imshow(ax, img[..., 0] if img.shape[-1] == 1 else img, interpolation="nearest")


def sections(context: content.Context, options: Options) -> list[content.Section]:
  """Fig. 1 for the strongest unit of each layer: walkthrough_<layer>.png and .npz."""
  net = context.net
  sec = content.Section("The way down, stage by stage", "walkthrough")
  if not len(context.images):
    sec.paragraphs.append("No analysed images.")
    return [sec]
  fields = net.receptive_fields(context.images.shape[1])
  sec.paragraphs.append(
      "How the deconvnet projects a unit back to pixels (paper Fig. 1, Sec. 2.1): for each "
      "layer, the strongest unit over the analysed images. Its activation is kept, every "
      "other one of the layer zeroed; then each layer below is undone in turn: contrast "
      "normalisation by its exact VJP (normalise), max-pooling by unpooling through the "
      "switches recorded on the way up (unpool; red dots: the switches of the windows that "
      "carry signal), the ReLU by the " + context.rule + " rule (rectify), the convolution "
      "by its transposed filters (filter). Each picture is the signal after that step, "
      "summed over channels (zero = mid-grey, each scaled on its own); the last is the "
      "pixel projection, shown in the top row cropped to the unit's receptive field beside "
      "the image patch (as in the atlas). Arrays: walkthrough_<layer>.npz (one key per stage)."
      + ("" if isinstance(net.module, (models.PaperNet, torchvision.TorchvisionNet)) else
         f" {net.name} is known by its named layers: each picture is the signal arriving "
         "at one of them."))
  units = strongest_units(net, context.variables, context.images, options.layers,
                          context.batch_size)
  for layer in options.layers:
    n, channel, position, value = units[layer]
    try:
      stages = deconv.walkthrough(net, context.variables, context.images[n], layer=layer,
                                  channel=channel, position=position, rule=context.rule)
    except ValueError as e:   # a construct the rewriter cannot walk through: say which
      sec.paragraphs.append(f"{e}.")
      return [sec]
    np.savez_compressed(context.path(f"walkthrough_{layer}.npz"),
                        **{f"{k:02d}_{s.layer}_{s.step}": s.signal for k, s in enumerate(stages)})
    label = context.class_name(context.labels[n])
    title = (f"{layer}, map {channel} at {position} (activation {value:.3g}) on image "
             f"{int(context.ids[n])} ({label})")
    plot(stages, common.to_display(context.images[n], context.pixel_mean), fields.get(layer),
         channel, title, context.path(f"walkthrough_{layer}.png"))
    sec.figures.append((f"walkthrough_{layer}.png", title + "."))
  return [sec]
