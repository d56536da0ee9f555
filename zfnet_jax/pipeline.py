"""The whole job behind ``main``: train, train the Fig. 6 comparison model, write the report.

The top floor: it may import everything, and nothing imports it but ``main``
(and notebooks or tests that want the whole job).  Every option is validated
once, before any long work: training's by ``train.validate``, the report's by
``report.validate``.
"""
from __future__ import annotations

import contextlib
import os

import jax
import ml_collections

from zfnet_jax import input_pipeline, models, report, rundir, sections, train
from zfnet_jax.analyses import evolution

EXIT_PREEMPTED = train.EXIT_PREEMPTED
TENSORBOARD_IMAGES = 64   # training examples behind the live Fig. 4 panels


def summary(config: ml_collections.ConfigDict) -> str:
  """The model's layer table (works without the dataset: then ImageNet's 1000 classes, RGB)."""
  try:
    info = input_pipeline.dataset_info(config)
    num_classes, channels, note = info.num_classes, info.channels, ""
  except (ValueError, OSError):  # data not prepared here: the paper's ImageNet head
    num_classes, channels = 1000, 3
    note = f"({config.dataset.name} is not available: 1000 classes, 3 channels)\n"
  return note + models.summary(models.from_config(config.model, num_classes),
                               config.dataset.crop_size, channels)


def training_hooks(config: ml_collections.ConfigDict, workdir: str) -> list[train.Hook]:
  """The hooks ``main`` gives training: Fig. 4 panels in TensorBoard every
  ``analyses.evolution.tensorboard_every_steps`` steps (none when 0), process 0 only."""
  evolution_config = config.analyses.evolution
  if evolution_config.tensorboard_every_steps <= 0 or jax.process_index() != 0:
    return []
  info = input_pipeline.dataset_info(config)
  model = models.from_config(config.model, info.num_classes)
  images, _, _ = input_pipeline.load_examples(config, workdir, split=config.dataset.train_split,
                                              num=TENSORBOARD_IMAGES)
  hook = evolution.tensorboard_hook(
      model, images, layers=tuple(evolution_config.layers),
      maps=tuple(int(m) for m in evolution_config.tensorboard_maps), rule=config.report.rule,
      every=evolution_config.tensorboard_every_steps)
  return [hook] if hook is not None else []


def validate_report(config: ml_collections.ConfigDict) -> list:
  """The report's plan (``report.validate``) for the model ``config`` describes."""
  models.validate(config.model)
  input_pipeline.validate(config.dataset)
  info = input_pipeline.dataset_info(config)
  model = models.from_config(config.model, info.num_classes)
  data = sections.Data(config.dataset.name, config.dataset.crop_size,
                       config.dataset.resize_size, info.channels)
  return report.validate(config, model, data)


def train_comparison(config: ml_collections.ConfigDict, workdir: str) -> str | None:
  """Train the counterpart of Fig. 6 (AlexNet <-> ZFNet) in its sub-workdir unless it
  has finished there; returns that workdir (None when the model has no counterpart).
  SIGTERM while it trains raises ``train.Preempted`` (its checkpoint saved)."""
  sub = report.comparison_workdir(config, workdir)
  if sub is not None and not os.path.exists(rundir.path(sub, rundir.RESULTS)):
    print(f"Training the comparison model {report.COUNTERPART[config.model.name]} in {sub}",
          flush=True)
    if train.train_and_evaluate(report.comparison_config(config), sub).get("preempted"):
      raise train.Preempted()
  return sub


def run(config: ml_collections.ConfigDict, workdir: str, *, train_model: bool = True,
        write_report: bool = True) -> dict:
  """Train (resuming) and/or write the report; returns {"results", "preempted", "report"}.

  Training holds the workdir's lock (``train.workdir_lock``) to the end of the report;
  the report alone takes no lock (it reads checkpoints and replaces only ``report/``,
  built in a temporary folder).  SIGTERM at any point returns {"preempted": True}
  (nothing half-written is left; rerun to finish); a full disk raises ``rundir.DiskFull``.
  """
  train.maybe_initialize_distributed(config)
  out = {}
  try:
    with train.sigterm_raises():
      return _run(config, workdir, train_model, write_report, out)
  except train.Preempted:
    if jax.process_index() == 0:
      print("SIGTERM: stopped before the report was written; rerun the same command to "
            "finish", flush=True)
    out["preempted"] = True
    return out
  except Exception as e:  # pylint: disable=broad-except
    if rundir.is_disk_full(e) and not isinstance(e, rundir.DiskFull):
      raise rundir.DiskFull(f"the disk is full (no space left on device writing "
                            f"{rundir.disk_full_path(e, workdir)}); the report was not written "
                            "(the run's checkpoints are kept); free space and rerun the same "
                            "command") from None
    raise


def _run(config, workdir: str, train_model: bool, write_report: bool, out: dict) -> dict:
  plan = None
  if write_report:
    plan = validate_report(config)  # before hours of training, not after
    d = config.analyses
    if d.enabled and d.diagnostics.enabled and d.diagnostics.train_comparison and \
        report.comparison_workdir(config, workdir) is not None:
      train.validate(report.comparison_config(config))
  if train_model:
    train.validate(config)   # before the lock creates the workdir
  with (train.workdir_lock(os.path.abspath(workdir)) if train_model else
        contextlib.nullcontext()):
    if train_model:
      results = train.train_and_evaluate(config, workdir,
                                         hooks=training_hooks(config, workdir))
      out["results"] = results
      if results.get("preempted"):
        out["preempted"] = True
        return out
    if write_report:
      d = config.analyses
      if d.enabled and d.diagnostics.enabled and d.diagnostics.train_comparison:
        train_comparison(config, workdir)
      out["report"] = report.write_report(config, workdir, plan=plan)
  return out
