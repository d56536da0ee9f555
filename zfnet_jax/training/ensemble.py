"""Table 2's ensembles: the averaged softmax of several trained runs.
"""
from __future__ import annotations

import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from zfnet_jax import console, rundir, xla
from zfnet_jax.data import iterators, preprocessing, sources
from zfnet_jax.training import checkpoints, weights
from zfnet_jax.training.steps import AXIS, _crop, _errors, _global, _over_devices

# ----------------------------------------------------------------------------
# Ensembles (Table 2's "5 convnets" and "6 convnets" rows).
# ----------------------------------------------------------------------------

ENSEMBLE_RESULTS = "ensemble_results.json"          # in the output directory


ENSEMBLE_PREDICTIONS = "ensemble_predictions.npz"


def ensemble_step(members, batch, *, models_, crop_size, ten_crop):
  """Per device: summed wrong counts of the ensemble and of each member, and the
  ensemble's top-5 classes per example.

  members: ((params, shift (R, R, C)), ...), one per model in ``models_``; member k sees
  ``batch['image'] + shift_k`` (the images minus its own training mean).  The ensemble's
  probabilities are the mean over members of each member's softmax (centre crop; with
  ``ten_crop`` also the mean over the 10 crops, as ``eval_step`` does).
  """
  images, labels, mask = batch["image"], batch["label"], batch["mask"]
  size = images.shape[1]
  c = (size - crop_size) // 2
  views = [(c, c, False)] + (preprocessing.ten_crop_offsets(size, crop_size) if ten_crop else [])
  out, centre, crops = {}, [], []
  for k, (model, (params, shift)) in enumerate(zip(models_, members)):
    x = images + shift
    probs = [jax.nn.softmax(model.apply({"params": params}, _crop(x, t, l, crop_size, f),
                                        train=False).astype(jnp.float32))
             for t, l, f in views]
    centre.append(probs[0])
    out[f"member{k}_top1_wrong"], out[f"member{k}_top5_wrong"] = _errors(probs[0], labels, mask)
    if ten_crop:
      crops.append(sum(probs[1:]) / 10)
      out[f"member{k}_top1_wrong_10crop"], out[f"member{k}_top5_wrong_10crop"] = _errors(
          crops[-1], labels, mask)
  ens = {"": sum(centre) / len(centre)}
  if ten_crop:
    ens["_10crop"] = sum(crops) / len(crops)
  top = {}
  for suffix, p in ens.items():
    out[f"top1_wrong{suffix}"], out[f"top5_wrong{suffix}"] = _errors(p, labels, mask)
    top[f"top5{suffix}"] = lax.top_k(p, min(5, p.shape[-1]))[1]
  out["n"] = jnp.sum(mask)
  return _over_devices(lax.psum, out), top


