"""A model ready to use, from any source: ``load_model(config, workdir)`` gives the
model, its variables, classes and preprocessing (``Loaded``) for a workdir's latest
checkpoint, the shipped weights or a torchvision state dict.

Shipped weights (``config.pretrained``): a folder holding a run's ``config.json``,
``dataset_info.json``, ``pixel_mean.npy``, ``results.json`` and its parameters as
``params.npz`` (float32, keys "layer/name").  The trained quickstart model ships inside
the package (``zfnet_jax/shipped/quickstart``, ``pretrained="quickstart"``);
``launch/ship_weights.py WORKDIR`` writes one from a finished run (``save_shipped``).

Imported weights (``config.pretrained`` a torchvision ``.pth``/``.pt``/``.safetensors``
state dict, ``config.model.name`` TorchvisionAlexNet or VGG16): the network was
trained on ``(pixels * dataset.pixel_scale - dataset.mean) / dataset.std``; the
scale ``pixel_scale / std`` is folded into the first conv (``convert.for_pixels``),
so the model takes this project's input, pixels minus the constant pixel mean
``dataset.mean / pixel_scale``, and the figures show image + mean as pixels.
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import ml_collections
import numpy as np

from zfnet_jax import rundir
from zfnet_jax.data import iterators, preprocessing
from zfnet_jax.nn import convert, models
from zfnet_jax.training.checkpoints import (
  _first_good,
  _short,
  abstract_state,
  load_config,
  load_dataset_info,
  manager,
  restore,
)


def _load(workdir: str, step: int | None):
  """(model, {"params": params}, config, step, note) of a run; see ``load_trained``."""
  config = load_config(workdir)
  info = load_dataset_info(workdir)
  model = models.from_config(config.model, info.num_classes)
  ckpt_dir = rundir.path(workdir, rundir.CHECKPOINTS)
  mngr = manager(ckpt_dir, 1, read_only=True)
  try:
    steps = mngr.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoints in {workdir}/checkpoints")
    if step is not None and step not in steps:
      raise ValueError(f"no checkpoint for step {step} in {workdir}/checkpoints; "
                       f"available: {sorted(steps)}")
    abstract = abstract_state(config, info, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    note = ""
    if step is not None:
      try:
        restored, _ = restore(mngr, step, abstract)
      except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f"checkpoint step {step} in {ckpt_dir} is damaged or unreadable "
                         f"({_short(e)})") from None
    else:
      restored, _, step, damaged = _first_good(mngr, abstract, ckpt_dir)
      if damaged:
        note = ("the newest good checkpoint; damaged: "
                + "; ".join(f"step {b} ({why})" for b, why in damaged))
  finally:
    mngr.close()
  return model, {"params": restored.params}, config, step, note


def load_latest(workdir: str):
  """(model, {"params": params}, config, step, note) of the newest checkpoint that
  restores: a damaged newer step (checksum, missing or truncated file, non-finite
  arrays) is skipped as in training, but left in place (a reader moves nothing);
  ``note`` says why in one line ("" when the newest step was used)."""
  return _load(workdir, None)


def load_trained(workdir: str, step: int | None = None):
  """(model, {"params": params}, config) of a run; by default the newest checkpoint that
  restores (``load_latest``).

  An explicit ``step`` that is damaged (checksum, non-finite arrays) raises
  ValueError naming the file or array (no fallback: the caller asked for that step).
  """
  return _load(workdir, step)[:3]


# ----------------------------------------------------------------------------
# Shipped weights: a model that works before any training.
# ----------------------------------------------------------------------------

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "shipped")


PARAMS = "params.npz"


SHIPPED_FILES = (rundir.CONFIG, rundir.DATASET_INFO, rundir.MEAN, rundir.RESULTS, PARAMS)


def shipped_names() -> list[str]:
  """The weights that ship inside the package (``config.pretrained`` names)."""
  return sorted(d for d in os.listdir(SHIPPED) if os.path.isdir(os.path.join(SHIPPED, d))) \
      if os.path.isdir(SHIPPED) else []


def shipped_dir(pretrained: str) -> str:
  """The folder of ``pretrained``: a shipped name or a folder ``save_shipped`` wrote;
  ValueError naming it and the shipped names otherwise."""
  folder = os.path.join(SHIPPED, pretrained) if pretrained in shipped_names() else pretrained
  missing = [f for f in SHIPPED_FILES if not os.path.isfile(os.path.join(folder, f))]
  if missing:
    raise ValueError(f"pretrained={pretrained!r} is neither a shipped model ("
                     f"{', '.join(shipped_names()) or 'none'}) nor a folder with "
                     f"{', '.join(SHIPPED_FILES)} (missing: {', '.join(missing)})")
  return folder


def save_shipped(workdir: str, out_dir: str, step: int | None = None) -> str:
  """Write the shipped form of a finished run (its latest checkpoint, or ``step``)
  into ``out_dir``; returns ``out_dir``."""
  for name in (rundir.CONFIG, rundir.DATASET_INFO, rundir.MEAN, rundir.RESULTS):
    if not os.path.isfile(rundir.path(workdir, name)):
      raise FileNotFoundError(f"{rundir.path(workdir, name)} not found: {workdir!r} is not a "
                              "finished training run")
  _, variables, _ = load_trained(workdir, step)
  flat = {"/".join(k.key for k in path): np.asarray(leaf, np.float32)
          for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])}
  os.makedirs(out_dir, exist_ok=True)
  np.savez_compressed(os.path.join(out_dir, PARAMS), **flat)
  for name in (rundir.CONFIG, rundir.DATASET_INFO):
    rundir.write_json(os.path.join(out_dir, name), rundir.read_json(rundir.path(workdir, name)))
  np.save(os.path.join(out_dir, rundir.MEAN), np.load(rundir.path(workdir, rundir.MEAN)))
  results = rundir.read_json(rundir.path(workdir, rundir.RESULTS))
  results["shipped_from"] = {"workdir": os.path.abspath(workdir), "step": step or "latest",
                             "date": time.strftime("%Y-%m-%d %H:%M:%S")}
  rundir.write_json(os.path.join(out_dir, rundir.RESULTS), results)
  return out_dir


def load_shipped(pretrained: str):
  """(model, {"params": ...}, its config, its DatasetInfo, full pixel mean (R, R, C))."""
  folder = shipped_dir(pretrained)
  config = load_config(folder)
  info = load_dataset_info(folder)
  model = models.from_config(config.model, info.num_classes)
  with np.load(os.path.join(folder, PARAMS)) as z:
    arrays = {k: z[k] for k in z.files}
  shape = (1, info.input_size, info.input_size, info.channels)
  expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct(
      shape, np.float32))["params"]
  params = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(expected):
    key = "/".join(k.key for k in path)
    if key not in arrays or arrays[key].shape != leaf.shape:
      got = arrays[key].shape if key in arrays else "missing"
      raise ValueError(f"{folder}/{PARAMS}: parameter {key} is {got}, the model "
                       f"{config.model.name} needs {leaf.shape}")
    node = params
    for k in path[:-1]:
      node = node.setdefault(k.key, {})
    node[path[-1].key] = jax.numpy.asarray(arrays.pop(key))
  if arrays:
    raise ValueError(f"{folder}/{PARAMS}: unexpected parameters {sorted(arrays)}")
  return model, {"params": params}, config, info, np.load(os.path.join(folder, rundir.MEAN))


@dataclasses.dataclass
class Loaded:
  """A model ready to analyse: module, {"params": ...}, the config it was trained
  with, pixel_mean float32 (S, S, C) (image + mean = 0..255 pixels), class names,
  full_pixel_mean (R, R, C) before the centre crop, and source: one sentence saying
  which weights these are (the checkpoint step used and why, or the shipped folder)."""
  model: object
  variables: dict
  config: ml_collections.ConfigDict
  pixel_mean: np.ndarray
  class_names: tuple[str, ...]
  full_pixel_mean: np.ndarray
  source: str = ""


WEIGHTS_FILES = (".pth", ".pt", ".safetensors")


IMPORTED_ARCH = {"TorchvisionAlexNet": "alexnet", "VGG16": "vgg16"}   # model.name -> arch


def is_imported(config) -> bool:
  """Whether ``config.pretrained`` names a weights file to import (``WEIGHTS_FILES``)."""
  return str(config.get("pretrained") or "").lower().endswith(WEIGHTS_FILES)


def imported_preprocessing(config) -> tuple[np.ndarray, np.ndarray]:
  """(pixel mean (3,) in 0..255 units, std for ``convert.for_pixels``) of an imported
  model's config; ValueError naming the bad key (model.name, dataset.pixel_scale, mean,
  std) and what is allowed.  For our models, dataset.mean and std must stay ()."""
  d = config.dataset
  if not is_imported(config):
    if tuple(d.mean) or tuple(d.std) or d.pixel_scale != 1.0:
      raise ValueError(f"dataset.mean={tuple(d.mean)}, std={tuple(d.std)}, pixel_scale="
                       f"{d.pixel_scale} are for imported weights (pretrained=*"
                       f"{'|*'.join(WEIGHTS_FILES)}); our models subtract the training mean: "
                       "leave them (), (), 1.0")
    raise ValueError(f"pretrained={config.get('pretrained')!r} is not a weights file")
  if config.model.name not in IMPORTED_ARCH:
    raise ValueError(f"pretrained={config.pretrained!r} is a weights file: model.name must be "
                     f"one of {', '.join(IMPORTED_ARCH)}, got {config.model.name!r}")
  mean, std = np.asarray(d.mean, np.float64), np.asarray(d.std, np.float64)
  if mean.shape != (3,) or std.shape != (3,) or not np.all(std > 0):
    raise ValueError(f"dataset.mean={tuple(d.mean)} and dataset.std={tuple(d.std)}: need 3 "
                     "values each (RGB), std > 0 (torchvision: (0.485, 0.456, 0.406), "
                     "(0.229, 0.224, 0.225))")
  if not float(d.pixel_scale) > 0:
    raise ValueError(f"dataset.pixel_scale={d.pixel_scale!r}; allowed: > 0 (torchvision: 1/255)")
  scale = float(d.pixel_scale)
  return (mean / scale).astype(np.float32), std / (255.0 * scale)


def load_imported(config) -> Loaded:
  """The torchvision weights ``config.pretrained`` names, folded for this project's
  input (module docstring), with ImageNet's class names when there are 1000 classes."""
  mean, std = imported_preprocessing(config)
  arch = IMPORTED_ARCH[config.model.name]
  model, variables = convert.from_torchvision(config.pretrained, arch)
  variables = convert.for_pixels(variables, arch, std=std)
  d = config.dataset
  names = (tuple(convert.imagenet_class_names()) if model.num_classes == 1000
           else tuple(str(i) for i in range(model.num_classes)))
  full = np.broadcast_to(mean, (d.resize_size, d.resize_size, 3)).astype(np.float32)
  return Loaded(model, variables, config, np.ascontiguousarray(full[:d.crop_size, :d.crop_size]),
                names, full, f"Model: {config.model.name} imported from {config.pretrained!r}.")


