"""Import torchvision's ImageNet weights: ``from_torchvision(source, arch)``.

``source`` is a state dict as ``torch.save`` writes it (``.pth``/``.pt``: needs
PyTorch, imported only then), a ``.safetensors`` file (read with safetensors'
NumPy API: no PyTorch), or a mapping {key: array} (NumPy arrays or torch
tensors).  Keys and shapes are torchvision's (``features.0.weight`` ..
``classifier.6.bias``); layouts are converted: conv OIHW -> HWIO, Linear
(out, in) -> (in, out), and fc6's rows from the NCHW flatten order of
torchvision's pooled map to the (H, W, C) order of ours.

The model takes what torchvision's model takes after its transforms (RGB in
[0, 1], minus ``TORCHVISION_MEAN``, divided by ``TORCHVISION_STD``), NHWC, and
returns the same logits.  ``imagenet_class_names()`` names the 1000 classes.
"""
from __future__ import annotations

import functools
import importlib.resources
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from zfnet_jax.nn import torchvision

ARCHS = {"alexnet": torchvision.TorchvisionAlexNet, "vgg16": torchvision.VGG16}
# torchvision's classifier indices of fc6, fc7, fc8 (AlexNet puts a Dropout first).
_CLASSIFIER = {"alexnet": (1, 4, 6), "vgg16": (0, 3, 6)}
TORCHVISION_MEAN = (0.485, 0.456, 0.406)   # per RGB channel, of pixels scaled to [0, 1]
TORCHVISION_STD = (0.229, 0.224, 0.225)


def _key_map(arch: str) -> dict[str, tuple[str, str]]:
  """{torchvision key: (our layer, parameter)} in torchvision's order."""
  out, index = {}, 0
  for name, kind, *_ in ARCHS[arch].arch:
    if kind == "conv":
      out[f"features.{index}.weight"] = (name, "kernel")
      out[f"features.{index}.bias"] = (name, "bias")
    index += 2 if kind == "conv" else 1   # a conv is followed by its ReLU
  for name, i in zip(("fc6", "fc7", "fc8"), _CLASSIFIER[arch]):
    out[f"classifier.{i}.weight"] = (name, "kernel")
    out[f"classifier.{i}.bias"] = (name, "bias")
  return out


def _torch_shape(ours: tuple[int, ...]) -> tuple[int, ...]:
  """torchvision's shape of a parameter of ours (HWIO -> OIHW, (in, out) -> (out, in))."""
  if len(ours) == 4:
    return (ours[3], ours[2], ours[0], ours[1])
  return tuple(reversed(ours))


def _to_numpy(value) -> np.ndarray:
  """A NumPy array from an array or a torch tensor (without importing torch)."""
  if hasattr(value, "detach"):          # a torch tensor (bfloat16 has no NumPy dtype)
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    value = value.numpy()
  return np.asarray(value)


def _load(source) -> Mapping[str, Any]:
  if isinstance(source, Mapping):
    return source
  if not isinstance(source, (str, os.PathLike)):
    raise ValueError(f"source must be a .pth/.pt/.safetensors path or a mapping of arrays, "
                     f"got {type(source).__name__}")
  path = os.fspath(source)
  if not os.path.isfile(path):
    raise ValueError(f"no such weights file: {path!r}")
  suffix = os.path.splitext(path)[1].lower()
  if suffix == ".safetensors":
    from safetensors import numpy as st_numpy  # pylint: disable=import-outside-toplevel
    try:
      return st_numpy.load_file(path)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"cannot read {path!r} as safetensors: {e}") from None
  if suffix in (".pth", ".pt"):
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise ValueError(f"reading {path!r} needs PyTorch, which is not installed: "
                       f"pip install torch, or save the state dict as .safetensors "
                       f"(no PyTorch needed)") from None
    try:
      state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"cannot read {path!r} with torch.load: {e}") from None
    if not isinstance(state, Mapping):
      raise ValueError(f"{path!r} holds a {type(state).__name__}, not a state dict; save "
                       f"model.state_dict()")
    return state
  raise ValueError(f"unknown weights file type {suffix!r} of {path!r}; allowed: .pth, .pt, "
                   f".safetensors")


