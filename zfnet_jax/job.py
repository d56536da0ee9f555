"""The whole job behind ``main``: train, train the Fig. 6 comparison runs, write the report;
and each of ``main``'s other modes (``run_mode``).

The top floor: it may import everything, and nothing imports it but ``main``
(and notebooks or tests that want the whole job).  Every option is validated
once, before any long work: training's by ``loop.validate``, the report's by
``report.validate``.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

import jax
import ml_collections

from zfnet_jax import console, rundir
from zfnet_jax.analyses import evolution
from zfnet_jax.data import iterators, sources
from zfnet_jax.nn import models
from zfnet_jax.render import content
from zfnet_jax.report import comparisons, explore, report, visualize
from zfnet_jax.training import checkpoints, ensemble, loop, runtime, steps, weights

EXIT_PREEMPTED = runtime.EXIT_PREEMPTED
TENSORBOARD_IMAGES = 64   # training examples behind the live Fig. 4 panels


def summary(config: ml_collections.ConfigDict) -> str:
  """The model's layer table (works without the dataset: then ImageNet's 1000 classes, RGB).

  The config is validated first (``loop.validate``), as for training."""
  loop.validate(config)
  try:
    info = sources.dataset_info(config)
    num_classes, channels, note = info.num_classes, info.channels, ""
  except (ValueError, OSError):  # data not prepared here: the paper's ImageNet head
    num_classes, channels = 1000, 3
    note = f"({config.dataset.name} is not available: 1000 classes, 3 channels)\n"
  return note + models.summary(models.from_config(config.model, num_classes),
                               config.dataset.crop_size, channels)


def training_hooks(config: ml_collections.ConfigDict, workdir: str,
                   info: sources.DatasetInfo | None = None) -> list[loop.Hook]:
  """The hooks ``main`` gives training: Fig. 4 panels in TensorBoard every
  ``analyses.evolution.tensorboard_every_steps`` steps (none when 0), process 0 only."""
  evolution_config = config.analyses.evolution
  if evolution_config.tensorboard_every_steps <= 0 or jax.process_index() != 0:
    return []
  info = info or sources.dataset_info(config)
  model = models.from_config(config.model, info.num_classes)
  images, _, _ = iterators.load_examples(config, workdir, split=config.dataset.train_split,
                                              num=TENSORBOARD_IMAGES)
  hook = evolution.tensorboard_hook(
      model, images, layers=tuple(evolution_config.layers),
      maps=tuple(int(m) for m in evolution_config.tensorboard_maps), rule=config.report.rule,
      every=evolution_config.tensorboard_every_steps)
  return [hook] if hook is not None else []


def validate_report(config: ml_collections.ConfigDict,
                    info: sources.DatasetInfo | None = None) -> list:
  """The report's plan (``report.validate``) for the model ``config`` describes."""
  models.validate(config.model)
  sources.validate(config.dataset)
  weights.check_source(config)   # the weights' own checks, before the data is read
  info = info or sources.dataset_info(config)
  data = content.Data(config.dataset.name, config.dataset.crop_size,
                       config.dataset.resize_size, info.channels)
  return report.validate(config, weights.planned_model(config, info), data)


# Work of each phase in training steps of this run (measured on the quickstart, AMD EPYC,
# 2026-12-03): a forward pass costs about a third of a training step; the report's
# sections cost about REPORT_STEPS steps plus two forward passes over the scanned split.
FORWARD_STEP_FRACTION = 1 / 3
REPORT_STEPS = 1200


def plan(config: ml_collections.ConfigDict, workdir: str, *, train_model: bool,
         write_report: bool, report_plan: list | None,
         info: sources.DatasetInfo | None = None) -> list[str]:
  """The lines ``run`` prints before it starts: what it will do, in order."""
  info = info or sources.dataset_info(config)
  lines = [f"zfnet_jax: {config.model.name} on {config.dataset.name} "
           f"({info.num_train} training, {info.num_eval} {config.dataset.eval_split} images) "
           f"in {os.path.abspath(workdir)}"]
  todo = []
  if train_model:
    spe = iterators.steps_per_epoch(config)
    num_steps = steps.total_steps(config, spe)
    crops = "10 crops" if config.ten_crop_eval else "centre crop"
    todo.append(f"train {num_steps / spe:g} epochs ({num_steps} steps of {config.batch_size} images, "
                f"{config.optimizer}), then evaluate ({crops})")
  if write_report:
    for kind in comparisons.pending(config, workdir):
      c = comparisons.config_of(config, kind)
      todo.append(f"train the comparison model {comparisons.name_of(config, kind)} for "
                  f"{c.num_epochs:g} epoch(s) (Fig. 6)")
    todo.append("write the report: " + ", ".join(e.name for e, _ in report_plan or []))
  lines += [f"  {n}. {t}" for n, t in enumerate(todo, 1)]
  if train_model:
    lines.append("  (an estimate of the time follows once training has a rate)")
  return lines


