"""Checkpoints of a run: the Orbax manager, restore with fallback, loading a trained model.

``<workdir>/checkpoints/<step>/`` holds the TrainState ("state") and a small
JSON record ("meta": step, epoch, data position, batch size, seed).  Saves are
synchronous: a returned save is on disk (simplest to reason about on
preemption; the blocking time is small next to an epoch).  Once Orbax has
finalised a step, process 0 writes ``<step>/zfnet_checksums.json`` (``MANIFEST``:
the sha256 of every other file of the step, by relative path); every restore
checks it first, so a flipped byte is found even where Orbax would load it.
A step without the manifest (older runs, or killed between the two writes)
restores unchecked.  A restored step must also hold finite parameters,
optimiser state and learning-rate factor (bookkeeping such as ``best_error``,
+inf until the first evaluation, is exempt), else it counts as damaged.

Format: ``meta["format_version"]`` is ``FORMAT_VERSION``; a checkpoint without
it was written before versions existed (version 1, the same layout) and loads
as before; a newer version than this code knows is refused.

Resuming with a changed config (``check_resume``): a change of the parameter
or optimiser-state shapes, or of the dataset, is refused before anything is
written; other changes are allowed and recorded in ``config_changes.jsonl``.

Shipped weights (``load_model`` with ``config.pretrained``): a folder holding a
run's ``config.json``, ``dataset_info.json``, ``pixel_mean.npy``, ``results.json``
and its parameters as ``params.npz`` (float32, keys "layer/name").  The trained
quickstart model ships inside the package (``zfnet_jax/shipped/quickstart``,
``pretrained="quickstart"``); ``launch/ship_weights.py WORKDIR`` writes one from a
finished run (``save_shipped``).

Imported weights (``config.pretrained`` a torchvision ``.pth``/``.pt``/``.safetensors``
state dict, ``config.model.name`` TorchvisionAlexNet or VGG16): the network was
trained on ``(pixels * dataset.pixel_scale - dataset.mean) / dataset.std``; the
scale ``pixel_scale / std`` is folded into the first conv (``convert.for_pixels``),
so the model takes this project's input, pixels minus the constant pixel mean
``dataset.mean / pixel_scale``, and the figures show image + mean as pixels.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from zfnet_jax import configs, console, convert, input_pipeline, models, rundir, train_state


def manager(ckpt_dir: str, keep: int, keep_steps=(), read_only: bool = False
            ) -> ocp.CheckpointManager:
  """Keeps the latest ``keep`` steps and every step in ``keep_steps``."""
  policy = checkpoint_managers.AnyPreservationPolicy(
      [checkpoint_managers.LatestN(max(1, keep))] +
      ([checkpoint_managers.CustomSteps(list(keep_steps))] if keep_steps else []))
  opts = ocp.CheckpointManagerOptions(preservation_policy=policy, create=not read_only,
                                      read_only=read_only, enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(ckpt_dir), options=opts,
                               item_names=("state", "meta"))


MANIFEST = "zfnet_checksums.json"


def _sha256(file: str) -> str:
  h = hashlib.sha256()
  with open(file, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def checksums(step_dir: str) -> dict[str, str]:
  """{path relative to ``step_dir``: sha256 hex} of every file of a step but the manifest."""
  out = {}
  for root, _, files in os.walk(step_dir):
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if not rel.startswith(MANIFEST):          # the manifest and its temporary file
        out[rel] = _sha256(os.path.join(root, name))
  return dict(sorted(out.items()))


def verify(step_dir: str) -> None:
  """ValueError naming the first file of the step that is missing or differs from the
  sha256 its manifest recorded; nothing to check when the step has no manifest."""
  manifest = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(manifest):
    return
  for rel, digest in rundir.read_json(manifest)["sha256"].items():
    file = os.path.join(step_dir, rel)
    if not os.path.isfile(file) or _sha256(file) != digest:
      raise Damaged(f"{file} is {'changed' if os.path.isfile(file) else 'missing'} since "
                       f"the save (sha256 recorded in {MANIFEST})")


def step_dir(mngr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(mngr.directory), str(step))


FORMAT_VERSION = 2   # 1: before versions (no "format_version" in meta); 2: + the version


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
  """Save a step (on disk when it returns), then process 0 writes its checksum manifest.
  ``meta`` gets ``format_version``."""
  meta = dict(meta, format_version=FORMAT_VERSION)
  saved = mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                  meta=ocp.args.JsonSave(meta)), force=True)
  if saved and jax.process_index() == 0:
    rundir.write_json(os.path.join(step_dir(mngr, step), MANIFEST),
                      {"sha256": checksums(step_dir(mngr, step))})


def check_finite(state) -> None:
  """ValueError naming the first parameter or optimiser-state array (or the learning-rate
  factor) with a value that is not finite."""
  trees = {"params": state.params, "opt_state": state.opt_state, "lr_scale": state.lr_scale}
  leaves = [(jax.tree_util.keystr(path), x) for path, x in
            jax.tree_util.tree_leaves_with_path(trees)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
  ok = jax.device_get([jnp.all(jnp.isfinite(x)) for _, x in leaves])
  bad = [name for (name, _), good in zip(leaves, ok) if not good]
  if bad:
    raise Damaged(f"{len(bad)} array(s) hold non-finite values, first {bad[0]}")


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state):
  """(state, meta) of one step, restored into ``abstract_state``'s shapes and shardings;
  ValueError naming the file if the step's checksums do not match (``verify``), or
  if its arrays are not finite (``check_finite``) or its format is newer than this code's."""
  verify(step_dir(mngr, step))
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  version = out["meta"].get("format_version", 1)
  if version > FORMAT_VERSION:
    raise ValueError(f"checkpoint format version {version} is newer than this code's "
                     f"{FORMAT_VERSION}; update zfnet_jax")
  check_finite(out["state"])
  return out["state"], out["meta"]


