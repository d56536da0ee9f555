"""Training and evaluation: data-parallel SGD with the paper's recipe (Sec. 3).

The train step is written for one device: gradients and metrics are averaged
with ``lax.pmean`` over the mesh axis ``"data"``; ``jax.shard_map`` under
``jax.jit`` maps it over a 1-D mesh of every device of every process
(``check_vma=False``: per-device gradients as under pmap, so the explicit
``pmean`` is the one reduction; with varying-manual-axes checking JAX would
already sum the gradients of the replicated parameters).  The
state is replicated, the batch sharded on its leading axis, the state buffers
donated.  The dropout key is the run's key folded with the step and the device
index.

After every update each conv filter whose RMS exceeds ``clip_radius`` is
rescaled to it (feature scale clipping, a projection after the optax update).

Outputs in the workdir: ``config.json``, ``pixel_mean.npy``, ``dataset_info.json``,
``checkpoints/`` (Orbax: the last ``keep_checkpoints`` plus the
feature-evolution steps listed in ``evolution.json``), ``metrics.jsonl``,
TensorBoard events, ``results.json``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time
from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from zfnet_jax import input_pipeline, models

AXIS = "data"
EXIT_PREEMPTED = 75  # os.EX_TEMPFAIL: stopped by SIGTERM after saving; rerun to resume
PAPER_EPOCHS = 70.0
SCHEDULES = ("constant", "step", "cosine", "plateau")


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # int32 ()
  params: Any
  opt_state: Any
  rng: jax.Array             # uint32 (2,) raw key of the run
  lr_scale: jax.Array        # float32 (): reduce-on-plateau factor so far
  best_error: jax.Array      # float32 (): best validation top-1 error so far
  bad_evals: jax.Array       # int32 (): evaluations since it last improved
  nonfinite_step: jax.Array  # int32 (): first step with a non-finite loss, -1 if none
  nonfinite_loss: jax.Array  # float32 (): that loss


# ----------------------------------------------------------------------------
# Optimiser pieces.
# ----------------------------------------------------------------------------

def clip_conv_filters(params, radius: float):
  """Feature scale clipping: every conv filter (HWIO kernel, one filter per O)
  whose RMS over (H, W, I) exceeds ``radius`` is rescaled to RMS ``radius``."""
  def clip(path, x):
    if x.ndim != 4 or path[-1].key != "kernel":
      return x
    rms = jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), axis=(0, 1, 2), keepdims=True))
    return (x * jnp.minimum(1.0, radius / jnp.maximum(rms, 1e-30))).astype(x.dtype)
  return jax.tree_util.tree_map_with_path(clip, params)


def learning_rate_fn(config, steps_per_epoch: int, total_steps: int):
  """step -> base learning rate (before the plateau factor)."""
  if config.schedule not in SCHEDULES:
    raise ValueError(f"unknown schedule {config.schedule!r}; allowed: {', '.join(SCHEDULES)}")
  lr = config.learning_rate
  warm = int(config.warmup_epochs * steps_per_epoch)
  if config.schedule == "step":
    main = optax.piecewise_constant_schedule(
        lr, {int(e * steps_per_epoch) - warm: 0.1 for e in config.step_epochs})
  elif config.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, max(total_steps - warm, 1))
  else:
    main = optax.constant_schedule(lr)
  if warm > 0:
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])
  return main


def make_optimizer(config) -> optax.GradientTransformation:
  """Weight decay on kernels + momentum (or Adam); the learning rate is applied in the step."""
  parts = []
  if config.weight_decay:
    parts.append(optax.add_decayed_weights(
        config.weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)))
  if config.optimizer == "sgd":
    parts.append(optax.trace(decay=config.momentum))
  elif config.optimizer == "adam":
    parts.append(optax.scale_by_adam())
  else:
    raise ValueError(f"unknown optimizer {config.optimizer!r}; allowed: sgd, adam")
  return optax.chain(*parts)


def plateau_update(state_vals: dict, error: float, patience: int, factor: float) -> dict:
  """Reduce-on-plateau on the host: x factor after ``patience`` evals without improvement.

  ``state_vals`` has lr_scale, best_error, bad_evals; returns the new values.
  """
  scale, best, bad = state_vals["lr_scale"], state_vals["best_error"], state_vals["bad_evals"]
  if error < best - 1e-9:
    return {"lr_scale": scale, "best_error": error, "bad_evals": 0}
  bad += 1
  if bad >= patience:
    return {"lr_scale": scale * factor, "best_error": best, "bad_evals": 0}
  return {"lr_scale": scale, "best_error": best, "bad_evals": bad}


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


def train_step(state: TrainState, batch, *, model, tx, lr_fn, clip_radius):
  """One SGD step on this device's part of the batch; returns (state, metrics)."""
  key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), lax.axis_index(AXIS))

  def loss_fn(params):
    logits = model.apply({"params": params}, batch["image"], train=True,
                         rngs={"dropout": key}).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = lax.pmean(grads, AXIS)
  lr = lr_fn(state.step) * state.lr_scale
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = jax.tree.map(lambda p, u: p - lr * u, state.params, updates)
  if clip_radius:
    params = clip_conv_filters(params, clip_radius)
  ones = jnp.ones_like(batch["label"], jnp.float32)
  e1, e5 = _errors(logits, batch["label"], ones)
  metrics = lax.pmean({"loss": loss, "top1_error": e1 / ones.size, "top5_error": e5 / ones.size},
                      AXIS)
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
  return lax.psum(out, AXIS)


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