def estimate_seconds(config, workdir: str, step_seconds: float, *, remaining_steps: int,
                     write_report: bool,
                     info: sources.DatasetInfo | None = None) -> dict[str, float]:
  """Seconds left per phase at ``step_seconds`` per training step (a rough model)."""
  info = info or sources.dataset_info(config)
  fwd = step_seconds * FORWARD_STEP_FRACTION / config.batch_size   # seconds per image forward
  crops = 10 if config.ten_crop_eval else 1
  out = {"training": remaining_steps * step_seconds,
         "final evaluation": info.num_eval * crops * fwd}
  if write_report:
    for kind in comparisons.pending(config, workdir):   # centre-crop evaluation
      c = comparisons.config_of(config, kind)
      out[f"comparison {comparisons.name_of(config, kind)}"] = (
          steps.total_steps(c, iterators.steps_per_epoch(c)) * step_seconds +
          out["final evaluation"] / crops)
    scanned = info.num_eval if config.report.max_examples < 0 else min(
        info.num_eval, config.report.max_examples)
    out["report"] = REPORT_STEPS * step_seconds + 2 * scanned * fwd
  return out


class _Estimate:
  """A training hook: after ``skip`` steps (compilation) and ``measure`` more, prints
  how long the whole job will take at the measured rate."""

  def __init__(self, config, workdir, write_report, info=None, skip=20, measure=80):
    self.config, self.workdir, self.write_report = config, workdir, write_report
    self.info = info
    self.skip, self.measure, self.first, self.t0 = skip, measure, None, None

  def __call__(self, step, state, writer):
    del state, writer
    if self.first is None:
      self.first = step
    if step == self.first + self.skip:
      self.t0 = time.time()
    elif self.t0 is not None and step == self.first + self.skip + self.measure:
      spe = iterators.steps_per_epoch(self.config)
      left = steps.total_steps(self.config, spe) - step
      est = estimate_seconds(self.config, self.workdir, (time.time() - self.t0) / self.measure,
                             remaining_steps=left, write_report=self.write_report,
                             info=self.info)
      parts = ", ".join(f"{k} {console.minutes(v)}" for k, v in est.items())
      done = time.strftime("%H:%M", time.localtime(time.time() + sum(est.values())))
      console.say(f"estimate: about {console.minutes(sum(est.values()))} left ({parts}); "
                  f"done around {done}")


def _read_or_empty(file: str) -> dict:
  return rundir.read_json(file) if os.path.exists(file) else {}


def summary_table(config, workdir: str, out: dict, phases: console.Phases,
                  started: float) -> str:
  """The table ``run`` prints at the end: results, time per phase, where things are."""
  rows = []
  results = out.get("results") or _read_or_empty(rundir.path(workdir, rundir.RESULTS))
  if results.get("top1_error") is not None:
    rows.append(("top-1 error", f"{results['top1_error']:.4f} (centre crop, "
                 f"{results.get('num_eval_examples', '?')} {config.dataset.eval_split} images)"))
    if results.get("top1_error_10crop") == results.get("top1_error_10crop"):   # not NaN
      rows.append(("top-1 error, 10 crops", f"{results['top1_error_10crop']:.4f}"))
    rows.append(("top-5 error", f"{results['top5_error']:.4f}"))
    if results.get("train_top1_error") is not None:
      rows.append(("training top-1 error", f"{results['train_top1_error']:.4f} (centre crop, "
                   f"{results.get('num_train_eval_examples', '?')} training images)"))
  for name, sec in phases.seconds.items():
    rows.append((name, console.minutes(sec)))
  for name, sec in out.get("report_sections", {}).items():
    rows.append((f"  {name}", console.minutes(sec)))
  rows.append(("total", console.minutes(time.time() - started)))
  if out.get("report"):
    rows.append(("report", out["report"]))
  rows.append(("records", os.path.join(os.path.abspath(workdir), "{results,timings}.json")))
  return console.table(rows, f"zfnet_jax: {config.model.name} on {config.dataset.name}")


def run(config: ml_collections.ConfigDict, workdir: str, *, train_model: bool = True,
        write_report: bool = True) -> dict:
  """Train (resuming) and/or write the report; returns {"results", "preempted", "report"}.

  Prints the plan first, an estimate of the time left once training has a rate, and a
  summary table at the end; writes <workdir>/timings.json (seconds per phase, machine,
  command, versions).  The total counts from ``$ZFNET_JAX_STARTED`` (seconds since the
  epoch) when set, so ``launch/quickstart.sh`` includes its install step.

  Training holds the workdir's lock (``runtime.workdir_lock``) to the end of the report;
  the report alone takes no lock (it reads checkpoints and replaces only ``report/``,
  built in a temporary folder).  SIGTERM at any point returns {"preempted": True}
  (nothing half-written is left; rerun to finish); a full disk raises ``rundir.DiskFull``.
  """
  started = float(os.environ.get("ZFNET_JAX_STARTED") or time.time())
  if train_model and config.get("pretrained"):
    raise ValueError(f"config.pretrained={config.pretrained!r} is for --mode=report and "
                     "--mode=visualize; training starts from scratch (or restore_path)")
  runtime.maybe_initialize_distributed(config)
  out = {}
  try:
    with runtime.sigterm_raises():
      return _run(config, workdir, train_model, write_report, out, started)
  except runtime.Preempted:
    console.say("SIGTERM: stopped before the report was written; rerun the same command to "
                "finish", warn=True)
    out["preempted"] = True
    return out
  except Exception as e:  # pylint: disable=broad-except
    if rundir.is_disk_full(e) and not isinstance(e, rundir.DiskFull):
      raise rundir.DiskFull(f"the disk is full (no space left on device writing "
                            f"{rundir.disk_full_path(e, workdir)}); the report was not written "
                            "(the run's checkpoints are kept); free space and rerun the same "
                            "command") from None
    raise


