"""The paper's analyses (Sec. 4, Figs. 4-7, Table 1) for any trained model.

* ``occlusion``: occlusion sensitivity (Fig. 7).
* ``invariance``: feature distances and class probability under translation,
  scale and rotation (Fig. 5).
* ``correspondence``: Delta_l for occluded object parts vs random boxes (Table 1).
* ``evolution``: strongest activations projected at each evolution checkpoint
  (Fig. 4), and TensorBoard panels during training.
* ``diagnostics``: first-layer filters, dead filters, radial spectra and layer-2
  aliasing, ZFNet vs AlexNet (Fig. 6).

Settings: ``config.analyses`` (zfnet_jax/configs.py).  ``report_sections`` runs
every enabled analysis, writes arrays, tables and figures to
<workdir>/analyses/ and returns report sections.
"""
from __future__ import annotations

import os
import time

from absl import logging

from zfnet_jax.analyses import common, correspondence, diagnostics, evolution, invariance, occlusion

ANALYSES = ("occlusion", "invariance", "correspondence", "evolution", "diagnostics")
_MODULES = {"occlusion": occlusion, "invariance": invariance, "correspondence": correspondence,
            "evolution": evolution, "diagnostics": diagnostics}


def validate(config, model) -> None:
  """Check every enabled analysis's settings against the model before any long work."""
  a = config.analyses
  size = config.dataset.crop_size
  if a.num_images < 1:
    raise ValueError(f"analyses.num_images {a.num_images} not allowed: >= 1")
  if a.batch_size < 1:
    raise ValueError(f"analyses.batch_size {a.batch_size} not allowed: >= 1")
  if a.occlusion.enabled:
    occlusion.settings(config, model, size)
  if a.invariance.enabled:
    invariance.amounts(config, size)
    for layer in a.invariance.layers:
      common.check_layer(model, size, layer, "invariance layer")
  if a.correspondence.enabled:
    for layer in a.correspondence.layers:
      common.check_layer(model, size, layer, "correspondence layer")
    if a.correspondence.repeats < 1:
      raise ValueError(f"correspondence.repeats {a.correspondence.repeats} not allowed: >= 1")
    if correspondence.box_file_dataset(a.correspondence.boxes) in (None, config.dataset.name):
      correspondence.load_boxes(a.correspondence.boxes, size, config.dataset.resize_size)
  if a.evolution.enabled:
    evolution.check(model, size, list(a.evolution.layers), list(a.evolution.maps))
    if a.evolution.max_examples < 1:
      raise ValueError(f"evolution.max_examples {a.evolution.max_examples} not allowed: >= 1")
  if a.evolution.tensorboard_every_steps > 0:
    evolution.check(model, size, list(a.evolution.layers), list(a.evolution.tensorboard_maps))
  if a.diagnostics.enabled:
    d = a.diagnostics
    diagnostics.dead_filters(diagnostics.np.ones((1, 1, 1, 1)), d.dead_threshold)
    diagnostics.high_freq_fraction(diagnostics.np.zeros((1, 2, 2, 1)), d.high_freq)
    if d.fft_size < 0:
      raise ValueError(f"diagnostics.fft_size {d.fft_size} not allowed: >= 0")
    if "conv1" not in common.layer_names(model, size):
      raise ValueError("diagnostics need a conv1 layer")


def report_sections(config, workdir: str, model, variables, *, out_dir: str | None = None,
                    only: tuple[str, ...] | None = None):
  """Run the enabled analyses; returns a list of ``report.Section``.

  out_dir: where arrays, tables and figures go (default <workdir>/analyses);
  figure paths in the sections are relative to ``workdir`` (absolute if
  ``out_dir`` lies outside it).  only: a subset of ``ANALYSES`` to run.
  """
  if not config.analyses.enabled:
    return []
  bad = [n for n in (only or ()) if n not in ANALYSES]
  if bad:
    raise ValueError(f"unknown analyses {bad}; allowed: {', '.join(ANALYSES)}")
  validate(config, model)
  out_dir = out_dir or os.path.join(workdir, "analyses")
  os.makedirs(out_dir, exist_ok=True)
  sections = []
  for name in ANALYSES:
    if (only and name not in only) or not config.analyses[name].enabled:
      continue
    t0 = time.time()
    logging.info("analysis %s ...", name)
    sections.append(_MODULES[name].section(config, workdir, model, variables, out_dir))
    logging.info("analysis %s done in %.1f s", name, time.time() - t0)
  return sections