class Damaged(ValueError):
  """A step that restores but is not what was saved: bytes changed, arrays not finite."""


def _short(e: BaseException) -> str:
  """The first line; another library's error cut to 200 characters (TensorStore's run to
  thousands), ours (``Damaged``: a file or array named) kept whole."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  if not isinstance(e, Damaged) and len(text) > 200:
    text = text[:200] + "..."
  return f"{type(e).__name__}: {text}"


def _quiet_closed_event_loops() -> None:
  """Drop the "Event loop is closed" RuntimeErrors that Orbax's reader threads report as
  unraisable (a traceback each on stderr) after a failed restore; others pass on."""
  previous = sys.unraisablehook
  if getattr(previous, "zfnet_quiet", False):
    return

  def hook(unraisable):
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
      previous(unraisable)
  hook.zfnet_quiet = True
  sys.unraisablehook = hook


def _first_good(mngr: ocp.CheckpointManager, abstract_state, ckpt_dir: str):
  """(state, meta, step, [(damaged step, one-line reason)]) of the newest step that
  restores, newest first; each damaged step is reported in one ``warning:`` line.  ValueError
  when none restores; None when there are no steps."""
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return None
  _quiet_closed_event_loops()
  damaged = []
  for step in steps:
    try:
      state, meta = restore(mngr, step, abstract_state)
      if int(jax.device_get(state.step)) != step:
        raise ValueError(f"it holds step {int(jax.device_get(state.step))}")
    except Exception as e:  # pylint: disable=broad-except
      msg = f"checkpoint step {step} in {ckpt_dir} is damaged or unreadable ({_short(e)})"
      console.say(msg, warn=True)
      damaged.append((step, _short(e)))
      continue
    return state, meta, step, damaged
  raise ValueError(
      f"no checkpoint in {ckpt_dir} can be restored (steps {steps}; last error "
      f"{damaged[-1][1]}). If the model or optimiser config changed since they were "
      "written, use a new workdir.")


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, ckpt_dir: str):
  """(state, meta, step) of the newest checkpoint that restores, or None if there is none.

  Orbax writes each step to a temporary directory and renames it when complete,
  so a step killed mid-write never appears.  A step that exists but fails to
  restore (a file that differs from its checksum, a truncated or missing file,
  non-finite arrays) is reported in one line naming the step and the error (for
  a checksum: the file), moved to ``<ckpt_dir>_damaged/`` and the next older
  step is used.
  """
  found = _first_good(mngr, abstract_state, ckpt_dir)
  if found is None:
    return None
  state, meta, step, damaged = found
  if damaged:
    aside = f"{ckpt_dir}_damaged"
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      for bad, _ in damaged:
        shutil.move(os.path.join(ckpt_dir, str(bad)),
                    os.path.join(aside, f"{bad}.{int(time.time())}"))
    mngr.reload()
    console.say(f"falling back to checkpoint step {step}; damaged step(s) "
                f"{[b for b, _ in damaged]} moved to {aside}", warn=True)
  return state, meta, step


def resolve_restore_path(path: str) -> tuple[str, int | None]:
  """An explicit restore path: a checkpoints dir (latest step) or one step's dir."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"restore_path {path!r} does not exist (give a checkpoints "
                            "directory or one of its step directories)")
  base = os.path.basename(path.rstrip("/"))
  if base.isdigit():
    return os.path.dirname(path), int(base)
  return path, None


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's saved config (``<workdir>/config.json``) over the current defaults."""
  return configs.from_saved(rundir.read_json(rundir.path(workdir, rundir.CONFIG),
                                             "training workdir"))


