"""The static HTML report of a run: <workdir>/report/index.html.

One page plus its files, openable from disk.  Everything on it comes from the
contributors of ``REGISTRY`` (``zfnet_jax.render.content`` states the protocol): the
run's results and curves, the Fig. 2 atlas of each layer (``atlas``), each
analysis (``analyses/*``) and the transfer tables (``analyses.transfer_tables``).  The report
validates every enabled contributor's options once, before any long work,
builds the ``Context`` once (model, variables, examples, pixel mean, class
names, checkpoints, comparison models), then collects the sections.

Safety: the page is rendered by ``zfnet_jax.render.pages`` (Jinja2 templates, autoescaped):
every piece of text from data, config or results is escaped; the page carries no
script and a Content-Security-Policy that forbids scripts and any load from the network.  The report is built in a
temporary directory next to the old one and swapped in at the end, so a failure
leaves the previous report as it was.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from zfnet_jax import console, deconv, rundir, xla
from zfnet_jax.analyses import (
  atlas,
  correspondence,
  diagnostics,
  evolution,
  invariance,
  occlusion,
  transfer_tables,
  walkthrough,
)
from zfnet_jax.data import iterators, sources
from zfnet_jax.nn import models, rules
from zfnet_jax.render import content, figures, pages
from zfnet_jax.report import comparisons
from zfnet_jax.training import train_state, weights

# ----------------------------------------------------------------------------
# The run's own sections: results, curves, first-layer filters.
# ----------------------------------------------------------------------------

class RunSections:
  """Contributor: results.json as a table, the training curves, the conv1 filters."""

  @staticmethod
  def validate(options, net, data) -> None:
    del options, net, data

  @staticmethod
  def sections(context: content.Context, options) -> list[content.Section]:
    del options
    s = content.Section("Results and training curves", "results")
    if isinstance(context.results, Mapping):
      rows = [[k, v if isinstance(v, str) else json.dumps(v)]
              for k, v in _flatten(context.results)]
      s.tables.append((["key", "value"], rows))
    elif context.results is not None:
      s.paragraphs.append(f"results.json could not be read: {context.results}")
    else:
      s.paragraphs.append("No results.json in the workdir (training has not finished).")
    if context.bad_metrics:
      s.paragraphs.append(f"{context.bad_metrics} unreadable line(s) of metrics.jsonl skipped.")
    if figures.training_curves(context.metrics, context.path("curves.png")):
      s.figures.append(("curves.png", "Loss (left) and top-1/top-5 error (right) against "
                        "epoch, training and evaluation."))
    elif not context.bad_metrics:
      s.paragraphs.append("No training metrics found (metrics.jsonl).")
    out = [s]
    kernel = context.net.param(context.variables, "conv1")
    if kernel is not None:
      kernel = np.asarray(jax.device_get(kernel))
      figures.save_png(figures.filter_grid(kernel), context.path("filters_conv1.png"))
      out.append(content.Section(
          "First-layer filters", "filters",
          figures=[("filters_conv1.png",
                    f"The {kernel.shape[-1]} conv1 filters ({kernel.shape[0]}x{kernel.shape[1]}"
                    f"x{kernel.shape[2]}), each scaled to its own range (Fig. 6 style).")]))
    return out


def _flatten(d, prefix=""):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _flatten(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


# ----------------------------------------------------------------------------
# The registry: every contributor, the config subtree it reads, when it runs.
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Entry:
  """A contributor of the report: ``options(config)`` is the only part of the
  config it sees; ``enabled(config)`` says whether it runs."""
  name: str
  contributor: content.Contributor   # validate(options, net, data), sections(context, options)
  options: Callable[[ml_collections.ConfigDict], Any]
  enabled: Callable[[ml_collections.ConfigDict], bool] = lambda config: True
  analysis: bool = False    # needs the analysed examples


def _analysis(name: str, module) -> Entry:
  return Entry(name, module, lambda c: c.analyses[name],
               lambda c: bool(c.analyses.enabled and c.analyses[name].enabled), analysis=True)


def _with(subtree: ml_collections.ConfigDict, **extra) -> ml_collections.ConfigDict:
  out = subtree.copy_and_resolve_references()
  with out.unlocked():
    out.update(extra)
  return out


REGISTRY: tuple[Entry, ...] = (
    Entry("run", RunSections, lambda c: None),
    Entry("atlas", atlas, lambda c: c.report),
    _analysis("walkthrough", walkthrough),
    _analysis("occlusion", occlusion),
    _analysis("invariance", invariance),
    Entry("correspondence", correspondence,
          lambda c: _with(c.analyses.correspondence, fill=float(c.analyses.occlusion.fill)),
          lambda c: bool(c.analyses.enabled and c.analyses.correspondence.enabled),
          analysis=True),
    _analysis("evolution", evolution),
    _analysis("diagnostics", diagnostics),
    Entry("transfer", transfer_tables,
          lambda c: _with(c.transfer, clip_radius=train_state.clip_radius(c)),
          lambda c: bool(c.transfer.in_report)),
)
CORE = ("run", "atlas")   # what ``render_report(extra_sections=False)`` shows


def validate(config, net, data: content.Data, registry: Sequence[Entry] = REGISTRY
             ) -> list[tuple[Entry, Any]]:
  """[(entry, its validated options)] of every enabled contributor, in page order.

  Raises ValueError naming the first bad option: call before any long work.
  """
  rules.get(config.report.rule, "report.rule")
  analyses = config.analyses
  for name in ("num_images", "batch_size"):
    if analyses[name] < 1:
      raise ValueError(f"analyses.{name} {analyses[name]} not allowed: >= 1")
  comparisons.kinds(config)
  return [(e, e.contributor.validate(e.options(config), net, data))
          for e in registry if e.enabled(config)]


# ----------------------------------------------------------------------------
# Entry points.
# ----------------------------------------------------------------------------

def write_report(config, workdir: str, *, registry: Sequence[Entry] = REGISTRY,
                 plan: list | None = None) -> str:
  """Rebuild <workdir>/report from the workdir's latest checkpoint (or the shipped
  weights ``config.pretrained`` names).

  The model, parameters and pixel mean come from the run (``weights.load_model``:
  the newest checkpoint that restores; a damaged newer step is skipped, and the page
  and console say which step was used and why);
  the dataset and report options from ``config``.  ``plan``: the result of
  ``validate`` when the caller has validated already.  Returns the path of index.html.
  """
  rules.get(config.report.rule, "report.rule")   # the cheapest check, before any file is read
  if config.get("pretrained"):    # shipped weights: the workdir only receives the report
    os.makedirs(workdir, exist_ok=True)
  elif not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir!r} does not exist")
  loaded = weights.load_model(config, workdir)
  source = loaded.source
  console.say(f"report: {source}")
  imported = weights.is_imported(config)
  if imported or (config.get("pretrained") and
                  not os.path.exists(rundir.path(workdir, rundir.MEAN))):
    np.save(rundir.path(workdir, rundir.MEAN), loaded.full_pixel_mean)   # the model's own
  info = sources.dataset_info(config)
  class_names, relabel = info.class_names, None
  if imported:     # predictions are named by the model's classes (ImageNet's)
    class_names = loaded.class_names
    if info.num_classes != len(class_names):   # a folder's labels are not the model's classes
      relabel = top_class_fn(loaded.model, loaded.variables)
      console.say(f"report: the {info.num_classes} class(es) of {config.dataset.name!r} are not "
                  f"the model's {len(class_names)}: images are labelled with the model's top "
                  "class")
  split = config.report.split or config.dataset.eval_split
  max_examples = config.report.max_examples
  total = info.num_eval if split == config.dataset.eval_split else None
  if total is not None and max_examples > 0:
    total = min(total, max_examples)
  batches = lambda: iterators.create_eval_iterator(
      config, workdir, split=split, batch_size=config.report.batch_size,
      max_examples=max_examples)
  return render_report(config, workdir, loaded.model, loaded.variables, batches,
                       loaded.pixel_mean,
                       class_names=class_names, total=total, registry=registry,
                       plan=plan, source=source, relabel=relabel)


def top_class_fn(model, variables) -> Callable[[np.ndarray], np.ndarray]:
  """images (N, S, S, C) -> int32 (N,): the model's most probable class of each."""
  fn = xla.jit(lambda v, x: jnp.argmax(model.apply(v, x), -1).astype(jnp.int32))
  return lambda images: np.asarray(fn(variables, jnp.asarray(images)))


