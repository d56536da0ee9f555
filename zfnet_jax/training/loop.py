"""The training loop: ``train_and_evaluate(config, workdir)`` validates the config,
resumes or initialises the state, trains with checkpoints and plateau decay, and
writes the final evaluation (``results.json``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metric_writers
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from zfnet_jax import console, rundir, xla
from zfnet_jax.data import iterators, sources
from zfnet_jax.nn import models, torchvision
from zfnet_jax.training import checkpoints, train_state
from zfnet_jax.training.progress import MetricsLog, _Progress
from zfnet_jax.training.runtime import (
  Preempted,
  _disk_full,
  _Preemption,
  maybe_initialize_distributed,
  sigterm_raises,
  workdir_lock,
)
from zfnet_jax.training.steps import (
  AXIS,
  Run,
  _global,
  evaluate,
  evolution_steps,
  total_steps,
  train_step,
)

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
  if config.model.name in torchvision.IMPORTED:
    raise ValueError(f"model.name={config.model.name!r} takes imported weights: use it with "
                     "--mode=report or --mode=visualize and --config.pretrained=FILE; train "
                     f"one of {', '.join(models.MODELS)}")
  if tuple(config.dataset.mean) or tuple(config.dataset.std):
    raise ValueError("dataset.mean and dataset.std are for imported weights; training "
                     "subtracts the training mean: leave them ()")
  sources.validate(config.dataset)
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
      every = max(1, round(e * iterators.steps_per_epoch(config))) if e > 0 else 0
      run, ok = f"num_train_steps={config.num_train_steps}", 0 < every < config.num_train_steps
    else:
      run, ok = f"num_epochs={config.num_epochs}", 0 < e < config.num_epochs
    need(ok, f"schedule='plateau' with eval_every_epochs={e} and {run} never evaluates "
         "during training; allowed: 0 < eval_every_epochs < the run's length, or schedule "
         "constant, step or cosine")


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
  info = sources.dataset_info(config)
  steps_per_epoch = iterators.steps_per_epoch(config)
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
  state = xla.jit(init, out_shardings=NamedSharding(run.mesh, P()))()
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
  return xla.jit(jax.shard_map(step, mesh=run.mesh, in_specs=(P(), P(AXIS)),
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


def final_evaluation(run: Run, state, log: MetricsLog, train_seconds: float) -> dict:
  """Errors on the eval split (10 crops if configured), and the training error
  (``train_top1_error``, ``train_top5_error``: centre crop, no augmentation, on
  ``iterators.train_subset``, as many training examples as the eval split has);
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
                      ids=iterators.train_subset(config))
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
    batches = iterators.create_train_iterator(config, workdir, start)
    run.say(f"training {config.model.name} on {config.dataset.name} ({run.info.num_classes} "
            f"classes, {run.info.num_train} training and {run.info.num_eval} eval images): "
            f"{run.num_steps} steps ({run.steps_per_epoch} per epoch), global batch "
            f"{config.batch_size} over {run.mesh.devices.size} device(s)")
    progress = _Progress(run, start, meta)
    with iterators.single_thread_blas(), _Preemption() as preemption, \
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

