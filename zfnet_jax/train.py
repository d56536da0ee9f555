"""Training and evaluation: data-parallel SGD with the paper's recipe (Sec. 3).

The train step is written for one device: gradients and metrics are averaged
with ``lax.pmean`` over the mesh axis ``"data"``; ``jax.shard_map`` under
``jax.jit`` maps it over a 1-D mesh of every device of every process
(``check_vma=False``: per-device gradients as under pmap, so the explicit
``pmean`` is the one reduction; with varying-manual-axes checking JAX would
already sum the gradients of the replicated parameters); on a one-device mesh (a CPU,
by default) the step holds no collective at all.  The state is
replicated, the batch sharded on its leading axis, the state buffers donated.
The dropout key is the run's key folded with the step and the device index.
The optimiser, schedules and feature scale clipping are ``train_state``'s.

Outputs in the workdir (``zfnet_jax.rundir``): ``config.json``,
``pixel_mean.npy``, ``dataset_info.json``, ``checkpoints/`` (the last
``keep_checkpoints`` plus the feature-evolution steps listed in
``evolution.json``), ``metrics.jsonl``, TensorBoard events, ``results.json``.
Training knows nothing above it: whatever should happen during training
(TensorBoard panels, profiling) comes in as ``hooks``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
from typing import Callable, Sequence

from absl import logging
from clu import metric_writers
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from zfnet_jax import checkpoints, console, conv, input_pipeline, models, rundir, train_state

AXIS = "data"
EXIT_PREEMPTED = 75  # os.EX_TEMPFAIL: stopped by SIGTERM after saving; rerun to resume

# A training hook: hook(step, state, writer) after every step, on process 0 only
# (writer: the run's clu metric writer).  E.g. analyses.evolution.tensorboard_hook.
Hook = Callable[[int, train_state.TrainState, metric_writers.MetricWriter], None]


def validate(config, num_devices: int | None = None) -> None:
  """ValueError naming the first impossible training value (and what is allowed).

  Checks the model, dataset and optimiser settings (each by the module that
  owns them) and the loop's own; ``num_devices``: check that the global batch
  divides over them.  Evolution epochs beyond the run are left out by
  ``evolution_steps`` (it needs the dataset size).  ``schedule="plateau"`` needs
  an evaluation before the last step: for ``num_train_steps`` runs the interval
  is counted in steps (this reads the dataset's size), for ``num_epochs`` runs
  compared in epochs.
  """
  models.validate(config.model)
  if config.model.name in models.IMPORTED:
    raise ValueError(f"model.name={config.model.name!r} takes imported weights: use it with "
                     "--mode=report or --mode=visualize and --config.pretrained=FILE; train "
                     f"one of {', '.join(models.MODELS)}")
  if tuple(config.dataset.mean) or tuple(config.dataset.std):
    raise ValueError("dataset.mean and dataset.std are for imported weights; training "
                     "subtracts the training mean: leave them ()")
  input_pipeline.validate(config.dataset)
  train_state.validate(config)

  def need(ok, msg):
    if not ok:
      raise ValueError(msg)
  need(config.batch_size >= 1, f"batch_size={config.batch_size}; allowed: a positive int")
  if num_devices:
    need(config.batch_size % num_devices == 0,
         f"global batch_size={config.batch_size} does not divide by the {num_devices} "
         f"devices; use a multiple of {num_devices}")
  for name in ("eval_batch_size", "checkpoint_every_steps", "keep_checkpoints",
               "log_every_steps", "divergence_patience"):
    need(config[name] >= 1, f"{name}={config[name]}; allowed: a positive int")
  need(config.num_train_steps > 0 or config.num_epochs > 0,
       f"num_epochs={config.num_epochs}, num_train_steps={config.num_train_steps}; one must "
       "be positive")
  e = config.eval_every_epochs
  need(isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e) and e >= 0,
       f"eval_every_epochs={e!r}; allowed: a non-negative number")
  v = config.stall_warning_seconds
  need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0,
       f"stall_warning_seconds={v!r}; allowed: 0 (off) or a positive number of seconds")
  for name in ("max_loss", "divergence_factor"):
    v = config[name]
    need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and
         (v == 0 or v > (1 if name == "divergence_factor" else 0)),
         f"{name}={v!r}; allowed: 0 (off) or a number > "
         f"{1 if name == 'divergence_factor' else 0}")
  bad = [e for e in config.evolution_epochs if not e > 0]
  need(not bad, f"evolution_epochs has {bad}; allowed: positive epochs")
  if config.schedule == "plateau":   # needs evaluations before the last step
    if config.num_train_steps > 0:   # the interval in steps needs the dataset's size
      every = max(1, round(e * input_pipeline.steps_per_epoch(config))) if e > 0 else 0
      run, ok = f"num_train_steps={config.num_train_steps}", 0 < every < config.num_train_steps
    else:
      run, ok = f"num_epochs={config.num_epochs}", 0 < e < config.num_epochs
    need(ok, f"schedule='plateau' with eval_every_epochs={e} and {run} never evaluates "
         "during training; allowed: 0 < eval_every_epochs < the run's length, or schedule "
         "constant, step or cosine")


# ----------------------------------------------------------------------------
# Steps (written per device).
# ----------------------------------------------------------------------------

def _errors(logits, labels, mask):
  """Summed (top-1 wrong, top-5 wrong) over valid examples."""
  k = min(5, logits.shape[-1])
  topk = lax.top_k(logits, k)[1]
  hit1 = topk[:, 0] == labels
  hit5 = jnp.any(topk == labels[:, None], axis=-1)
  return jnp.sum(mask * ~hit1), jnp.sum(mask * ~hit5)


def _over_devices(reduce, tree):
  """``reduce(tree, AXIS)`` (``lax.pmean`` or ``lax.psum``); on a one-device mesh the tree
  itself, so the compiled step holds no collective that could wait on anything."""
  return tree if lax.axis_size(AXIS) == 1 else reduce(tree, AXIS)


def train_step(state: train_state.TrainState, batch, *, model, tx, lr_fn, clip_radius):
  """One SGD step on this device's part of the batch; returns (state, metrics)."""
  key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), lax.axis_index(AXIS))

  def loss_fn(params):
    logits = model.apply({"params": params}, batch["image"], train=True,
                         rngs={"dropout": key}).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = _over_devices(lax.pmean, grads)
  lr = lr_fn(state.step) * state.lr_scale
  params, opt_state = train_state.step_update(tx, grads, state.opt_state, state.params, lr,
                                              clip_radius)
  ones = jnp.ones_like(batch["label"], jnp.float32)
  e1, e5 = _errors(logits, batch["label"], ones)
  metrics = _over_devices(lax.pmean, {"loss": loss, "top1_error": e1 / ones.size,
                                      "top5_error": e5 / ones.size})
  metrics["learning_rate"] = lr
  finite = jnp.isfinite(metrics["loss"]) & jnp.all(jnp.stack(
      [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
  ok = finite & (state.nonfinite_step < 0)
  new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
  first_bad = (~finite) & (state.nonfinite_step < 0)
  new = new.replace(nonfinite_step=jnp.where(first_bad, state.step, state.nonfinite_step),
                    nonfinite_loss=jnp.where(first_bad, metrics["loss"], state.nonfinite_loss))
  return new, metrics


def _crop(x, top, left, size, flip):
  x = lax.dynamic_slice_in_dim(lax.dynamic_slice_in_dim(x, top, size, 1), left, size, 2)
  return x[:, :, ::-1] if flip else x


def eval_step(params, batch, *, model, crop_size, ten_crop):
  """Summed counts over this batch (all devices): n, loss, top-1/5 wrong (centre, 10-crop).

  ``batch['image']`` is (b, R, R, C); the centre crop and the paper's 10 crops
  (softmax averaged) are cut on device.
  """
  images, labels, mask = batch["image"], batch["label"], batch["mask"]
  size = images.shape[1]
  apply = lambda x: model.apply({"params": params}, x, train=False).astype(jnp.float32)
  c = (size - crop_size) // 2
  logits = apply(_crop(images, c, c, crop_size, False))
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  e1, e5 = _errors(logits, labels, mask)
  out = {"n": jnp.sum(mask), "loss": jnp.sum(loss * mask), "top1_wrong": e1, "top5_wrong": e5}
  if ten_crop:
    probs = jnp.zeros_like(logits)
    for top, left, flip in input_pipeline.ten_crop_offsets(size, crop_size):
      probs = probs + jax.nn.softmax(apply(_crop(images, top, left, crop_size, flip)))
    out["top1_wrong_10crop"], out["top5_wrong_10crop"] = _errors(probs, labels, mask)
  return _over_devices(lax.psum, out)


# ----------------------------------------------------------------------------
# Set-up helpers.
# ----------------------------------------------------------------------------

def maybe_initialize_distributed(config) -> None:
  """jax.distributed.initialize() if config.distributed or JAX_COORDINATOR_ADDRESS is set.

  Must run before any device is touched.  Reads JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES, JAX_PROCESS_ID when present (else auto-detection).
  """
  env = os.environ
  if not (config.distributed or env.get("JAX_COORDINATOR_ADDRESS")):
    return
  if jax.distributed.is_initialized():
    return
  kwargs = {}
  if env.get("JAX_COORDINATOR_ADDRESS"):
    kwargs = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(env["JAX_NUM_PROCESSES"]),
                  process_id=int(env["JAX_PROCESS_ID"]))
    if jax.config.jax_platforms in (None, "", "cpu"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


class Preempted(BaseException):
  """SIGTERM outside the training loop (start-up, final evaluation, report): the work in
  progress is dropped (temporary files removed by the ``finally`` blocks it unwinds).
  A BaseException, so ``except Exception`` (a checkpoint fallback) cannot swallow it."""


@contextlib.contextmanager
def sigterm_raises():
  """While inside: the first SIGTERM raises ``Preempted`` in the main thread (later ones
  are ignored, so clean-up runs).  The training loop replaces it by a flag (``_Preemption``):
  there SIGTERM finishes the step and saves it."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  fired = []

  def handle(signum, frame):
    del signum, frame
    if not fired:
      fired.append(True)
      raise Preempted()
  old = signal.signal(signal.SIGTERM, handle)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Process 0 creates ``workdir`` and holds its training lock (``rundir.lock``) while
  inside; with several processes all of them raise ``rundir.WorkdirInUse`` if it could not."""
  with contextlib.ExitStack() as stack:
    error = None
    if jax.process_index() == 0:
      try:
        os.makedirs(workdir, exist_ok=True)
        stack.enter_context(rundir.lock(workdir))
      except rundir.WorkdirInUse as e:
        error = e
      except OSError as e:
        error = PermissionError(f"workdir {workdir!r} is not writable ({e.strerror})")
    if jax.process_count() > 1:
      failed = bool(np.max(multihost_utils.process_allgather(np.int32(error is not None))))
      if failed and error is None:
        error = rundir.WorkdirInUse(f"workdir {workdir} is in use: process 0 could not lock it")
    if error is not None:
      raise error
    yield


def total_steps(config, steps_per_epoch: int) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return max(1, int(round(config.num_epochs * steps_per_epoch)))


def evolution_steps(config, steps_per_epoch: int, num_steps: int) -> dict[int, float]:
  """{step: epoch} of the feature-evolution checkpoints (Fig. 4), scaled to the run.

  Epochs beyond the run (a shortened run) are left out with a one-line notice."""
  run_epochs = num_steps / steps_per_epoch
  ref = config.evolution_reference_epochs
  scale = run_epochs / ref if ref and ref > 0 else 1.0
  out, dropped = {}, []
  for e in config.evolution_epochs:
    epoch = e * scale
    if epoch > run_epochs + 1e-6:
      dropped.append(e)
      continue
    step = min(num_steps, max(1, int(round(epoch * steps_per_epoch))))
    out[step] = round(step / steps_per_epoch, 4)
  if dropped:
    console.say(f"note: evolution epochs {dropped} are beyond the run ({run_epochs:.3g} "
                f"epochs) and left out; kept: {[round(e, 4) for e in out.values()]}")
  return dict(sorted(out.items()))


def _global(batch, sharding):
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _eval_fn(model, mesh, crop_size: int, ten_crop: bool):
  """jit(shard_map(eval_step)): compiled once per setting (evaluations during training,
  the final one and the training-error one share it)."""
  return conv.jit(jax.shard_map(
      lambda p, b: eval_step(p, b, model=model, crop_size=crop_size, ten_crop=ten_crop),
      mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(), check_vma=False))


def evaluate(config, workdir, state, model, mesh, *, ten_crop: bool, split=None,
             max_examples=-1, ids=None) -> dict:
  """Errors over a split (``ids``: those examples only), every example counted once
  (padded batches are masked)."""
  ndev = mesh.devices.size
  batch = -(-config.eval_batch_size // ndev) * ndev   # rounded up to a multiple of devices
  pc = jax.process_count()
  fn = _eval_fn(model, mesh, config.dataset.crop_size, ten_crop)
  sharding = NamedSharding(mesh, P(AXIS))
  totals = None
  for b in input_pipeline.create_eval_iterator(
      config, workdir, split=split, batch_size=batch, max_examples=max_examples,
      full_size=True, process_index=jax.process_index(), process_count=pc, ids=ids):
    b.pop("id")
    out = fn(state.params, _global(b, sharding))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.tree.map(lambda x: float(x), jax.device_get(totals))
  n = int(totals["n"])
  res = {"loss": totals["loss"] / n, "top1_error": totals["top1_wrong"] / n,
         "top5_error": totals["top5_wrong"] / n, "num_eval_examples": n}
  if ten_crop:
    res["top1_error_10crop"] = totals["top1_wrong_10crop"] / n
    res["top5_error_10crop"] = totals["top5_wrong_10crop"] / n
  return res


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
  views = [(c, c, False)] + (input_pipeline.ten_crop_offsets(size, crop_size) if ten_crop else [])
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
  model, variables, _, step, _ = checkpoints.load_latest(workdir)
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
  info = input_pipeline.dataset_info(config)
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
  fn = conv.jit(jax.shard_map(
      lambda m, b: ensemble_step(m, b, models_=tuple(x[0] for x in loaded),
                                 crop_size=config.dataset.crop_size, ten_crop=ten_crop),
      mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P(AXIS)), check_vma=False))
  sharding = NamedSharding(mesh, P(AXIS))
  totals, kept = None, {"id": [], "label": [], "top5": [], "top5_10crop": []}
  t0 = time.time()
  bar = console.progress(desc=f"ensemble of {len(loaded)}", total=-(-info.num_eval // batch),
                         unit="batch")
  for b in input_pipeline.create_eval_iterator(
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


# ----------------------------------------------------------------------------
# The training loop.
# ----------------------------------------------------------------------------


# ----------------------------------------------------------------------------
# The run: its fixed pieces, then the steps of the recipe.
# ----------------------------------------------------------------------------

class MetricsLog:
  """metrics.jsonl + TensorBoard (process 0 only)."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self.path = rundir.path(workdir, rundir.METRICS)
    self.writer = (metric_writers.create_default_writer(workdir, asynchronous=False)
                   if self.active else None)

  def write(self, step: int, epoch: float, split: str, metrics: dict) -> None:
    if not self.active:
      return
    row = {"step": int(step), "epoch": round(float(epoch), 4), "split": split}
    row.update({k: float(v) for k, v in metrics.items()})
    rundir.append_metrics(self.path, row)
    self.writer.write_scalars(int(step), {f"{split}/{k}": float(v) for k, v in metrics.items()})
    self.writer.flush()

  def drop_after(self, step: int) -> None:
    if self.active:
      rundir.drop_metrics_after(self.path, step)

  def close(self) -> None:
    if self.active:
      self.writer.close()


@dataclasses.dataclass
class Run:
  """What stays fixed while training: the config, data sizes, model, mesh and schedule."""
  config: ml_collections.ConfigDict
  workdir: str
  info: input_pipeline.DatasetInfo
  steps_per_epoch: int
  num_steps: int
  evolution: dict[int, float]        # {step: epoch} of the Fig. 4 checkpoints
  mesh: Mesh
  model: models.PaperNet
  tx: optax.GradientTransformation

  def say(self, msg: str, warn: bool = False) -> None:
    console.say(msg, warn=warn)


def prepare_run(config, workdir: str, devices: np.ndarray) -> Run:
  """Create the run directory and write config.json, dataset_info.json, evolution.json
  (after ``checkpoints.check_resume`` accepted the config: a resume with an incompatible
  change raises ValueError and writes nothing)."""
  if config.restore_path:
    checkpoints.resolve_restore_path(config.restore_path)   # a bad path, before any file
  try:
    os.makedirs(workdir, exist_ok=True)
    if not os.access(workdir, os.W_OK):
      raise PermissionError
  except OSError as e:
    raise PermissionError(f"workdir {workdir!r} is not writable") from e
  info = input_pipeline.dataset_info(config)
  steps_per_epoch = input_pipeline.steps_per_epoch(config)
  num_steps = total_steps(config, steps_per_epoch)
  evolution = evolution_steps(config, steps_per_epoch, num_steps)
  changes = checkpoints.check_resume(config, workdir, info)   # before anything is written
  if jax.process_index() == 0:
    if changes:
      console.say(checkpoints.record_changes(workdir, changes))
    rundir.write_json(rundir.path(workdir, rundir.CONFIG),
                      json.loads(config.to_json_best_effort()))
    rundir.write_json(rundir.path(workdir, rundir.DATASET_INFO), dataclasses.asdict(info))
    rundir.write_json(rundir.path(workdir, rundir.EVOLUTION),
                      {"steps_per_epoch": steps_per_epoch, "num_steps": num_steps,
                       "checkpoints": [[e, s] for s, e in evolution.items()]})
  return Run(config, workdir, info, steps_per_epoch, num_steps, evolution, Mesh(devices, (AXIS,)),
             models.from_config(config.model, info.num_classes),
             train_state.optimizer_from_config(config))


def restore_or_initialise(run: Run, mngr) -> tuple[train_state.TrainState, dict]:
  """(state, meta): the newest good checkpoint of the workdir, else ``config.restore_path``,
  else a fresh state (parameters from ``config.seed``), replicated over the mesh; meta:
  the checkpoint's JSON record ({} unless resuming this workdir)."""
  config = run.config
  shape = (1, run.info.input_size, run.info.input_size, run.info.channels)
  init = train_state.init_fn(run.model, shape, run.tx, seed=config.seed,
                             clip_radius=train_state.clip_radius(config))
  state = conv.jit(init, out_shardings=NamedSharding(run.mesh, P()))()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  ckpt_dir = rundir.path(run.workdir, rundir.CHECKPOINTS)
  restored = checkpoints.restore_latest(mngr, abstract, ckpt_dir)
  meta = {}
  if restored is not None:
    state, meta, latest = restored
    run.say(f"Resuming from checkpoint step {latest} in {ckpt_dir}")
  elif config.restore_path:
    restore_dir, restore_step = checkpoints.resolve_restore_path(config.restore_path)
    other = checkpoints.manager(restore_dir, 1, read_only=True)
    step = restore_step if restore_step is not None else other.latest_step()
    if step is None:
      raise FileNotFoundError(f"restore_path {config.restore_path!r} holds no checkpoint")
    state, _ = checkpoints.restore(other, step, abstract)
    run.say(f"Starting from {config.restore_path} step {step}")
  start = int(jax.device_get(state.step))
  if start > run.num_steps:
    run.say(f"checkpoint step {start} is past the run's {run.num_steps} steps", warn=True)
  return state, dict(meta or {})


def build_train_step(run: Run):
  """jit(shard_map(train_step)): (state, global batch) -> (state, metrics); state donated."""
  lr_fn = train_state.learning_rate_fn(run.config, run.steps_per_epoch, run.num_steps)
  step = lambda s, b: train_step(s, b, model=run.model, tx=run.tx, lr_fn=lr_fn,
                                 clip_radius=train_state.clip_radius(run.config))
  return conv.jit(jax.shard_map(step, mesh=run.mesh, in_specs=(P(), P(AXIS)),
                               out_specs=(P(), P()), check_vma=False), donate_argnums=(0,))


def check_finite(state, mngr, workdir: str) -> None:
  """FloatingPointError naming the first step whose loss or gradient was not finite."""
  bad = int(jax.device_get(state.nonfinite_step))
  if bad >= 0:
    mngr.wait_until_finished()
    last = mngr.latest_step()   # saved only after this check passed; restores check finiteness
    kept = (f"the last good checkpoint is step {last} in {workdir}/checkpoints" if last is not
            None else f"no checkpoint was saved in {workdir}/checkpoints before it (a rerun "
            "starts from the beginning)")
    raise FloatingPointError(
        f"non-finite loss or gradient at step {bad + 1} (loss "
        f"{float(jax.device_get(state.nonfinite_loss))}; training stopped before applying it; "
        f"{kept})")


def save(run: Run, mngr, state, step: int, progress: "_Progress") -> None:
  """Save ``step`` with its record: data position, and the progress bookkeeping
  (``_Progress.record``: training seconds so far, metrics since the last log row)."""
  check_finite(state, mngr, run.workdir)
  meta = {"step": step, "epoch": step / run.steps_per_epoch,
          "data_position": step * run.config.batch_size,
          "batch_size": run.config.batch_size, "seed": run.config.seed, **progress.record()}
  checkpoints.save(mngr, step, state, meta)


def evaluate_and_plateau(run: Run, state, step: int, log: MetricsLog):
  """Centre-crop validation error; with schedule="plateau" the learning-rate factor
  drops after ``plateau_patience`` evaluations without improvement.  Returns the state."""
  config = run.config
  res = evaluate(config, run.workdir, state, run.model, run.mesh, ten_crop=False)
  if config.schedule == "plateau":
    vals = train_state.plateau_update(
        jax.device_get({"lr_scale": state.lr_scale, "best_error": state.best_error,
                        "bad_evals": state.bad_evals}),
        res["top1_error"], config.plateau_patience, config.plateau_factor)
    state = state.replace(**{k: jax.device_put(jnp.asarray(v, getattr(state, k).dtype),
                                               NamedSharding(run.mesh, P()))
                             for k, v in vals.items()})
    res["lr_scale"] = float(vals["lr_scale"])
  log.write(step, step / run.steps_per_epoch, "eval", res)
  run.say(f"evaluation at step {step} (epoch {step / run.steps_per_epoch:.2f}): top-1 error "
          f"{res['top1_error']:.4f}, top-5 error {res['top5_error']:.4f}")
  return state


class _Progress:
  """The training bar, training time, the step metrics since the last log row (averaged
  into a row every ``log_every_steps`` steps) and the divergence guard.  ``record()``
  goes into each checkpoint and ``meta`` (a restored checkpoint's record; {} for a fresh
  run or one written before these fields) continues it, so a resumed run counts all its
  segments' time and logs the rows an uninterrupted run logs."""

  def __init__(self, run: Run, start: int, meta: dict):
    self.run = run
    self.pending = list(meta.get("pending_metrics", []))
    self.seconds0, self.t0 = float(meta.get("train_seconds", 0.0)), time.time()
    self.step_log = int(meta.get("log_step", start))
    self.t_log = float(meta.get("log_seconds", self.seconds0))
    self.initial_loss = meta.get("initial_loss")
    self.above = 0                  # consecutive rows above the divergence level
    self.bar = console.progress(desc=f"training {run.config.model.name}", total=run.num_steps,
                                initial=start, unit="step")

  def seconds(self) -> float:
    """Training seconds of the run so far, all segments."""
    return self.seconds0 + time.time() - self.t0

  def close(self) -> None:
    self.bar.close()

  def add(self, metrics) -> None:
    self.pending.append(metrics)

  def _floats(self) -> list[dict]:
    self.pending = [{k: float(v) for k, v in m.items()} for m in jax.device_get(self.pending)]
    return self.pending

  def record(self) -> dict:
    return {"train_seconds": self.seconds(), "pending_metrics": self._floats(),
            "log_step": self.step_log, "log_seconds": self.t_log,
            "initial_loss": self.initial_loss}

  @property
  def diverging(self) -> bool:
    """The last row was above the divergence level: no checkpoint is saved."""
    return self.above > 0

  def check_divergence(self, step: int, loss: float, mngr) -> None:
    """FloatingPointError when ``loss`` (the row at ``step``) is above ``max_loss``, or
    the rows have stayed above the divergence level for ``divergence_patience`` rows (or
    the run ends above it)."""
    c = self.run.config
    level = c.divergence_factor * max(self.initial_loss, math.log(self.run.info.num_classes))
    self.above = self.above + 1 if c.divergence_factor and loss > level else 0
    why = None
    if c.max_loss and loss > c.max_loss:
      why = f"above max_loss={c.max_loss:g}"
    elif self.above >= c.divergence_patience or (self.above and step == self.run.num_steps):
      why = (f"above {level:.4g} (divergence_factor={c.divergence_factor:g} x the starting "
             f"loss) for {self.above} log rows")
    if why:
      raise FloatingPointError(
          f"training diverged at step {step}: loss {loss:.4g} {why}; training stopped; the "
          f"last good checkpoint is step {mngr.latest_step()} in {self.run.workdir}/checkpoints "
          "(lower the learning rate)")

  def report(self, step: int, log: MetricsLog, mngr) -> None:
    run = self.run
    m = self._floats()
    if self.initial_loss is None:
      self.initial_loss = m[0]["loss"]
    self.pending = []
    avg = {k: float(np.mean([x[k] for x in m])) for k in m[0]}
    now = self.seconds()
    sps = (step - self.step_log) / max(now - self.t_log, 1e-9)
    self.t_log, self.step_log = now, step
    avg["steps_per_second"] = sps
    avg["images_per_second"] = sps * run.config.batch_size
    log.write(step, step / run.steps_per_epoch, "train", avg)
    self.bar.set_postfix(epoch=f"{step / run.steps_per_epoch:.2f}", loss=f"{avg['loss']:.4f}",
                         err=f"{avg['top1_error']:.4f}", lr=f"{avg['learning_rate']:.1e}",
                         refresh=False)
    self.bar.update(step - self.bar.n)
    if math.isfinite(avg["loss"]):    # a non-finite one is check_finite's
      self.check_divergence(step, avg["loss"], mngr)


class _Preemption:
  """Records SIGTERM while training (main thread only); restores the old handler on exit.

  With several processes a SIGTERM may reach only some of them: ``agreed()``
  (called by every process after every step) gathers the flags, so all stop
  after the same step.
  """

  def __init__(self):
    self.received, self.old = False, None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self.old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.received = True

  def __exit__(self, *exc):
    if self.old is not None:
      signal.signal(signal.SIGTERM, self.old)

  def agreed(self) -> bool:
    """True once any process has received SIGTERM (a collective when P > 1)."""
    if jax.process_count() == 1:
      return self.received
    return bool(np.max(multihost_utils.process_allgather(np.int32(self.received))))


def final_evaluation(run: Run, state, log: MetricsLog, train_seconds: float) -> dict:
  """Errors on the eval split (10 crops if configured), and the training error
  (``train_top1_error``, ``train_top5_error``: centre crop, no augmentation, on
  ``input_pipeline.train_subset``, as many training examples as the eval split has);
  writes results.json (replacing the evaluation row of a final evaluation that was
  interrupted before it)."""
  config = run.config
  t0 = time.time()
  res = evaluate(config, run.workdir, state, run.model, run.mesh, ten_crop=config.ten_crop_eval)
  if not config.ten_crop_eval:
    res["top1_error_10crop"] = res["top5_error_10crop"] = float("nan")
  t1 = time.time()
  on_train = evaluate(config, run.workdir, state, run.model, run.mesh, ten_crop=False,
                      split=config.dataset.train_split,
                      ids=input_pipeline.train_subset(config))
  res.update(train_top1_error=on_train["top1_error"], train_top5_error=on_train["top5_error"],
             num_train_eval_examples=on_train["num_eval_examples"])
  res.update(train_seconds=train_seconds, eval_seconds=t1 - t0,
             train_eval_seconds=time.time() - t1, steps=int(jax.device_get(state.step)),
             lr_scale=float(jax.device_get(state.lr_scale)))
  if log.active:
    rundir.drop_metrics(log.path, lambda r: r["split"] == "eval" and r["step"] >= run.num_steps)
  log.write(run.num_steps, run.num_steps / run.steps_per_epoch, "eval", res)
  if jax.process_index() == 0:
    rundir.write_json(rundir.path(run.workdir, rundir.RESULTS),
                      dict(res, versions=rundir.versions()))
  crops = (f" ({res['top1_error_10crop']:.4f} with 10 crops)" if config.ten_crop_eval else "")
  run.say(f"final evaluation of {config.model.name} on {res['num_eval_examples']} images: "
          f"top-1 error {res['top1_error']:.4f}{crops}, top-5 error {res['top5_error']:.4f} "
          f"(training top-1 error {res['train_top1_error']:.4f} on "
          f"{res['num_train_eval_examples']} training images); "
          f"trained in {console.minutes(train_seconds)}")
  return res


def finished_results(run: Run, step: int) -> dict | None:
  """The results.json of a run that has finished at ``step`` (None if it has not)."""
  try:
    res = rundir.read_json(rundir.path(run.workdir, rundir.RESULTS))
  except (OSError, ValueError):
    return None
  if not isinstance(res, dict) or res.get("steps") != step or step != run.num_steps:
    return None
  res.pop("versions", None)
  return res


def _disk_full(e: BaseException, workdir: str) -> rundir.DiskFull:
  """The one-line error for a full disk: where, and the checkpoint that is kept."""
  ckpt = rundir.path(workdir, rundir.CHECKPOINTS)
  steps = [int(d) for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(ckpt) else []
  kept = (f"the last good checkpoint, step {max(steps)} in {ckpt}, is kept" if steps else
          "no checkpoint was written yet")
  return rundir.DiskFull(f"the disk is full (no space left on device writing "
                         f"{rundir.disk_full_path(e, workdir)}); training stopped; {kept}; "
                         "free space and rerun the same command to resume")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, devices=None,
                       hooks: Sequence[Hook] = ()) -> dict:
  """Train with ``config`` in ``workdir`` (resuming if it holds checkpoints); returns results.

  ``devices``: the devices of the data mesh (default: every device of every process).
  ``hooks``: ``hook(step, state, writer)`` called after every step on process 0.

  Results (also ``<workdir>/results.json``, with the package versions): top1_error,
  top5_error (centre crop), top1_error_10crop, top5_error_10crop,
  num_eval_examples, train_top1_error, train_top5_error, num_train_eval_examples
  (``final_evaluation``), train_seconds (all segments of a resumed run), steps, plus
  loss and the learning-rate factor.  A finished run (its last checkpoint restores and
  results.json is there) is not evaluated again: its results are returned unchanged.

  Faults: the workdir is locked (``rundir.lock``; another training process on it
  raises ``rundir.WorkdirInUse``) and what interrupted writes left is removed
  (``rundir.clean_leftovers``); on SIGTERM in the loop it finishes the current step,
  saves it and returns ``{"preempted": True, "steps": n}`` (rerun to resume), and
  elsewhere (start-up, final evaluation) drops that work and returns the same; a
  damaged newest checkpoint is reported and the previous one used; a non-finite loss
  or gradient, or a diverging loss (``_Progress.check_divergence``), raises
  FloatingPointError naming the step (nothing after the last good checkpoint is
  saved, no results.json written); a full disk raises ``rundir.DiskFull`` (one line).
  """
  maybe_initialize_distributed(config)
  workdir = os.path.abspath(workdir)
  devices = np.array(jax.devices() if devices is None else list(devices))
  validate(config, devices.size)
  ckpt_dir = rundir.path(workdir, rundir.CHECKPOINTS)
  try:
    with sigterm_raises(), workdir_lock(workdir):
      if jax.process_index() == 0:
        rundir.clean_leftovers(workdir, locked=True)
      try:
        return _train(prepare_run(config, workdir, devices), hooks)
      except Exception as e:  # pylint: disable=broad-except
        if rundir.is_disk_full(e):
          raise _disk_full(e, workdir) from None
        raise
  except Preempted:
    steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] \
        if os.path.isdir(ckpt_dir) else []
    step = max(steps) if steps else None
    console.say(f"SIGTERM: stopped; the last checkpoint is step {step} in {ckpt_dir}; rerun "
                "the same command to finish", warn=True)
    return {"preempted": True, "steps": step}


def _train(run: Run, hooks: Sequence[Hook]) -> dict:
  """The loop of ``train_and_evaluate`` (the workdir locked), then the final evaluation."""
  config, workdir = run.config, run.workdir
  mngr = checkpoints.manager(rundir.path(workdir, rundir.CHECKPOINTS), config.keep_checkpoints,
                             tuple(run.evolution))
  log, ok = None, False
  try:
    state, meta = restore_or_initialise(run, mngr)
    start = int(jax.device_get(state.step))
    done = finished_results(run, start)
    if done is not None:
      run.say(f"The run in {workdir} has finished (step {start}); its records are unchanged")
      ok = True
      return done
    log = MetricsLog(workdir)
    log.drop_after(start)
    p_train = build_train_step(run)
    sharding = NamedSharding(run.mesh, P(AXIS))
    eval_every = (max(1, int(round(config.eval_every_epochs * run.steps_per_epoch)))
                  if config.eval_every_epochs > 0 else 0)
    batches = input_pipeline.create_train_iterator(config, workdir, start)
    run.say(f"training {config.model.name} on {config.dataset.name} ({run.info.num_classes} "
            f"classes, {run.info.num_train} training and {run.info.num_eval} eval images): "
            f"{run.num_steps} steps ({run.steps_per_epoch} per epoch), global batch "
            f"{config.batch_size} over {run.mesh.devices.size} device(s)")
    progress = _Progress(run, start, meta)
    with input_pipeline.single_thread_blas(), _Preemption() as preemption, \
        console.Watchdog(config.stall_warning_seconds) as watchdog:
      for step in range(start + 1, run.num_steps + 1):
        state, metrics = p_train(state, _global(next(batches), sharding))
        progress.add(metrics)
        watchdog.submit(step, metrics)
        if log.active and hooks:
          with watchdog.paused():
            for hook in hooks:
              hook(step, state, log.writer)
        if step % config.log_every_steps == 0 or step == run.num_steps:
          check_finite(state, mngr, workdir)
          progress.report(step, log, mngr)
        if eval_every and step % eval_every == 0 and step != run.num_steps:
          check_finite(state, mngr, workdir)
          with watchdog.paused():
            state = evaluate_and_plateau(run, state, step, log)
        if (step % config.checkpoint_every_steps == 0 or step in run.evolution or
            step == run.num_steps) and not progress.diverging:
          save(run, mngr, state, step, progress)
        if preemption.agreed():
          if progress.diverging:
            msg = (f"stopped after step {step}; the loss is above the divergence level, so "
                   f"the last checkpoint kept is step {mngr.latest_step()}")
          else:
            if mngr.latest_step() != step:
              save(run, mngr, state, step, progress)
            msg = f"stopped after step {step} and saved checkpoint step {step}"
          mngr.wait_until_finished()
          progress.close()
          run.say(f"SIGTERM: {msg} in {workdir}/checkpoints; rerun the same command to resume",
                  warn=True)
          ok = True
          return {"preempted": True, "steps": step}
    progress.close()
    check_finite(state, mngr, workdir)
    res = final_evaluation(run, state, log, progress.seconds())
    ok = True
    return res
  finally:
    try:
      mngr.wait_until_finished()
      mngr.close()
      if log is not None:
        log.close()
    except Exception:  # pylint: disable=broad-except
      if ok:
        raise