def render_report(config, workdir: str, model, variables,
                  batches: Iterable[Mapping[str, np.ndarray]] | Callable[[], Iterable],
                  pixel_mean: np.ndarray, *, class_names: Sequence[str] | None = None,
                  total: int | None = None, progress: bool = True, extra_sections: bool = True,
                  registry: Sequence[Entry] = REGISTRY, plan: list | None = None,
                  source: str = "", relabel: Callable | None = None) -> str:
  """Write <workdir>/report from a model, its variables and a split's batches.

  batches: as ``iterators.create_eval_iterator`` yields them (or a
  function returning such an iterator); pixel_mean float32 (S, S, C): image +
  pixel_mean = display pixels in 0..255.  ``extra_sections=False``: only the
  run's sections and the atlas (``CORE``).  ``source``: where the variables come from
  (a line at the top of the page).  ``relabel``: images (N, S, S, C) -> labels (N,)
  replacing the data's labels (an unlabelled folder: the model's top class).
  Returns the path of index.html.
  """
  net = deconv.as_network(model)
  if relabel is not None:
    source = (source + " Labels: the model's top class.").strip()
    raw = batches if callable(batches) else (lambda: batches)
    batches = lambda: ({**b, "label": relabel(b["image"])} for b in raw())
  pixel_mean = np.asarray(pixel_mean, np.float32)
  size, channels = pixel_mean.shape[0], pixel_mean.shape[-1]
  data = content.Data(config.dataset.name, size, config.dataset.resize_size, channels)
  if not extra_sections:
    registry = [e for e in registry if e.name in CORE]
  if plan is None:
    plan = validate(config, net, data, registry)        # every option, before any work
  final = os.path.join(workdir, rundir.REPORT)
  rundir.clean_leftovers(workdir, locked=False)   # report folders of writers that are gone
  tmp = tempfile.mkdtemp(prefix=rundir.report_tmp_prefix(), dir=workdir)
  try:
    t0 = time.time()
    context = build_context(config, workdir, net, variables, batches, pixel_mean, data, tmp,
                            class_names=class_names, total=total, progress=progress,
                            analysed=any(e.analysis for e, _ in plan), relabel=relabel)
    page, seconds = [], {}
    with iterators.single_thread_blas():
      for entry, options in plan:
        t1 = time.time()
        page += entry.contributor.sections(context, options)
        if entry.name == "run":
          page.append(_overview(config, model, size, channels, class_names))
        seconds[entry.name] = time.time() - t1
        if progress:
          console.say(f"report: {entry.name} done in {console.minutes(seconds[entry.name])}")
    rundir.write_json(os.path.join(tmp, rundir.TIMINGS), seconds)
    title = f"zfnet_jax report: {config.model.name} on {config.dataset.name}"
    note = (f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} in {time.time() - t0:.0f} s "
            f"from {os.path.abspath(workdir)}." + (f" {source}" if source else ""))
    with open(os.path.join(tmp, "index.html"), "w", encoding="utf-8") as f:
      f.write(pages.render(title, page, note))
    rundir.replace_dir(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return os.path.join(final, "index.html")


def build_context(config, workdir: str, net, variables, batches, pixel_mean: np.ndarray,
                  data: content.Data, out_dir: str, *, class_names=None, total=None,
                  progress: bool = True, analysed: bool = True,
                  relabel: Callable | None = None) -> content.Context:
  """The one Context of a report: the analysed examples are loaded only when an
  analysis runs; checkpoints and comparison models are loaded when asked for.
  ``relabel``: as in ``render_report``."""
  a = config.analyses
  default_split = a.split or config.dataset.eval_split

  def examples(ids=None, split=None, num=-1):
    images, labels, got = iterators.load_examples(
        config, workdir, split=split or default_split, ids=ids, num=num)
    return images, (labels if relabel is None else relabel(images)), got
  if analysed:
    ids = list(a.image_ids)
    images, labels, example_ids = examples(ids=ids or None, num=a.num_images)
  else:
    images = np.zeros((0, data.input_size, data.input_size, data.channels), np.float32)
    labels = example_ids = np.zeros((0,), np.int64)
  try:
    evolution_ckpts = rundir.evolution_checkpoints(workdir)
  except FileNotFoundError:
    evolution_ckpts = []
  loader = lambda step: (lambda: weights.load_trained(workdir, step)[1])
  results_path = rundir.path(workdir, rundir.RESULTS)
  results = None
  if os.path.exists(results_path):
    try:
      results = rundir.read_json(results_path)
    except (ValueError, UnicodeDecodeError) as e:
      results = str(e)
  metrics, bad = rundir.read_metrics(rundir.path(workdir, rundir.METRICS))
  return content.Context(
      net=net, variables=variables, images=images, labels=labels, ids=example_ids,
      pixel_mean=pixel_mean, class_names=tuple(class_names or ()), out_dir=out_dir, data=data,
      rule=config.report.rule, seed=config.seed, batch_size=a.batch_size,
      split_batches=(None if batches is None else
                     batches if callable(batches) else (lambda: batches)),
      split_name=config.report.split or config.dataset.eval_split, split_total=total,
      examples=examples,
      train_batches=lambda n: iterators.create_eval_iterator(
          config, workdir, split=config.dataset.train_split,
          batch_size=config.report.batch_size, max_examples=n),
      checkpoints=[(epoch, loader(step)) for epoch, step in evolution_ckpts],
      comparisons=comparisons.load(config, workdir) if _diagnostics_on(config) else {},
      results=results, metrics=metrics, bad_metrics=bad, progress=progress)


def _diagnostics_on(config) -> bool:
  return bool(config.analyses.enabled and config.analyses.diagnostics.enabled)


def _overview(config, model, size, channels, class_names) -> content.Section:
  s = content.Section("Model and configuration", "overview")
  s.paragraphs.append(f"{type(model).__name__} with input {size}x{size}x{channels}; "
                      f"dataset {config.dataset.name}.")
  if isinstance(model, models.PaperNet):
    s.preformatted.append(models.summary(model, size, channels))
  if class_names is not None:
    s.tables.append((["class", "name"], [[str(i), str(n)] for i, n in enumerate(class_names)]))
  s.preformatted.append(config.to_json_best_effort(indent=2, sort_keys=True))
  return s
