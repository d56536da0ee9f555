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
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time

import jax
import ml_collections
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