def load_dataset_info(workdir: str) -> input_pipeline.DatasetInfo:
  info = rundir.read_json(rundir.path(workdir, rundir.DATASET_INFO), "training workdir")
  info["class_names"] = tuple(info["class_names"])
  return input_pipeline.DatasetInfo(**info)


def abstract_state(config, info: input_pipeline.DatasetInfo, sharding=None):
  """The TrainState of ``config`` on ``info``'s data as ShapeDtypeStructs (no arrays made);
  ``sharding``: each leaf's (default: no sharding)."""
  model = models.from_config(config.model, info.num_classes)
  shape = (1, info.input_size, info.input_size, info.channels)
  init = train_state.init_fn(model, shape, train_state.optimizer_from_config(config),
                             seed=config.seed, clip_radius=train_state.clip_radius(config))
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                      jax.eval_shape(init))


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


CONFIG_CHANGES = "config_changes.jsonl"   # in the workdir: allowed changes at each resume
# Keys that select the training data: a change is a different dataset.
DATASET_KEYS = ("dataset.name", "dataset.train_split", "dataset.resize_size",
                "dataset.crop_size", "dataset.max_train_examples", "dataset.folder_eval_fraction")


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_diff(old: dict, new: dict) -> dict[str, tuple]:
  """{dotted key: (old, new)} of the leaves that differ between two JSON configs
  (a key missing on one side is None there)."""
  a, b = _flat(old), _flat(new)
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _shapes(config, info) -> list:
  state = abstract_state(config, info)
  return [jax.tree.structure(state)] + [(x.shape, x.dtype) for x in jax.tree.leaves(state)]