def validate_config(config, num_devices: int | None = None) -> None:
  """ValueError naming the first impossible value (and what is allowed), before any work.

  ``num_devices``: check that the global batch divides over them (None: skip).
  Evolution epochs beyond the run are checked by ``evolution_steps`` (it needs
  the dataset size).
  """
  def need(ok, msg):
    if not ok:
      raise ValueError(msg)
  def positive(name, value, allow_zero=False):
    need(isinstance(value, (int, float)) and not isinstance(value, bool) and
         math.isfinite(value) and (value >= 0 if allow_zero else value > 0),
         f"{name}={value!r}; allowed: a {'non-negative' if allow_zero else 'positive'} number")
  m, d = config.model, config.dataset
  need(m.name in models.MODELS, f"model.name={m.name!r}; allowed: {', '.join(models.MODELS)}")
  need(len(m.conv_features) == 5 and all(isinstance(f, int) and f > 0 for f in m.conv_features),
       f"model.conv_features={tuple(m.conv_features)!r}; allowed: 5 positive ints")
  positive("model.fc_features", m.fc_features)
  bad = [r for r in m.removed if r not in ("conv3", "conv4", "fc6", "fc7")]
  need(not bad, f"model.removed has {bad}; allowed: conv3, conv4, fc6, fc7")
  need(0.0 <= m.dropout_rate < 1.0, f"model.dropout_rate={m.dropout_rate!r}; allowed: 0 <= x < 1")
  need(d.crop_size >= 1 and d.resize_size >= d.crop_size,
       f"need 1 <= dataset.crop_size <= dataset.resize_size, got crop_size={d.crop_size}, "
       f"resize_size={d.resize_size}")
  need(d.on_corrupt in ("skip", "stop"), f"dataset.on_corrupt={d.on_corrupt!r}; allowed: skip, stop")
  need(d.name != "folder" or d.folder, "dataset.name='folder' needs --config.dataset.folder=DIR")
  need(config.batch_size >= 1, f"batch_size={config.batch_size}; allowed: a positive int")
  if num_devices:
    need(config.batch_size % num_devices == 0,
         f"global batch_size={config.batch_size} does not divide by the {num_devices} "
         f"devices; use a multiple of {num_devices}")
  for name in ("eval_batch_size", "checkpoint_every_steps", "keep_checkpoints",
               "log_every_steps"):
    need(config[name] >= 1, f"{name}={config[name]}; allowed: a positive int")
  need(config.num_train_steps > 0 or config.num_epochs > 0,
       f"num_epochs={config.num_epochs}, num_train_steps={config.num_train_steps}; one must "
       "be positive")
  positive("learning_rate", config.learning_rate, allow_zero=True)
  positive("weight_decay", config.weight_decay, allow_zero=True)
  need(0.0 <= config.momentum <= 1.0, f"momentum={config.momentum!r}; allowed: 0 <= x <= 1")
  positive("eval_every_epochs", config.eval_every_epochs, allow_zero=True)
  need(config.schedule in SCHEDULES,
       f"unknown schedule {config.schedule!r}; allowed: {', '.join(SCHEDULES)}")
  need(config.optimizer in ("sgd", "adam"),
       f"unknown optimizer {config.optimizer!r}; allowed: sgd, adam")
  bad = [e for e in config.evolution_epochs if not e > 0]
  need(not bad, f"evolution_epochs has {bad}; allowed: positive epochs")
  need(config.report.rule in ("backprop", "deconvnet", "guided"),
       f"unknown report.rule {config.report.rule!r}; allowed: backprop, deconvnet, guided")