def source(config) -> str:
  """Where ``load_model`` takes the weights ``config`` asks for from: "imported" (the
  weights file ``config.pretrained`` names), "shipped" (the shipped weights it names: a
  shipped name or a folder) or "workdir" (the latest checkpoint of the run's workdir).
  ValueError for dataset.mean/std given without a weights file."""
  if is_imported(config):
    return "imported"
  if tuple(config.dataset.get("mean", ())) or tuple(config.dataset.get("std", ())):
    imported_preprocessing(config)   # raises: the keys are for imported weights only
  return "shipped" if config.get("pretrained") else "workdir"


def check_source(config) -> str:
  """``source(config)``, with what can be checked before the data is read: an imported
  model's preprocessing keys and weights file, a shipped model's folder."""
  kind = source(config)
  if kind == "imported":   # torchvision's weights: their shapes are checked when loaded
    imported_preprocessing(config)
    if not os.path.isfile(config.pretrained):
      raise ValueError(f"pretrained={config.pretrained!r}: no such weights file")
  elif kind == "shipped":
    shipped_dir(config.pretrained)
  return kind


def planned_model(config, info):
  """The module ``load_model`` will give for ``config`` (no weights read), checked
  against the data it will see (``info``, a ``DatasetInfo``): before any long work."""
  kind = check_source(config)
  if kind == "imported":
    return models.from_config(config.model, 1000)
  if kind == "shipped":
    shipped = shipped_dir(config.pretrained)
    trained = load_dataset_info(shipped)
    if (trained.input_size, trained.channels) != (config.dataset.crop_size, info.channels):
      raise ValueError(f"pretrained={config.pretrained!r} takes {trained.input_size}x"
                       f"{trained.input_size}x{trained.channels} images; the dataset gives "
                       f"{config.dataset.crop_size}x{config.dataset.crop_size}x{info.channels}")
    return models.from_config(load_config(shipped).model, trained.num_classes)
  return models.from_config(config.model, info.num_classes)