def from_torchvision(source, arch: str) -> tuple[torchvision.TorchvisionNet, dict]:
  """(model, variables) from torchvision weights (see the module docstring).

  Args:
    source: path to a ``.pth``/``.pt`` state dict or a ``.safetensors`` file, or a
      mapping {torchvision key: array or tensor}.
    arch: "alexnet" (``torchvision.TorchvisionAlexNet``) or "vgg16" (``torchvision.VGG16``).
  Returns:
    the model (``num_classes`` from ``classifier.6``) and {"params": float32 arrays};
    ``model.apply(variables, x)`` with x (N, S, S, 3) normalised RGB gives (N,
    num_classes) logits, ``method="features"`` every named layer.
  Raises:
    ValueError: an unknown arch, an unreadable file, a missing or extra key, or a
      wrong shape (naming the key and both shapes).
  """
  if arch not in ARCHS:
    raise ValueError(f"unknown arch {arch!r}; allowed: {', '.join(ARCHS)}")
  state = _load(source)
  keys = _key_map(arch)
  other = [a for a in ARCHS if a != arch and set(_key_map(a)) == set(state)]
  if set(keys) != set(state) and other:
    raise ValueError(f"these are torchvision {other[0]} weights (its keys), not {arch}: "
                     f"pass arch={other[0]!r}")
  missing = [k for k in keys if k not in state]
  if missing:
    raise ValueError(f"{arch} weights lack key {missing[0]!r}"
                     + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  extra = [k for k in state if k not in keys]
  if extra:
    raise ValueError(f"unexpected key {extra[0]!r} (shape {tuple(np.shape(state[extra[0]]))}) "
                     f"in {arch} weights; expected torchvision's keys "
                     f"{next(iter(keys))!r} .. {list(keys)[-1]!r}")
  fc8 = "classifier.6.weight"
  num_classes = int(np.shape(state[fc8])[0]) if np.ndim(state[fc8]) == 2 else 0
  if num_classes < 1:
    raise ValueError(f"key {fc8!r}: expected shape (num_classes, 4096), got "
                     f"{tuple(np.shape(state[fc8]))}")
  model = ARCHS[arch](num_classes=num_classes)
  return model, {"params": _convert(state, keys, model)}


PIXEL_MEAN = tuple(255.0 * m for m in TORCHVISION_MEAN)   # the same mean in 0..255 pixels
FIRST_CONV = {"alexnet": "conv1", "vgg16": "conv1_1"}


def for_pixels(variables, arch: str, mean=TORCHVISION_MEAN, std=TORCHVISION_STD) -> dict:
  """The same network taking what this project's pipeline gives: 0..255 RGB pixels
  minus ``255 * mean`` per channel (``PIXEL_MEAN``), instead of torchvision's
  ``(x / 255 - mean) / std``.

  That input is ``x_ms / (255 std)``: the scale is folded into the first conv's
  kernel (HWIO, divided along I), so logits, activations and projections are
  exactly the torchvision model's (zero padding is zero in both spaces), and the
  report's figures show ``image + PIXEL_MEAN`` as pixels.
  """
  if arch not in FIRST_CONV:
    raise ValueError(f"unknown arch {arch!r}; allowed: {', '.join(FIRST_CONV)}")
  del mean   # subtracted by the pipeline (pixel_mean); only the scale is folded
  scale = 1.0 / (255.0 * np.asarray(std, np.float32))
  params = dict(variables["params"])
  first = dict(params[FIRST_CONV[arch]])
  first["kernel"] = jnp.asarray(first["kernel"]) * scale[None, None, :, None]
  params[FIRST_CONV[arch]] = first
  return {**variables, "params": params}


@functools.lru_cache(maxsize=None)
def _shapes(model) -> dict:
  """{layer: {parameter: shape}} of ``model`` (no arrays are made)."""
  return jax.tree.map(lambda a: tuple(a.shape), jax.eval_shape(
      model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))["params"])


def _convert(state, keys, model) -> dict:
  """Check every shape, then convert the layouts; {layer: {parameter: array}}."""
  shapes, params = _shapes(model), {}
  channels = [maps for _, kind, maps, *_ in model.arch if kind == "conv"][-1]
  for key, (layer, name) in keys.items():
    ours = tuple(shapes[layer][name])
    want = _torch_shape(ours)
    value = _to_numpy(state[key])
    if tuple(value.shape) != want:
      raise ValueError(f"key {key!r}: expected shape {want}, got {tuple(value.shape)}")
    value = value.astype(np.float32, copy=False)
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)                 # OIHW -> HWIO
    elif value.ndim == 2 and layer == "fc6":
      out, n = value.shape                                # rows in (C, H, W) order
      side = model.pool_size
      value = value.reshape(out, channels, side, side).transpose(2, 3, 1, 0).reshape(n, out)
    elif value.ndim == 2:
      value = value.T
    params.setdefault(layer, {})[name] = jnp.asarray(value)
  return params


def imagenet_class_names(short: bool = False) -> list[str]:
  """The 1000 ImageNet (ILSVRC 2012) class names in torchvision's label order
  (sorted WordNet ids: 0 "tench, Tinca tinca" .. 999 "toilet tissue, ...").
  ``short``: only the first synonym of each ("tench")."""
  text = importlib.resources.files("zfnet_jax").joinpath("data/imagenet_classes.txt")
  names = text.read_text(encoding="utf-8").splitlines()
  return [n.split(",")[0] for n in names] if short else names