def total_steps(config, steps_per_epoch: int) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return max(1, int(round(config.num_epochs * steps_per_epoch)))


def evolution_steps(config, steps_per_epoch: int, num_steps: int) -> dict[int, float]:
  """{step: epoch} of the feature-evolution checkpoints (Fig. 4), scaled to the run."""
  run_epochs = num_steps / steps_per_epoch
  ref = config.evolution_reference_epochs
  scale = run_epochs / ref if ref and ref > 0 else 1.0
  out = {}
  for e in config.evolution_epochs:
    epoch = e * scale
    if epoch > run_epochs + 1e-6:
      raise ValueError(f"evolution epoch {e} (scaled: {epoch:.3g}) is beyond the run "
                       f"({run_epochs:.3g} epochs); allowed: epochs <= {run_epochs:.3g} "
                       "(or set evolution_reference_epochs to scale them)")
    step = min(num_steps, max(1, int(round(epoch * steps_per_epoch))))
    out[step] = round(step / steps_per_epoch, 4)
  return dict(sorted(out.items()))


def _checkpoint_manager(ckpt_dir, keep, keep_steps=(), read_only=False):
  import orbax.checkpoint as ocp
  from orbax.checkpoint import checkpoint_managers as cm
  policy = cm.AnyPreservationPolicy([cm.LatestN(max(1, keep))] +
                                    ([cm.CustomSteps(list(keep_steps))] if keep_steps else []))
  # Synchronous saves: a returned save() is on disk (simplest to reason about on
  # preemption); the blocking time is small next to an epoch.
  opts = ocp.CheckpointManagerOptions(preservation_policy=policy, create=not read_only,
                                      read_only=read_only, enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(ckpt_dir), options=opts,
                               item_names=("state", "meta"))


def _restore(mngr, step, abstract_state):
  import orbax.checkpoint as ocp
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  return out["state"], out["meta"]


def _restore_latest(mngr, abstract_state, ckpt_dir):
  """(state, meta, step) of the newest checkpoint that restores, or None if there is none.

  Orbax writes each step to a temporary directory and renames it when complete,
  so a step killed mid-write never appears.  A step that exists but fails to
  restore (e.g. a truncated file) is reported, moved to ``<ckpt_dir>_damaged/``
  and the next older step is used.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return None
  damaged = []
  for step in steps:
    try:
      state, meta = _restore(mngr, step, abstract_state)
      if int(jax.device_get(state.step)) != step:
        raise ValueError(f"it holds step {int(jax.device_get(state.step))}")
    except Exception as e:  # pylint: disable=broad-except
      msg = (f"checkpoint step {step} in {ckpt_dir} is damaged or unreadable "
             f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''})")
      logging.warning(msg)
      print(f"WARNING: {msg}", flush=True)
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
      print(f"WARNING: falling back to checkpoint step {step}; damaged step(s) "
            f"{[b for b, _ in damaged]} moved to {aside}", flush=True)
    return state, meta, step
  raise ValueError(
      f"no checkpoint in {ckpt_dir} can be restored (steps {steps}; last error "
      f"{type(damaged[-1][1]).__name__}: {str(damaged[-1][1])[:300]}). If the model or "
      "optimiser config changed since they were written, use a new workdir.")


def _resolve_restore_path(path):
  """An explicit restore path: a checkpoints dir (latest step) or one step's dir."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"restore_path {path!r} does not exist (give a checkpoints "
                            "directory or one of its step directories)")
  base = os.path.basename(path.rstrip("/"))
  if base.isdigit():
    return os.path.dirname(path), int(base)
  return path, None


