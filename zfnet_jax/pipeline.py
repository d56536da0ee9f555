"""The whole job behind ``main``: train, train the Fig. 6 comparison model, write the report.

The top floor: it may import everything, and nothing imports it but ``main``
(and notebooks or tests that want the whole job).  Every option is validated
once, before any long work: training's by ``train.validate``, the report's by
``report.validate``.
"""
from __future__ import annotations

import os

import jax
import ml_collections

from zfnet_jax import checkpoints, input_pipeline, models, report, rundir, sections, train
from zfnet_jax.analyses import evolution

EXIT_PREEMPTED = train.EXIT_PREEMPTED
TENSORBOARD_IMAGES = 64   # training examples behind the live Fig. 4 panels


def summary(config: ml_collections.ConfigDict) -> str:
  """The model's layer table (works without the dataset: then ImageNet's 1000 classes, RGB).

  The config is validated first (``train.validate``), as for training."""
  train.validate(config)
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
  has finished there; returns that workdir (None when the model has no counterpart)."""
  sub = report.comparison_workdir(config, workdir)
  if sub is not None and not os.path.exists(rundir.path(sub, rundir.RESULTS)):
    print(f"Training the comparison model {report.COUNTERPART[config.model.name]} in {sub}",
          flush=True)
    train.train_and_evaluate(report.comparison_config(config), sub)
  return sub


def run(config: ml_collections.ConfigDict, workdir: str, *, train_model: bool = True,
        write_report: bool = True) -> dict:
  """Train (resuming) and/or write the report; returns {"results", "preempted", "report"}."""
  train.maybe_initialize_distributed(config)
  plan = None
  if write_report:
    plan = validate_report(config)  # before hours of training, not after
    d = config.analyses
    if d.enabled and d.diagnostics.enabled and d.diagnostics.train_comparison and \
        report.comparison_workdir(config, workdir) is not None:
      train.validate(report.comparison_config(config))
  out = {}
  if train_model:
    # A resume with an incompatible config stops before the hooks write anything.
    checkpoints.check_resume(config, workdir, input_pipeline.dataset_info(config))
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
