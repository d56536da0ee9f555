"""The comparison runs of Fig. 6, in one place: which apply to a run (``kinds``), their
configs (``config_of``) and workdirs (``workdir_of``), training them (``train``, by the
job before the report) and loading them (``load``, for the diagnostics section).

The kinds: the counterpart (AlexNet <-> ZFNet with this run's recipe, Fig. 6 (b)-(e))
and this run's model without feature scale clipping (Fig. 6 (a)).
"""
from __future__ import annotations

import copy
import os
from typing import Any

import ml_collections

from zfnet_jax import console, deconv, rundir
from zfnet_jax.nn import models
from zfnet_jax.training import loop, runtime, weights

COUNTERPART = {"ZFNet": "AlexNet", "AlexNet": "ZFNet",
               "ZFNetLowRes": "AlexNetLowRes", "AlexNetLowRes": "ZFNetLowRes"}
# The kinds of comparison run: the counterpart (AlexNet <-> ZFNet, Fig. 6 (b)-(e)) and
# this run's model without feature scale clipping (Fig. 6 (a)).
COMPARISONS = ("counterpart", "no_clip")


def kinds(config) -> list[str]:
  """The kinds of ``analyses.diagnostics.comparisons`` that apply to this run: the
  counterpart when its model has one, no_clip when this run trains one of our models
  with clipping.  ValueError for an unknown kind."""
  kinds = list(config.analyses.diagnostics.comparisons)
  bad = [k for k in kinds if k not in COMPARISONS]
  if bad:
    raise ValueError(f"analyses.diagnostics.comparisons has {bad}; allowed: "
                     f"{', '.join(COMPARISONS)}")
  return [k for k in COMPARISONS if k in kinds and (
      config.model.name in COUNTERPART if k == "counterpart" else
      config.clip_filters and config.model.name in models.MODELS)]


def workdir_of(config, workdir: str, kind: str = "counterpart") -> str | None:
  """Where a comparison run is (or will be) trained: the counterpart in
  ``analyses.diagnostics.comparison_workdir`` or <workdir>/comparison_<other model>,
  no_clip in <workdir>/comparison_<model>_noclip; None if the run has no such comparison."""
  if kind not in kinds(config):
    return None
  if kind == "no_clip":
    return os.path.join(workdir, f"comparison_{config.model.name}_noclip")
  return config.analyses.diagnostics.comparison_workdir or os.path.join(
      workdir, f"comparison_{COUNTERPART[config.model.name]}")


def config_of(config, kind: str = "counterpart") -> ml_collections.ConfigDict:
  """A comparison run with this run's widths and recipe: the counterpart (AlexNet <->
  ZFNet, with its own first-layer geometry) or this model with ``clip_filters=False``; epochs
  ``analyses.diagnostics.comparison_epochs`` (-1 = this run's); no evolution
  checkpoints, centre-crop evaluation only (the report compares its final weights); no
  report."""
  c = copy.deepcopy(config)
  with c.unlocked():
    if kind == "counterpart":
      c.model.name = COUNTERPART[config.model.name]
      for key in ("conv1_kernel", "conv1_stride", "conv1_pad"):
        c.model[key] = None       # the counterpart's own first layer (ZFNet 7/2, AlexNet 11/4)
    else:
      c.clip_filters = False
    if config.analyses.diagnostics.comparison_epochs > 0:
      c.num_epochs = float(config.analyses.diagnostics.comparison_epochs)
      c.num_train_steps = -1
    c.evolution_epochs = ()     # the report compares its final weights only
    c.ten_crop_eval = False
    c.report.enabled = False
    c.analyses.enabled = False
    c.analyses.diagnostics.train_comparison = False
  return c


def name_of(config, kind: str) -> str:
  """How the report names a comparison run."""
  return (COUNTERPART[config.model.name] if kind == "counterpart"
          else f"{config.model.name} without clipping")


def load(config, workdir: str) -> dict[str, tuple[Any, Any, str]]:
  """{name: (network, variables, note)} of every trained comparison run, and of this run
  at a comparison's epoch when that evolution checkpoint exists (compared at equal epochs)."""
  out = {}
  for kind in kinds(config):
    sub = workdir_of(config, workdir, kind)
    if not os.path.exists(rundir.path(sub, rundir.RESULTS)):
      continue
    other, other_vars, other_config = weights.load_trained(sub)
    epochs = float(other_config.num_epochs)
    if epochs < float(config.num_epochs):
      try:
        kept = dict(rundir.evolution_checkpoints(workdir))
      except FileNotFoundError:
        kept = {}
      near = min(kept, key=lambda e: abs(e - epochs), default=None)
      name = f"{config.model.name} (epoch {near:g})"
      if near is not None and abs(near - epochs) <= 0.05 * epochs + 1e-3 and name not in out:
        model, variables, _ = weights.load_trained(workdir, kept[near])
        out[name] = (deconv.network(model), variables,
                     f"{config.model.name} is also shown at its epoch-{near:g} evolution "
                     "checkpoint, as long as the comparison runs were trained.")
    what = ("with this run's recipe" if kind == "counterpart" else
            "with this run's recipe but without feature scale clipping (paper Fig. 6 (a))")
    out[name_of(config, kind)] = (
        deconv.network(other), other_vars,
        f"{name_of(config, kind)}: trained in {sub} for {epochs:g} epochs {what}.")
  return out


def pending(config, workdir: str) -> list[str]:
  """The kinds the job has yet to train (none for shipped weights or without the
  diagnostics' ``train_comparison``)."""
  d = config.analyses
  if not (d.enabled and d.diagnostics.enabled and d.diagnostics.train_comparison and
          not config.get("pretrained")):
    return []
  return [k for k in kinds(config)
          if not os.path.exists(rundir.path(workdir_of(config, workdir, k), rundir.RESULTS))]


def train(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """Train each comparison run (``kinds``) in its sub-workdir unless it has finished
  there; returns those workdirs.  SIGTERM while one trains raises ``runtime.Preempted``
  (its checkpoint saved)."""
  subs = []
  for kind in kinds(config):
    sub = workdir_of(config, workdir, kind)
    subs.append(sub)
    if not os.path.exists(rundir.path(sub, rundir.RESULTS)):
      console.say(f"training the comparison model {name_of(config, kind)} in {sub}")
      if loop.train_and_evaluate(config_of(config, kind), sub).get("preempted"):
        raise runtime.Preempted()
  return subs