def _write_text(path, text):
  """Write via a temporary file and a rename: a reader never sees half a file."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def _write_json(path, obj):
  _write_text(path, json.dumps(obj, indent=2))


def _init_fn(config, model, info, tx):
  """() -> a fresh TrainState (params initialised from config.seed)."""
  init_rng, run_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  shape = (1, info.input_size, info.input_size, info.channels)

  def init():
    params = model.init(init_rng, jnp.zeros(shape, jnp.float32))["params"]
    if config.clip_filters:
      params = clip_conv_filters(params, config.clip_radius)
    return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                      rng=run_rng, lr_scale=jnp.float32(1.0), best_error=jnp.float32(np.inf),
                      bad_evals=jnp.int32(0), nonfinite_step=jnp.int32(-1),
                      nonfinite_loss=jnp.float32(0.0))
  return init


def create_train_state(config, model, info, tx, mesh) -> TrainState:
  """A fresh state, replicated over the mesh."""
  return jax.jit(_init_fn(config, model, info, tx), out_shardings=NamedSharding(mesh, P()))()


def _global(batch, sharding):
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------

def evaluate(config, workdir, state, model, mesh, *, ten_crop: bool, split=None,
             max_examples=-1) -> dict:
  """Errors over a split, every example counted once (padded batches are masked)."""
  ndev = mesh.devices.size
  batch = -(-config.eval_batch_size // ndev) * ndev   # rounded up to a multiple of devices
  pc = jax.process_count()
  fn = jax.jit(jax.shard_map(
      lambda p, b: eval_step(p, b, model=model, crop_size=config.dataset.crop_size,
                             ten_crop=ten_crop),
      mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(), check_vma=False))
  sharding = NamedSharding(mesh, P(AXIS))
  totals = None
  for b in input_pipeline.create_eval_iterator(
      config, workdir, split=split, batch_size=batch, max_examples=max_examples,
      full_size=True, process_index=jax.process_index(), process_count=pc):
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
# The training loop.
# ----------------------------------------------------------------------------

class _Logger:
  """metrics.jsonl + TensorBoard (process 0 only)."""

  def __init__(self, workdir):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    from clu import metric_writers
    self.writer = metric_writers.create_default_writer(workdir, asynchronous=False)
    self.path = os.path.join(workdir, "metrics.jsonl")

  def write(self, step, epoch, split, metrics):
    if not self.active:
      return
    row = {"step": int(step), "epoch": round(float(epoch), 4), "split": split}
    row.update({k: float(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    self.writer.write_scalars(int(step), {f"{split}/{k}": float(v) for k, v in metrics.items()})
    self.writer.flush()

  def drop_after(self, step):
    """Forget rows past ``step`` (logged after the checkpoint a resumed run starts from)."""
    if not (self.active and os.path.exists(self.path)):
      return
    with open(self.path) as f:
      lines = f.readlines()
    keep = []
    for line in lines:
      try:
        if json.loads(line)["step"] <= step:
          keep.append(line)
      except (ValueError, KeyError):   # a line cut short by a kill
        pass
    if len(keep) != len(lines):
      _write_text(self.path, "".join(keep))

  def close(self):
    if self.active:
      self.writer.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices=None) -> dict:
  """Train with ``config`` in ``workdir`` (resuming if it holds checkpoints); returns results.

  ``devices``: the devices of the data mesh (default: every device of every process).

  Results (also ``<workdir>/results.json``): top1_error, top5_error (centre
  crop), top1_error_10crop, top5_error_10crop, num_eval_examples,
  train_seconds, steps, plus loss and the learning-rate factor.

  Faults: on SIGTERM it finishes the current step, saves it and returns
  ``{"preempted": True, "steps": n}`` (rerun to resume); a damaged newest
  checkpoint is reported and the previous one used; a non-finite loss or
  gradient raises FloatingPointError naming the step (nothing after the last
  good checkpoint is saved).
  """
  import orbax.checkpoint as ocp
  maybe_initialize_distributed(config)
  workdir = os.path.abspath(workdir)
  devices = np.array(jax.devices() if devices is None else list(devices))
  validate_config(config, devices.size)
  if config.restore_path:
    restore_dir, restore_step = _resolve_restore_path(config.restore_path)
  try:
    os.makedirs(workdir, exist_ok=True)
    if not os.access(workdir, os.W_OK):
      raise PermissionError
  except OSError as e:
    raise PermissionError(f"workdir {workdir!r} is not writable") from e
  info = input_pipeline.dataset_info(config)
  spe = input_pipeline.steps_per_epoch(config)
  num_steps = total_steps(config, spe)
  evo = evolution_steps(config, spe, num_steps)
  if jax.process_index() == 0:
    _write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
    _write_json(os.path.join(workdir, "dataset_info.json"), dataclasses.asdict(info))
    _write_json(os.path.join(workdir, "evolution.json"),
                {"steps_per_epoch": spe, "num_steps": num_steps,
                 "checkpoints": [[e, s] for s, e in evo.items()]})

  mesh = Mesh(devices, (AXIS,))
  model = models.from_config(config.model, info.num_classes)
  tx = make_optimizer(config)
  lr_fn = learning_rate_fn(config, spe, num_steps)
  state = create_train_state(config, model, info, tx, mesh)

  mngr = _checkpoint_manager(os.path.join(workdir, "checkpoints"), config.keep_checkpoints,
                             tuple(evo))
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = _restore_latest(mngr, abstract, os.path.join(workdir, "checkpoints"))
  if restored is not None:
    state, meta, latest = restored
    logging.info("Resuming from %s/checkpoints step %d", workdir, latest)
    print(f"Resuming from checkpoint step {latest} in {workdir}/checkpoints", flush=True)
  elif config.restore_path:
    other = _checkpoint_manager(restore_dir, 1, read_only=True)
    step = restore_step if restore_step is not None else other.latest_step()
    if step is None:
      raise FileNotFoundError(f"restore_path {config.restore_path!r} holds no checkpoint")
    state, meta = _restore(other, step, abstract)
    print(f"Starting from {config.restore_path} step {step}", flush=True)
  start = int(jax.device_get(state.step))
  if start > num_steps:
    logging.warning("checkpoint step %d is past the run's %d steps", start, num_steps)

  p_train = jax.jit(jax.shard_map(
      lambda s, b: train_step(s, b, model=model, tx=tx, lr_fn=lr_fn,
                              clip_radius=config.clip_radius if config.clip_filters else 0.0),
      mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()), check_vma=False),
      donate_argnums=(0,))
  batch_sharding = NamedSharding(mesh, P(AXIS))
  logger = _Logger(workdir)
  logger.drop_after(start)
  # Fig. 4 live: projections of a few maps as TensorBoard images every N steps.
  from zfnet_jax.analyses import evolution as evolution_lib
  tb_hook = evolution_lib.tensorboard_hook(config, workdir, model) if logger.active else None
  eval_every = max(1, int(round(config.eval_every_epochs * spe))) \
      if config.eval_every_epochs > 0 else 0

  def save(step):
    check_finite(state, step)
    meta = {"step": step, "epoch": step / spe, "data_position": step * config.batch_size,
            "batch_size": config.batch_size, "seed": config.seed}
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave(meta)), force=True)

  def check_finite(state, step):
    bad = int(jax.device_get(state.nonfinite_step))
    if bad >= 0:
      mngr.wait_until_finished()
      raise FloatingPointError(
          f"non-finite loss or gradient at step {bad + 1} (loss "
          f"{float(jax.device_get(state.nonfinite_loss))}; training stopped before applying it; "
          f"the last good checkpoint is step {mngr.latest_step()} in {workdir}/checkpoints)")

  it = input_pipeline.create_train_iterator(config, workdir, start)
  t0, t_log, step_log, train_seconds = time.time(), time.time(), start, 0.0
  pending = []
  print(f"Training {config.model.name} on {config.dataset.name}: {num_steps} steps "
        f"({spe} per epoch), global batch {config.batch_size} over {devices.size} device(s)",
        flush=True)
  step = start
  # SIGTERM (preemption): finish the current step, save it, return {"preempted": True}.
  preempted = []
  old_handler = None
  blas = input_pipeline.single_thread_blas()
  if threading.current_thread() is threading.main_thread():
    old_handler = signal.signal(signal.SIGTERM, lambda signum, frame: preempted.append(signum))
  try:
    for step in range(start + 1, num_steps + 1):
      batch = _global(next(it), batch_sharding)
      state, metrics = p_train(state, batch)
      pending.append(metrics)
      if tb_hook:
        tb_hook(step, state.params, logger.writer)
      if step % config.log_every_steps == 0 or step == num_steps:
        check_finite(state, step)
        m = jax.device_get(pending)
        pending = []
        avg = {k: float(np.mean([x[k] for x in m])) for k in m[0]}
        now = time.time()
        sps = (step - step_log) / max(now - t_log, 1e-9)
        t_log, step_log = now, step
        avg["steps_per_second"] = sps
        avg["images_per_second"] = sps * config.batch_size
        logger.write(step, step / spe, "train", avg)
        eta = (num_steps - step) / max(sps, 1e-9)
        msg = (f"step {step}/{num_steps} epoch {step / spe:.2f} loss {avg['loss']:.4f} "
               f"top1_err {avg['top1_error']:.4f} lr {avg['learning_rate']:.2e} "
               f"{sps:.2f} steps/s ETA {eta / 60:.1f} min")
        logging.info(msg)
        if jax.process_index() == 0:
          print(msg, flush=True)
      if eval_every and step % eval_every == 0 and step != num_steps:
        check_finite(state, step)
        res = evaluate(config, workdir, state, model, mesh, ten_crop=False)
        if config.schedule == "plateau":
          vals = plateau_update(jax.device_get({"lr_scale": state.lr_scale,
                                                "best_error": state.best_error,
                                                "bad_evals": state.bad_evals}),
                                res["top1_error"], config.plateau_patience,
                                config.plateau_factor)
          state = state.replace(**{k: jax.device_put(jnp.asarray(v, getattr(state, k).dtype),
                                                     NamedSharding(mesh, P()))
                                   for k, v in vals.items()})
          res["lr_scale"] = float(vals["lr_scale"])
        logger.write(step, step / spe, "eval", res)
        if jax.process_index() == 0:
          print(f"eval step {step}: top1_err {res['top1_error']:.4f} "
                f"top5_err {res['top5_error']:.4f}", flush=True)
      if step % config.checkpoint_every_steps == 0 or step in evo or step == num_steps:
        save(step)
      if preempted:
        if mngr.latest_step() != step:
          save(step)
        mngr.wait_until_finished()
        msg = (f"SIGTERM: stopped after step {step} and saved checkpoint step {step} in "
               f"{workdir}/checkpoints; rerun the same command to resume")
        logging.warning(msg)
        print(msg, flush=True)
        return {"preempted": True, "steps": step}
    train_seconds = time.time() - t0
    check_finite(state, step)
    res = evaluate(config, workdir, state, model, mesh, ten_crop=config.ten_crop_eval)
    if not config.ten_crop_eval:
      res["top1_error_10crop"] = res["top5_error_10crop"] = float("nan")
    res.update(train_seconds=train_seconds, steps=int(jax.device_get(state.step)),
               lr_scale=float(jax.device_get(state.lr_scale)))
    logger.write(num_steps, num_steps / spe, "eval", res)
    if jax.process_index() == 0:
      _write_json(os.path.join(workdir, "results.json"), res)
      print("results: " + json.dumps(res), flush=True)
    return res
  finally:
    blas.restore_original_limits()
    if old_handler is not None:
      signal.signal(signal.SIGTERM, old_handler)
    mngr.wait_until_finished()
    mngr.close()
    logger.close()


# ----------------------------------------------------------------------------
# Loading a trained run.
# ----------------------------------------------------------------------------

def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's saved config (``<workdir>/config.json``) over the current defaults."""
  from zfnet_jax import configs
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir!r} is not a training workdir")
  with open(path) as f:
    saved = json.load(f)
  config = configs.default_config()

  def merge(c, d):
    for k, v in d.items():
      if k in c and isinstance(c[k], ml_collections.ConfigDict) and isinstance(v, dict):
        merge(c[k], v)
      else:
        c[k] = tuple(v) if isinstance(v, list) else v
  with config.unlocked():
    merge(config, saved)
  return config


