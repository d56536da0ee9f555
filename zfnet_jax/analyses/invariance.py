"""Invariance of features and class to translation, scale and rotation (paper Sec. 4.1, Fig. 5).

Each image (mean-subtracted, so 0 = the mean) is warped by bilinear
interpolation about its centre c = (S-1)/2, with the mean filling what comes
in from outside:

* ``translation``: vertical shift by ``t`` px (positive = down), default
  -60..60 px at 224 (scaled to the input size);
* ``scale``: zoom by ``s`` in 1..1.8 (output (y, x) samples c + (y - c)/s);
* ``rotation``: ``theta`` in 0..350 degrees, counter-clockwise as displayed.

For every amount: Euclidean distance between the feature vectors of the
original and the transformed image at each layer (raw, and divided by the
norm of the original's vector), the probability of the true class, and the
most probable class.  Amount 0 (translation 0, scale 1, rotation 0) is the
identity, so its distance is 0.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from zfnet_jax import deconv, xla
from zfnet_jax.analyses import common
from zfnet_jax.nn import geometry
from zfnet_jax.render import content, figures

TRANSFORMS = ("translation", "scale", "rotation")
UNITS = {"translation": "vertical shift (px)", "scale": "scale factor",
         "rotation": "rotation (deg)"}


@dataclasses.dataclass(frozen=True)
class Options:
  """layers: whose feature vectors are compared; amounts: {kind: (A,) amounts} of Fig. 5."""
  layers: tuple[str, ...]
  amounts: dict[str, np.ndarray]


def validate(options, net, data: content.Data) -> Options:
  """Resolved and validated options from ``config.analyses.invariance``."""
  net = deconv.as_network(net)
  layers = tuple(options.layers)
  for layer in layers:
    geometry.check_layer(net, data.input_size, layer, "invariance layer")
  _check_logits(net, data.input_size)
  return Options(layers, amounts(options, data.input_size))


def _check_logits(net: deconv.Network, input_size: int) -> None:
  if "logits" not in geometry.layer_names(net, input_size):
    raise ValueError(f"invariance needs class probabilities: network {net.name!r} has no "
                     "'logits' activation")


def amounts(ic, input_size: int) -> dict[str, np.ndarray]:
  """The transform amounts of Fig. 5 from ``config.analyses.invariance`` (validated).

  translation: (num_shifts,) px; scale: (num_scales,) factors; rotation: degrees.
  """
  shift = common.default_size(ic.max_shift, 60.0, input_size)
  for name, v, lo in (("num_shifts", ic.num_shifts, 2), ("num_scales", ic.num_scales, 2)):
    if v < lo:
      raise ValueError(f"invariance.{name} = {v} not allowed: >= {lo}")
  if not 0 < shift < input_size:
    raise ValueError(f"invariance.max_shift = {shift} not allowed: 0 < shift < {input_size}")
  if not ic.max_scale > 1:
    raise ValueError(f"invariance.max_scale = {ic.max_scale} not allowed: > 1")
  if not 0 < ic.rotation_step <= 180:
    raise ValueError(f"invariance.rotation_step = {ic.rotation_step} not allowed: 0 < step <= 180")
  return {"translation": np.linspace(-shift, shift, ic.num_shifts),
          "scale": np.linspace(1.0, ic.max_scale, ic.num_scales),
          "rotation": np.arange(0.0, 360.0, ic.rotation_step)}


def transform(image: jax.Array, kind: str, amount) -> jax.Array:
  """Warp one image (S, S, C) by ``amount`` of ``kind``; outside pixels are 0 (the mean)."""
  if kind not in TRANSFORMS:
    raise ValueError(f"unknown transform {kind!r}; allowed: {', '.join(TRANSFORMS)}")
  s = image.shape[0]
  c = (s - 1) / 2.0
  y, x = jnp.meshgrid(jnp.arange(s, dtype=jnp.float32), jnp.arange(s, dtype=jnp.float32),
                      indexing="ij")
  a = jnp.asarray(amount, jnp.float32)
  if kind == "translation":
    yi, xi = y - a, x
  elif kind == "scale":
    yi, xi = c + (y - c) / a, c + (x - c) / a
  else:
    t = jnp.deg2rad(a)
    cos, sin = jnp.cos(t), jnp.sin(t)
    dy, dx = y - c, x - c
    yi, xi = c + cos * dy + sin * dx, c - sin * dy + cos * dx
  warp = lambda ch: jax.scipy.ndimage.map_coordinates(ch, [yi, xi], order=1, mode="constant",
                                                      cval=0.0)
  return jax.vmap(warp, in_axes=2, out_axes=2)(image)


@functools.lru_cache(maxsize=None)
def _transform_many_fn(kind: str):
  return xla.jit(jax.vmap(jax.vmap(lambda im, a: transform(im, kind, a), (None, 0)), (0, None)))


def transform_many(images: np.ndarray, kind: str, amounts_: np.ndarray) -> np.ndarray:
  """(N, S, S, C) images x (A,) amounts -> (N, A, S, S, C)."""
  fn = _transform_many_fn(kind)
  return np.asarray(fn(jnp.asarray(images, jnp.float32), jnp.asarray(amounts_, jnp.float32)))


def measure(net, variables, images: np.ndarray, labels: np.ndarray, layers,
            amounts_: dict[str, np.ndarray], batch_size: int = 64) -> dict:
  """Fig. 5's curves for images (N, S, S, C) with true classes ``labels`` (N,).

  net: a ``deconv.Network`` (or one of our models); its features need "logits".
  Returns {kind: {"amounts": (A,), "distance/<layer>": (N, A), "normalised/<layer>": (N, A),
  "prob_true": (N, A), "top_class": (N, A)}}.
  """
  net = deconv.as_network(net)
  size = images.shape[1]
  for layer in layers:
    geometry.check_layer(net, size, layer, "invariance layer")
  _check_logits(net, size)
  f0 = common.activations(net, variables, images, layers, batch_size)
  n = len(images)
  labels = np.asarray(labels)
  out = {}
  for kind, am in amounts_.items():
    x = transform_many(images, kind, am)
    a = len(am)
    f = common.activations(net, variables, x.reshape((n * a,) + x.shape[2:]), layers,
                           batch_size)
    r = {"amounts": np.asarray(am)}
    for layer in layers:
      v0 = f0[layer].reshape(n, 1, -1).astype(np.float64)
      v = f[layer].reshape(n, a, -1).astype(np.float64)
      d = np.linalg.norm(v - v0, axis=-1)
      r[f"distance/{layer}"] = d
      r[f"normalised/{layer}"] = d / np.maximum(np.linalg.norm(v0, axis=-1), 1e-12)
    p = common.softmax(f["logits"].astype(np.float64)).reshape(n, a, -1)
    r["prob_true"] = np.take_along_axis(p, labels[:, None, None], -1)[..., 0]
    r["top_class"] = p.argmax(-1)
    out[kind] = r
  return out


def plot(results: dict, layers, labels, class_names, path: str) -> str:
  """Rows = transforms; columns = raw and normalised distance per layer, then p(true class)."""
  plt = figures.pyplot()
  kinds = list(results)
  cols = [(f"distance/{l}", f"{l}: Euclidean distance") for l in layers] + \
         [(f"normalised/{l}", f"{l}: distance / |original|") for l in layers] + \
         [("prob_true", "p(true class)")]
  fig, axes = plt.subplots(len(kinds), len(cols), figsize=(3.3 * len(cols), 2.8 * len(kinds)),
                           squeeze=False)
  names = list(class_names) if class_names else None
  for r, kind in enumerate(kinds):
    res = results[kind]
    for c, (key, title) in enumerate(cols):
      ax = axes[r, c]
      for i, curve in enumerate(res[key]):
        lab = f"{i}: {names[int(labels[i])]}" if names else str(i)
        ax.plot(res["amounts"], curve, marker=".", ms=3, lw=1, label=lab)
      ax.set_xlabel(UNITS[kind], fontsize=8)
      ax.set_title(title, fontsize=9)
      ax.tick_params(labelsize=7)
  axes[0, -1].legend(fontsize=7, loc="best")
  fig.tight_layout()
  return figures.save_figure(fig, path)


def plot_examples(image: np.ndarray, mean, amounts_: dict[str, np.ndarray], path: str,
                  columns: int = 7) -> str:
  """The image (S, S, C) under a few amounts of each transform (Fig. 5's left column)."""
  plt = figures.pyplot()
  fig, axes = plt.subplots(len(amounts_), columns, figsize=(1.4 * columns, 1.5 * len(amounts_)),
                           squeeze=False)
  for r, (kind, am) in enumerate(amounts_.items()):
    pick = am[np.linspace(0, len(am) - 1, columns).round().astype(int)]
    x = transform_many(image[None], kind, pick)[0]
    for c in range(columns):
      figures.imshow(axes[r, c], common.to_display(x[c], mean))
      axes[r, c].set_title(f"{pick[c]:.3g}", fontsize=7)
    axes[r, 0].set_ylabel(kind, fontsize=8)
  return figures.save_figure(fig, path)


def sections(context: content.Context, options: Options) -> list[content.Section]:
  """Fig. 5 for the analysed examples: invariance.npz, invariance_examples.png,
  invariance.png, one Section."""
  images, labels, ids = context.images, np.asarray(context.labels), np.asarray(context.ids)
  layers = list(options.layers)
  am = options.amounts
  res = measure(context.net, context.variables, images, labels, layers, am, context.batch_size)
  np.savez_compressed(context.path("invariance.npz"), ids=ids, labels=labels,
                      **{f"{k}/{key}": v for k, r in res.items() for key, v in r.items()})
  plot_examples(images[0], context.pixel_mean, am, context.path("invariance_examples.png"))
  plot(res, layers, labels, context.class_names, context.path("invariance.png"))
  rows = []
  for kind, r in res.items():
    rows.append([kind, f"{r['amounts'][0]:.3g}..{r['amounts'][-1]:.3g}"] +
                [f"{r[f'normalised/{l}'].mean():.3f}" for l in layers] +
                [f"{(r['top_class'] == labels[:, None]).mean():.2f}"])
  return [content.Section(
      "Invariance", "invariance",
      paragraphs=[
          f"Images {', '.join(str(int(i)) for i in ids)} translated vertically, scaled about the "
          "centre and rotated (bilinear interpolation, the mean fills the border), as in Fig. 5. "
          f"Curves: Euclidean distance between the feature vectors of the original and the "
          f"transformed image at {' and '.join(layers)} (raw, and divided by the norm of the "
          "original's vector), and the probability of the true class; one line per image. "
          "Arrays: invariance.npz."],
      figures=[("invariance_examples.png", "The first image under each transform."),
               ("invariance.png", "Fig. 5: rows translation, scale, rotation.")],
      tables=[(["transform", "range"] + [f"mean normalised distance {l}" for l in layers] +
               ["fraction still correct"], rows)])]