def _ensemble_member(config, info, workdir: str):
  """(model, params, full pixel mean, its config, step) of one member, after checking it
  can join an ensemble evaluated with ``config`` on ``info``'s data (ValueError or
  FileNotFoundError naming the member and the mismatch)."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"ensemble member {workdir!r}: no such directory")
  for name in (rundir.CONFIG, rundir.DATASET_INFO, rundir.MEAN, rundir.RESULTS):
    if not os.path.isfile(rundir.path(workdir, name)):
      raise FileNotFoundError(f"ensemble member {workdir!r} has no {name} (not a finished "
                              "training run)")
  run_config = checkpoints.load_config(workdir)
  trained = checkpoints.load_dataset_info(workdir)
  d, r = config.dataset, run_config.dataset
  for what, got, want in (
      ("dataset", r.name, d.name), ("classes", trained.class_names, info.class_names),
      ("input size (crop_size)", trained.input_size, d.crop_size),
      ("channels", trained.channels, info.channels),
      ("resize_size", r.resize_size, d.resize_size)):
    if got != want:
      show = (lambda v: f"{len(v)} classes {list(v[:3])}..." if isinstance(v, tuple) else repr(v))
      raise ValueError(f"ensemble member {workdir!r} has {what} {show(got)}, the ensemble's "
                       f"config has {show(want)}: members must share the dataset, classes and "
                       "input size")
  mean = np.load(rundir.path(workdir, rundir.MEAN))
  if mean.shape != (d.resize_size, d.resize_size, info.channels):
    raise ValueError(f"ensemble member {workdir!r}: pixel_mean.npy is {mean.shape}, need "
                     f"{(d.resize_size, d.resize_size, info.channels)}")
  model, variables, _, step, _ = weights.load_latest(workdir)
  return model, variables["params"], mean.astype(np.float32), run_config, step


def evaluate_ensemble(config, workdirs: Sequence[str], out_dir: str, *, devices=None) -> dict:
  """Errors of the ensemble that averages the softmax outputs of the trained runs in
  ``workdirs`` (each its newest good checkpoint), on ``config``'s eval split (centre
  crop, and 10 crops when ``config.ten_crop_eval``), with each member's own errors.

  Members may differ in architecture (Table 2's 6-net row adds a conv512 net) but must
  share the dataset, classes, crop and resize size; each sees the images minus its own
  training mean.  Every member is checked and loaded before the evaluation starts.
  Writes ``<out_dir>/ensemble_results.json`` (top1_error, top5_error,
  top1_error_10crop, top5_error_10crop, num_eval_examples, members: [{workdir, model,
  step, top1_error, ...}], versions) and ``<out_dir>/ensemble_predictions.npz`` (id,
  label (N,), top5 (N, 5) classes of the centre-crop ensemble, best first; top5_10crop).
  """
  workdirs = [os.path.abspath(w) for w in workdirs if w]
  if len(workdirs) < 2 or len(set(workdirs)) != len(workdirs):
    raise ValueError(f"an ensemble needs at least 2 distinct workdirs, got {workdirs}")
  if os.path.abspath(out_dir) in workdirs:
    raise ValueError(f"the ensemble's output directory {out_dir!r} is one of its members; "
                     "give another --workdir")
  info = sources.dataset_info(config)
  loaded = [_ensemble_member(config, info, w) for w in workdirs]
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise PermissionError(f"ensemble output directory {out_dir!r} is not writable "
                          f"({e.strerror})") from e
  devices = np.array(jax.devices() if devices is None else list(devices))
  mesh = Mesh(devices, (AXIS,))
  ndev, ten_crop = devices.size, bool(config.ten_crop_eval)
  batch = -(-config.eval_batch_size // ndev) * ndev
  base = loaded[0][2]       # the iterator subtracts member 0's mean
  members = jax.device_put(tuple((p, base - mean) for _, p, mean, _, _ in loaded),
                           NamedSharding(mesh, P()))
  fn = xla.jit(jax.shard_map(
      lambda m, b: ensemble_step(m, b, models_=tuple(x[0] for x in loaded),
                                 crop_size=config.dataset.crop_size, ten_crop=ten_crop),
      mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P(AXIS)), check_vma=False))
  sharding = NamedSharding(mesh, P(AXIS))
  totals, kept = None, {"id": [], "label": [], "top5": [], "top5_10crop": []}
  t0 = time.time()
  bar = console.progress(desc=f"ensemble of {len(loaded)}", total=-(-info.num_eval // batch),
                         unit="batch")
  for b in iterators.create_eval_iterator(
      config, workdirs[0], batch_size=batch, full_size=True,
      process_index=jax.process_index(), process_count=jax.process_count()):
    ids = b.pop("id")
    counts, top = fn(members, _global(b, sharding))
    totals = counts if totals is None else jax.tree.map(jnp.add, totals, counts)
    top = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
           for k, v in top.items()}
    ids = np.asarray(multihost_utils.process_allgather(ids, tiled=True))
    labels = np.asarray(multihost_utils.process_allgather(b["label"], tiled=True))
    m = ids >= 0
    kept["id"].append(ids[m])
    kept["label"].append(labels[m])
    for k, v in top.items():
      kept[k].append(v[m])
    bar.update(1)
  bar.close()
  totals = {k: float(v) for k, v in jax.device_get(totals).items()}
  n = int(totals["n"])
  suffixes = ("", "_10crop") if ten_crop else ("",)
  errors = lambda pre: {f"top{k}_error{s}": totals[f"{pre}top{k}_wrong{s}"] / n
                        for s in suffixes for k in (1, 5)}
  res = dict(errors(""), num_eval_examples=n, split=config.dataset.eval_split,
             eval_seconds=time.time() - t0,
             members=[dict(workdir=w, model=cfg.model.name, step=int(step), **errors(f"member{k}_"))
                      for k, (w, (_, _, _, cfg, step)) in enumerate(zip(workdirs, loaded))])
  if jax.process_index() == 0:
    rundir.write_json(rundir.path(out_dir, ENSEMBLE_RESULTS), dict(res, versions=rundir.versions()))
    arrays = {k: np.concatenate(v) for k, v in kept.items() if v}
    tmp = rundir.path(out_dir, f"{ENSEMBLE_PREDICTIONS}.tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, rundir.path(out_dir, ENSEMBLE_PREDICTIONS))
  return res

