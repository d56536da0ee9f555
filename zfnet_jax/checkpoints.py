"""Checkpoints of a run: the Orbax manager, restore with fallback, loading a trained model.

``<workdir>/checkpoints/<step>/`` holds the TrainState ("state") and a small
JSON record ("meta": step, epoch, data position, batch size, seed).  Saves are
synchronous: a returned save is on disk (simplest to reason about on
preemption; the blocking time is small next to an epoch).  Once Orbax has
finalised a step, process 0 writes ``<step>/zfnet_checksums.json`` (``MANIFEST``:
the sha256 of every other file of the step, by relative path); every restore
checks it first, so a flipped byte is found even where Orbax would load it.
A step without the manifest (older runs, or killed between the two writes)
restores unchecked.

Shipped weights (``load_model`` with ``config.pretrained``): a folder holding a
run's ``config.json``, ``dataset_info.json``, ``pixel_mean.npy``, ``results.json``
and its parameters as ``params.npz`` (float32, keys "layer/name").  The trained
quickstart model ships inside the package (``zfnet_jax/shipped/quickstart``,
``pretrained="quickstart"``); ``launch/ship_weights.py WORKDIR`` writes one from a
finished run (``save_shipped``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from zfnet_jax import configs, console, input_pipeline, models, rundir, train_state


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
      raise ValueError(f"{file} is {'changed' if os.path.isfile(file) else 'missing'} since "
                       f"the save (sha256 recorded in {MANIFEST})")


def step_dir(mngr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(mngr.directory), str(step))


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
  """Save a step (on disk when it returns), then process 0 writes its checksum manifest."""
  saved = mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                  meta=ocp.args.JsonSave(meta)), force=True)
  if saved and jax.process_index() == 0:
    rundir.write_json(os.path.join(step_dir(mngr, step), MANIFEST),
                      {"sha256": checksums(step_dir(mngr, step))})


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state):
  """(state, meta) of one step, restored into ``abstract_state``'s shapes and shardings;
  ValueError naming the file if the step's checksums do not match (``verify``)."""
  verify(step_dir(mngr, step))
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  return out["state"], out["meta"]


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, ckpt_dir: str):
  """(state, meta, step) of the newest checkpoint that restores, or None if there is none.

  Orbax writes each step to a temporary directory and renames it when complete,
  so a step killed mid-write never appears.  A step that exists but fails to
  restore (a file that differs from its checksum, a truncated file) is reported
  in one line naming the step and the error (for a checksum: the file), moved
  to ``<ckpt_dir>_damaged/`` and the next older step is used.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return None
  damaged = []
  for step in steps:
    try:
      state, meta = restore(mngr, step, abstract_state)
      if int(jax.device_get(state.step)) != step:
        raise ValueError(f"it holds step {int(jax.device_get(state.step))}")
    except Exception as e:  # pylint: disable=broad-except
      msg = (f"checkpoint step {step} in {ckpt_dir} is damaged or unreadable "
             f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''})")
      console.say(msg, warn=True)
      damaged.append((step, e))
      continue
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
  raise ValueError(
      f"no checkpoint in {ckpt_dir} can be restored (steps {steps}; last error "
      f"{type(damaged[-1][1]).__name__}: {str(damaged[-1][1])[:300]}). If the model or "
      "optimiser config changed since they were written, use a new workdir.")


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


def load_trained(workdir: str, step: int | None = None):
  """(model, {"params": params}, config) of a run; the latest checkpoint by default.

  A step whose files differ from its checksum manifest raises ValueError naming
  the file (no fallback: the caller asked for that step; pass another ``step``).
  """
  config = load_config(workdir)
  info = load_dataset_info(workdir)
  model = models.from_config(config.model, info.num_classes)
  mngr = manager(rundir.path(workdir, rundir.CHECKPOINTS), 1, read_only=True)
  try:
    steps = mngr.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoints in {workdir}/checkpoints")
    if step is None:
      step = max(steps)
    if step not in steps:
      raise ValueError(f"no checkpoint for step {step} in {workdir}/checkpoints; "
                       f"available: {sorted(steps)}")
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shape = (1, info.input_size, info.input_size, info.channels)
    init = train_state.init_fn(model, shape, train_state.optimizer_from_config(config),
                               seed=config.seed, clip_radius=train_state.clip_radius(config))
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev),
                            jax.eval_shape(init))
    restored, _ = restore(mngr, step, abstract)
  finally:
    mngr.close()
  return model, {"params": restored.params}, config


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
  and full_pixel_mean (R, R, C) before the centre crop."""
  model: object
  variables: dict
  config: ml_collections.ConfigDict
  pixel_mean: np.ndarray
  class_names: tuple[str, ...]
  full_pixel_mean: np.ndarray


def load_model(config, workdir: str | None) -> Loaded:
  """The model ``config`` asks for: the shipped weights ``config.pretrained`` names
  (a shipped name or a folder), else the latest checkpoint of ``workdir``."""
  if config.get("pretrained"):
    model, variables, run_config, info, mean = load_shipped(config.pretrained)
    crop = run_config.dataset.crop_size
    return Loaded(model, variables, run_config,
                  np.ascontiguousarray(input_pipeline.centre_crop(mean, crop), np.float32),
                  info.class_names, np.asarray(mean, np.float32))
  if workdir is None:
    raise ValueError("no model: give a workdir with a finished run or config.pretrained "
                     f"(shipped: {', '.join(shipped_names())})")
  model, variables, run_config = load_trained(workdir)
  full = np.asarray(input_pipeline.full_pixel_mean(run_config, workdir), np.float32)
  return Loaded(model, variables, run_config, np.ascontiguousarray(
      input_pipeline.centre_crop(full, run_config.dataset.crop_size)),
                load_dataset_info(workdir).class_names, full)