def evolution_checkpoints(workdir: str) -> list[tuple[float, int]]:
  """[(epoch, step)] of the feature-evolution checkpoints that exist, in order."""
  path = os.path.join(workdir, "evolution.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir!r} is not a training workdir")
  with open(path) as f:
    evo = json.load(f)["checkpoints"]
  ckpt = os.path.join(workdir, "checkpoints")
  have = {int(d) for d in os.listdir(ckpt) if d.isdigit()} if os.path.isdir(ckpt) else set()
  return [(float(e), int(s)) for e, s in evo if int(s) in have]


def load_trained(workdir: str, step: int | None = None):
  """(model, {"params": params}, config) of a run; the latest checkpoint by default."""
  import orbax.checkpoint as ocp
  config = load_config(workdir)
  with open(os.path.join(workdir, "dataset_info.json")) as f:
    model = models.from_config(config.model, json.load(f)["num_classes"])
  mngr = _checkpoint_manager(os.path.join(workdir, "checkpoints"), 1, read_only=True)
  steps = mngr.all_steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoints in {workdir}/checkpoints")
  if step is None:
    step = max(steps)
  if step not in steps:
    raise ValueError(f"no checkpoint for step {step} in {workdir}/checkpoints; "
                     f"available: {sorted(steps)}")
  with open(os.path.join(workdir, "dataset_info.json")) as f:
    info = input_pipeline.DatasetInfo(**json.load(f))
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev),
                          jax.eval_shape(_init_fn(config, model, info, make_optimizer(config))))
  restored, _ = _restore(mngr, step, abstract)
  mngr.close()
  return model, {"params": restored.params}, config