def load_model(config, workdir: str | None) -> Loaded:
  """The model ``config`` asks for, from its ``source``: the weights file
  ``config.pretrained`` names (``load_imported``), the shipped weights it names, else
  the latest checkpoint of ``workdir``."""
  kind = source(config)
  if kind == "imported":
    return load_imported(config)
  if kind == "shipped":
    model, variables, run_config, info, mean = load_shipped(config.pretrained)
    crop = run_config.dataset.crop_size
    return Loaded(model, variables, run_config,
                  np.ascontiguousarray(preprocessing.centre_crop(mean, crop), np.float32),
                  info.class_names, np.asarray(mean, np.float32),
                  f"Model: the shipped weights {config.pretrained!r} "
                  f"({shipped_dir(config.pretrained)}).")
  if workdir is None:
    raise ValueError("no model: give a workdir with a finished run or config.pretrained "
                     f"(shipped: {', '.join(shipped_names())})")
  model, variables, run_config, step, why = load_latest(workdir)
  full = np.asarray(iterators.full_pixel_mean(run_config, workdir), np.float32)
  return Loaded(model, variables, run_config, np.ascontiguousarray(
      preprocessing.centre_crop(full, run_config.dataset.crop_size)),
                load_dataset_info(workdir).class_names, full,
                f"Model: checkpoint step {step}" + (f" ({why})." if why else " (the newest)."))