def _run(config, workdir: str, train_model: bool, write_report: bool, out: dict,
         started: float) -> dict:
  report_plan = None
  if write_report:
    report_plan = validate_report(config)  # before hours of training, not after
    d = config.analyses
    if d.enabled and d.diagnostics.enabled and d.diagnostics.train_comparison:
      for kind in comparisons.kinds(config):
        loop.validate(comparisons.config_of(config, kind))
  if train_model:
    loop.validate(config)   # before the lock creates the workdir
  info = sources.dataset_info(config)   # once, now that the config is known good
  for line in plan(config, workdir, train_model=train_model, write_report=write_report,
                   report_plan=report_plan, info=info):
    console.say(line)
  phases = console.Phases()
  with (runtime.workdir_lock(os.path.abspath(workdir)) if train_model else
        contextlib.nullcontext()):
    if train_model:
      # A resume with an incompatible config stops before the hooks write anything.
      checkpoints.check_resume(config, workdir, info)
      hooks = (training_hooks(config, workdir, info) +
               [_Estimate(config, workdir, write_report, info)])
      with phases("training and evaluation"):
        results = loop.train_and_evaluate(config, workdir, hooks=hooks)
      out["results"] = results
      if results.get("preempted"):
        out["preempted"] = True
        return out
    if write_report:
      if comparisons.pending(config, workdir):
        with phases("comparison models"):
          comparisons.train(config, workdir)
      with phases("report"):
        out["report"] = report.write_report(config, workdir, plan=report_plan)
      out["report_sections"] = _read_or_empty(
          os.path.join(os.path.dirname(out["report"]), rundir.TIMINGS))
  if jax.process_index() == 0:
    rundir.write_json(rundir.path(workdir, rundir.TIMINGS), {
        "phases": phases.seconds, "report_sections": out.get("report_sections", {}),
        "total_seconds": time.time() - started, "machine": rundir.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": sys.argv,
        "versions": rundir.versions()})
  console.say(summary_table(config, workdir, out, phases, started))
  return out


def run_mode(mode: str, config: ml_collections.ConfigDict, workdir: str | None, *,
             images: str | None = None, members: str | None = None,
             host: str = "127.0.0.1", port: int = 7860) -> int:
  """``main``'s modes (``--mode``); returns the exit code.  Bad input (config, data,
  paths) or a full disk: one line ``error: ...`` and 2; a non-finite loss: 1 (the
  last good checkpoint is kept); SIGTERM, in any mode: ``EXIT_PREEMPTED`` (nothing
  half-written is left)."""
  try:
    with runtime.sigterm_raises():
      return _run_mode(mode, config, workdir, images, members, host, port)
  except runtime.Preempted:
    console.say(f"SIGTERM: --mode={mode} stopped; nothing half-written is left; rerun the "
                "same command to finish", warn=True)
    return EXIT_PREEMPTED
  except (ValueError, OSError) as e:   # bad config, data or paths: no traceback
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  except FloatingPointError as e:      # non-finite loss: the last good checkpoint is kept
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 1


def _run_mode(mode, config, workdir, images, members, host, port) -> int:
  if mode == "summary":
    print(summary(config))
    return 0
  if workdir is None:
    raise ValueError("--workdir is required for --mode=train, report, visualize, ensemble "
                     "and explore")
  if mode == "ensemble":
    res = ensemble.evaluate_ensemble(config, (members or "").split(","), workdir)
    console.say(f"ensemble of {len(res['members'])} on {res['num_eval_examples']} images: top-1 "
                f"error {res['top1_error']:.4f}, top-5 error {res['top5_error']:.4f} -> "
                f"{os.path.join(workdir, ensemble.ENSEMBLE_RESULTS)}")
    return 0
  if mode == "explore":
    try:
      explore.require_gradio()
    except ImportError as e:
      raise ValueError(str(e)) from None
    explore.run(config, workdir, host=host, port=port)
    return 0
  if mode == "visualize":
    if not images:
      raise ValueError("--mode=visualize needs --images=PATH (a file, folder, glob or "
                       "comma-separated list)")
    batch = visualize.run(config, workdir, images)
    for page in batch.done.values():
      console.say(f"visualize: {page}")
    if batch.failed:
      raise ValueError(f"{len(batch.failed)} of {len(batch.failed) + len(batch.done)} inputs "
                       f"failed: {'; '.join(m for _, m in batch.failed)}")
    return 0
  out = run(config, workdir, train_model=mode == "train",
            write_report=config.report.enabled or mode == "report")
  return EXIT_PREEMPTED if out.get("preempted") else 0