def check_resume(config, workdir: str, info: input_pipeline.DatasetInfo) -> dict[str, tuple]:
  """The changes of ``config`` from the workdir's ``config.json`` ({key: (old, new)}; {}
  for a new workdir); reads only.

  With checkpoints in the workdir, ValueError (one line, naming each key old -> new)
  when a change alters the shapes of the parameters or optimiser state, or the
  dataset (``DATASET_KEYS``, or classes, channels or training-set size that differ
  from ``dataset_info.json``).
  """
  path = rundir.path(workdir, rundir.CONFIG)
  if not os.path.exists(path):
    return {}
  old_json = rundir.read_json(path)
  changes = config_diff(old_json, json.loads(config.to_json_best_effort()))
  ckpt = rundir.path(workdir, rundir.CHECKPOINTS)
  if not changes or not (os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt))):
    return changes
  bad = [k for k in changes if k in DATASET_KEYS]
  old_info = (load_dataset_info(workdir)
              if os.path.exists(rundir.path(workdir, rundir.DATASET_INFO)) else info)
  for field in ("class_names", "channels", "num_train"):
    if getattr(old_info, field) != getattr(info, field) and not bad:
      bad.append(f"the data (dataset_info.json {field})")
  old = configs.from_saved(old_json)
  if _shapes(old, old_info) != _shapes(config, info):
    for key in changes:              # which changes alter the shapes, one at a time
      if key in bad or key.startswith(("report.", "analyses.", "transfer.")):
        continue
      one = configs.from_saved(old_json)
      *parents, leaf = key.split(".")
      node = one
      for name in parents:
        node = node[name]
      with one.unlocked():
        node[leaf] = tuple(changes[key][1]) if isinstance(changes[key][1], list) \
            else changes[key][1]
      try:
        differs = _shapes(one, old_info) != _shapes(old, old_info)
      except Exception:  # pylint: disable=broad-except
        differs = True   # the key alone does not build a model: count it
      if differs:
        bad.append(key)
    bad = bad or [k for k in changes if k.startswith("model.")] or list(changes)
  if bad:
    what = ", ".join(f"{k} ({changes[k][0]!r} -> {changes[k][1]!r})" if k in changes else k
                     for k in bad)
    raise ValueError(f"config change {what} is incompatible with the checkpoints in {ckpt} "
                     "(it changes the parameter or optimiser-state shapes, or the dataset); "
                     f"start it in a new --workdir (this run's config is {path})")
  return changes


def record_changes(workdir: str, changes: dict[str, tuple]) -> str:
  """Append the allowed changes of a resumed run to ``<workdir>/config_changes.jsonl``
  ({"time", "changes": {key: [old, new]}}); returns a one-line summary."""
  row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"),
         "changes": {k: list(v) for k, v in changes.items()}}
  rundir.append_metrics(rundir.path(workdir, CONFIG_CHANGES), row)
  return ("config changed since this workdir's last run: "
          + ", ".join(f"{k} ({o!r} -> {n!r})" for k, (o, n) in changes.items())
          + f" (recorded in {CONFIG_CHANGES})")


# ----------------------------------------------------------------------------
# Shipped weights: a model that works before any training.
# ----------------------------------------------------------------------------

SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shipped")
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


def load_model(config, workdir: str | None) -> Loaded:
  """The model ``config`` asks for: the weights file ``config.pretrained`` names
  (``load_imported``), the shipped weights it names (a shipped name or a folder),
  else the latest checkpoint of ``workdir``."""
  if is_imported(config):
    return load_imported(config)
  if tuple(config.dataset.get("mean", ())) or tuple(config.dataset.get("std", ())):
    imported_preprocessing(config)   # raises: the keys are for imported weights only
  if config.get("pretrained"):
    model, variables, run_config, info, mean = load_shipped(config.pretrained)
    crop = run_config.dataset.crop_size
    return Loaded(model, variables, run_config,
                  np.ascontiguousarray(input_pipeline.centre_crop(mean, crop), np.float32),
                  info.class_names, np.asarray(mean, np.float32),
                  f"Model: the shipped weights {config.pretrained!r} "
                  f"({shipped_dir(config.pretrained)}).")
  if workdir is None:
    raise ValueError("no model: give a workdir with a finished run or config.pretrained "
                     f"(shipped: {', '.join(shipped_names())})")
  model, variables, run_config, step, why = load_latest(workdir)
  full = np.asarray(input_pipeline.full_pixel_mean(run_config, workdir), np.float32)
  return Loaded(model, variables, run_config, np.ascontiguousarray(
      input_pipeline.centre_crop(full, run_config.dataset.crop_size)),
                load_dataset_info(workdir).class_names, full,
                f"Model: checkpoint step {step}" + (f" ({why})." if why else " (the newest)."))
