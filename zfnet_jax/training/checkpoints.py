"""Checkpoints of a run: the Orbax manager, checksums, restore with fallback, resume checks.

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
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from zfnet_jax import configs, console, rundir
from zfnet_jax.data import sources
from zfnet_jax.nn import models
from zfnet_jax.training import train_state


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


def _first_good(mngr: ocp.CheckpointManager, abstract_state, ckpt_dir: str):
  """(state, meta, step, [(damaged step, one-line reason)]) of the newest step that
  restores, newest first; each damaged step is reported in one ``warning:`` line.  ValueError
  when none restores; None when there are no steps."""
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return None
  console.quiet_closed_event_loops()
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


def load_dataset_info(workdir: str) -> sources.DatasetInfo:
  info = rundir.read_json(rundir.path(workdir, rundir.DATASET_INFO), "training workdir")
  info["class_names"] = tuple(info["class_names"])
  return sources.DatasetInfo(**info)


def abstract_state(config, info: sources.DatasetInfo, sharding=None):
  """The TrainState of ``config`` on ``info``'s data as ShapeDtypeStructs (no arrays made);
  ``sharding``: each leaf's (default: no sharding)."""
  model = models.from_config(config.model, info.num_classes)
  shape = (1, info.input_size, info.input_size, info.channels)
  init = train_state.init_fn(model, shape, train_state.optimizer_from_config(config),
                             seed=config.seed, clip_radius=train_state.clip_radius(config))
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                      jax.eval_shape(init))


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


def check_resume(config, workdir: str, info: sources.DatasetInfo) -> dict[str, tuple]:
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

