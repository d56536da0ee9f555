"""Transfer to other datasets (Sec. 5.2) and per-layer linear probes (Table 7).


Transfer: layers 1-7 of a trained model are frozen and a new softmax is
trained on their fc7 output (with frozen layers this is exactly a multinomial
logistic regression on fc7 features); the control trains the same
architecture from a fresh initialisation on the same images.

Probes: the output of each layer l = 1..7 (norm1, norm2, conv3, conv4, pool5,
fc6, fc7; pool1/pool2 where contrast normalisation is off) is reduced to a
fixed size by max-pooling over a g x g grid of regions (``pool_grid``; bins
[floor(i n / g), ceil((i + 1) n / g)) as adaptive pooling; maps smaller than g
keep their size), standardised, and classified by scikit-learn's LinearSVC
and LogisticRegression (softmax).

Single-label datasets: ``folds`` random splits with ``n`` training images per
class and at most ``test_per_class`` of the rest for testing; the score is the
mean per-class accuracy (as the paper, Caltech-101 and Caltech-256, Tables 4
and 5). Multi-label (VOC 2012): one-vs-rest classifiers on TFDS train, average
precision of each class on validation (Table 6) and their mean.
The tables (``transfer_tables``) go to <workdir>/transfer/ (or the report's transfer/): probes.csv/.md,
transfer.csv/.md, transfer.json (every fold's score; per-class AP), for VOC
per_class_ap.csv/.md (Table 6), for single-label sets curve.png (Fig. 9: score
against training images per class).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from zfnet_jax import console, deconv, xla
from zfnet_jax.data.targets import DATASETS, TargetData
from zfnet_jax.nn import geometry
from zfnet_jax.render import figures
from zfnet_jax.training.scratch import scratch_outputs, train_scratch

LAYER_OUTPUTS = {1: ("norm1", "pool1"), 2: ("norm2", "pool2"), 3: ("conv3",), 4: ("conv4",),
                 5: ("pool5",), 6: ("fc6",), 7: ("fc7",)}


CLASSIFIERS = ("svm", "softmax")


# Paper Table 7 (% mean per-class accuracy): Caltech-101 at 30 images per class, and
# Caltech-256 at 60 (shown for caltech256; Caltech-101's for every other dataset).

PAPER_TABLE7 = {"svm": {1: 44.8, 2: 66.2, 3: 72.3, 4: 76.6, 5: 86.2, 7: 85.5},
                "softmax": {5: 82.9, 7: 85.4}}


PAPER_TABLE7_256 = {"svm": {1: 24.6, 2: 39.6, 3: 46.0, 4: 51.3, 5: 65.6, 7: 71.7},
                    "softmax": {5: 65.7, 7: 72.6}}


# Paper Sec. 5.2: training images per class -> % mean per-class accuracy, ImageNet-pretrained
# (layers 1-7 frozen + softmax) and the same net trained from scratch ("non-pretrained").

PAPER_TRANSFER = {
    "caltech101": {"pretrained": {15: 83.8, 30: 86.5}, "scratch": {15: 22.8, 30: 46.5}},  # Table 4
    "caltech256": {"pretrained": {15: 65.7, 30: 70.6, 45: 72.7, 60: 74.2},                 # Table 5
                   "scratch": {15: 9.0, 30: 22.5, 45: 31.2, 60: 38.8}},
}


# Paper Table 6: PASCAL VOC 2012 test, AP % per class (TFDS voc/2012 label order); mean 79.0.

PAPER_VOC_AP = (96.0, 77.1, 88.4, 85.5, 55.8, 85.8, 78.6, 91.2, 65.0, 74.4,
                67.7, 87.8, 86.0, 85.1, 90.9, 52.2, 83.6, 61.1, 91.8, 76.1)


def class_folds(labels: np.ndarray, n_train: int, n_test: int, folds: int,
                seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per fold: n_train random images of every class for training, up to n_test of the rest."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(folds):
    train, test = [], []
    for c in np.unique(labels):
      idx = rng.permutation(np.flatnonzero(labels == c))
      if len(idx) <= n_train:
        raise ValueError(f"class {c} has {len(idx)} images; {n_train} per class for training "
                         f"leaves none to test")
      train.append(idx[:n_train])
      test.append(idx[n_train:n_train + n_test])
    out.append((np.sort(np.concatenate(train)), np.sort(np.concatenate(test))))
  return out


# -- features ------------------------------------------------------------------

def probe_layers(net, input_size: int, layers: Sequence[int]) -> dict[int, str]:
  """Layer number -> name of the activation used as its output: the last of the layer's
  block in the network's order (ZFNet's norm1 after pool1, AlexNet's pool1 after norm1;
  removed layers left out)."""
  order = geometry.layer_names(deconv.as_network(net), input_size)
  bad = [l for l in layers if l not in LAYER_OUTPUTS]
  if bad:
    raise ValueError(f"unknown layers {bad}; allowed: {sorted(LAYER_OUTPUTS)}")
  out = {}
  for l in layers:
    names = [n for n in LAYER_OUTPUTS[l] if n in order]
    if names:
      out[l] = max(names, key=order.index)
  return out


def grid_max_pool(x: jax.Array, grid: int) -> jax.Array:
  """(N, H, W, C) -> (N, g * g * C): max over a g x g grid of regions (g = min(grid, H, W))."""
  n, h, w, c = x.shape
  gh, gw = min(grid, h), min(grid, w)
  cells = []
  for i in range(gh):
    for j in range(gw):
      r0, r1 = (i * h) // gh, -(-((i + 1) * h) // gh)
      c0, c1 = (j * w) // gw, -(-((j + 1) * w) // gw)
      cells.append(x[:, r0:r1, c0:c1, :].max(axis=(1, 2)))
  return jnp.stack(cells, axis=1).reshape(n, -1)


def extract_features(net, variables, images: np.ndarray, mean: np.ndarray,
                     names: dict[int, str], pool_grid: int, batch_size: int = 128
                     ) -> dict[int, np.ndarray]:
  """Pixel images (N, S, S, C) -> {layer: (N, D) float32}; conv maps grid-max-pooled."""
  net = deconv.as_network(net)

  @xla.jit
  def run(x):
    feats = net.features(variables, x - mean)
    return {l: grid_max_pool(feats[n], pool_grid) if feats[n].ndim == 4 else feats[n]
            for l, n in names.items()}

  outs = {l: [] for l in names}
  for i in console.progress(range(0, len(images), batch_size), desc="features", unit="batch"):
    x = np.asarray(images[i:i + batch_size], np.float32)
    pad = batch_size - len(x) if len(images) > batch_size else 0
    y = run(np.concatenate([x, np.zeros((pad, *x.shape[1:]), np.float32)]) if pad else x)
    for l in names:
      outs[l].append(np.asarray(y[l], np.float32)[:len(x)])
  return {l: np.concatenate(v) for l, v in outs.items()}


# -- classifiers and scores ----------------------------------------------------

def mean_class_accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
  """Mean over classes of the fraction of that class's examples predicted right."""
  return float(np.mean([np.mean(predictions[labels == c] == c) for c in np.unique(labels)]))


def average_precisions(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
  """(N, K) {0,1} labels and scores -> (K,) average precision of each class (scikit-learn's,
  the mean over positives of the precision at their rank); NaN for a class without positives."""
  return np.array([average_precision_score(labels[:, k], scores[:, k]) if labels[:, k].any()
                   else np.nan for k in range(labels.shape[1])])


def mean_average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
  """(N, K) {0,1} labels and scores -> mean over classes (with positives) of the AP."""
  return float(np.nanmean(average_precisions(labels, scores)))


def fit_predict(kind: str, x_train, y_train, x_test, c: float, multilabel: bool) -> np.ndarray:
  """Standardise, fit a linear classifier; test outputs: predicted labels (N,), or for
  multi-label data one-vs-rest decision values (N, K)."""
  if kind == "svm":
    clf = LinearSVC(C=c, max_iter=5000)
  elif kind == "softmax":
    clf = LogisticRegression(C=c, max_iter=2000)
  else:
    raise ValueError(f"unknown classifier {kind!r}; allowed: {', '.join(CLASSIFIERS)}")
  if multilabel:
    clf = OneVsRestClassifier(clf)
  pipe = make_pipeline(StandardScaler(), clf).fit(x_train, y_train)
  return pipe.decision_function(x_test) if multilabel else pipe.predict(x_test)


def score(labels: np.ndarray, outputs: np.ndarray, multilabel: bool) -> float:
  """Mean AP of (N, K) scores, or mean per-class accuracy of (N,) predictions."""
  if multilabel:
    return mean_average_precision(labels, outputs)
  return mean_class_accuracy(labels, outputs)


def fit_score(kind: str, x_train, y_train, x_test, y_test, c: float, multilabel: bool) -> float:
  """Standardise, fit a linear classifier, score on the test set (accuracy or mAP)."""
  return score(y_test, fit_predict(kind, x_train, y_train, x_test, c, multilabel), multilabel)


def splits_for(data: TargetData, settings) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
  """Setting label ("15", "30", or "all") -> list of (train, test) index pairs."""
  if data.split is not None:
    return {"all": [data.split]}
  return {str(n): class_folds(data.labels, n, settings.test_per_class, settings.folds, seed=1)
          for n in settings.train_per_class}


# -- tables --------------------------------------------------------------------

def _check(settings):
  if settings.dataset not in DATASETS:
    raise ValueError(f"unknown transfer dataset {settings.dataset!r}; allowed: "
                     f"{', '.join(DATASETS)}")
  bad = [k for k in settings.classifiers if k not in CLASSIFIERS]
  if bad:
    raise ValueError(f"unknown classifiers {bad}; allowed: {', '.join(CLASSIFIERS)}")
  if settings.pool_grid < 1:
    raise ValueError(f"transfer.pool_grid must be >= 1, got {settings.pool_grid}")


def _fmt(scores: Sequence[float]) -> str:
  s = 100 * np.asarray(scores)
  return f"{s.mean():.1f} ± {s.std():.1f}" if len(s) > 1 else f"{s.mean():.1f}"


def probes(net, variables, mean, data: TargetData, settings, input_size: int
           ) -> tuple[list[str], list[list[str]]]:
  """The Table 7-style table: one row per layer, one column per (setting, classifier)."""
  _check(settings)
  names = probe_layers(net, input_size, settings.layers)
  feats = extract_features(net, variables, data.images, mean, names, settings.pool_grid,
                           settings.batch_size)
  splits = splits_for(data, settings)
  metric = "mAP" if data.multilabel else "mean class acc"
  header = ["layer", "output", "dims"] + [
      f"{k} {n}{'/class' if n != 'all' else ''} ({metric} %)"
      for n in splits for k in settings.classifiers]
  paper, where = ((PAPER_TABLE7_256, "Caltech-256 60/class") if settings.dataset == "caltech256"
                  else (PAPER_TABLE7, "Caltech-101 30/class"))
  header += [f"paper {where} {k}" for k in settings.classifiers]
  rows = []
  for l, name in console.progress(names.items(), desc="probes", unit="layer"):
    f = feats[l]
    row = [str(l), name, str(f.shape[1])]
    for n, folds in splits.items():
      for k in settings.classifiers:
        c = settings.svm_c if k == "svm" else settings.softmax_c
        row.append(_fmt([fit_score(k, f[tr], data.labels[tr], f[te], data.labels[te], c,
                                   data.multilabel) for tr, te in folds]))
    row += [str(paper[k].get(l, "–")) for k in settings.classifiers]
    rows.append(row)
  return header, rows


def transfer_scores(net, variables, mean, data: TargetData, settings, input_size: int,
                    seed: int = 0, clip_radius: float = 0.1) -> dict:
  """Sec. 5.2: frozen layers 1-7 + new softmax vs the same architecture from scratch
  (trained with the recipe of ``train_scratch``, clipping at ``clip_radius``).

  Returns {"metric", "layer" (the frozen features' layer), "scores": {setting:
  {"pretrained": [score of each fold], "scratch": [...] or None (not run)}}}, scores
  in [0, 1]; for multi-label data also "classes" and "per_class_ap": {"pretrained",
  "scratch": (K,) AP of each class, mean over folds (NaN: no positive in the test set)}.
  """
  _check(settings)
  net = deconv.as_network(net)
  names = probe_layers(net, input_size, (7, 6, 5))
  top = max(names)                       # fc7, else the highest layer left
  feats = extract_features(net, variables, data.images, mean, {top: names[top]},
                           settings.pool_grid, settings.batch_size)[top]
  if settings.scratch_steps > 0 and net.module is None:
    raise ValueError(f"the from-scratch control needs a Flax module to retrain; {net.name} "
                     "has none (set transfer.scratch_steps=0)")
  outputs = {"pretrained": {}, "scratch": {}}   # setting -> [(test labels, outputs) per fold]
  for n, folds in splits_for(data, settings).items():
    outputs["pretrained"][n] = [
        (data.labels[te], fit_predict("softmax", feats[tr], data.labels[tr], feats[te],
                                      settings.softmax_c, data.multilabel)) for tr, te in folds]
    if settings.scratch_steps > 0:
      fresh = net.module.clone(num_classes=len(data.class_names), rule="backprop")
      outputs["scratch"][n] = []
      for f, (tr, te) in enumerate(folds):
        v = train_scratch(fresh, data.images[tr], data.labels[tr], mean,
                          steps=settings.scratch_steps, batch_size=settings.scratch_batch_size,
                          learning_rate=settings.scratch_learning_rate, multilabel=data.multilabel,
                          flip=settings.scratch_flip, seed=seed + f, clip_radius=clip_radius)
        outputs["scratch"][n].append(
            (data.labels[te], scratch_outputs(fresh, v, data.images[te], mean, data.multilabel)))
  result = {"metric": "mAP" if data.multilabel else "mean class acc", "layer": names[top],
            "scores": {n: {m: [score(y, o, data.multilabel) for y, o in outputs[m][n]]
                           if n in outputs[m] else None for m in outputs}
                       for n in outputs["pretrained"]}}
  if data.multilabel:
    result["classes"] = list(data.class_names)
    result["per_class_ap"] = {
        m: np.mean([average_precisions(y, o) for n in by_n for y, o in by_n[n]], axis=0)
        if by_n else None for m, by_n in outputs.items()}
  return result


def _paper_transfer(dataset: str):
  """(header cell, pretrained cell, scratch cell) of the paper's Sec. 5.2 numbers, or None."""
  if dataset in PAPER_TRANSFER:
    p = PAPER_TRANSFER[dataset]
    return (f"paper ({' / '.join(map(str, p['pretrained']))} per class)",
            " / ".join(map(str, p["pretrained"].values())),
            " / ".join(map(str, p["scratch"].values())))
  if dataset == "voc2012":
    return "paper (test mAP)", "79.0", "–"
  return None


def transfer_curve(result: dict, dataset: str, path: str) -> str:
  """Fig. 9: mean per-class accuracy (mean ± std over folds) against training images per
  class, pretrained vs from scratch, and the paper's points where it has them."""
  plt = figures.pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 4))
  ns = [int(n) for n in result["scores"]]
  for m, label, colour in (("pretrained", "pretrained, frozen + softmax", "C0"),
                           ("scratch", "same architecture from scratch", "C1")):
    runs = [result["scores"][str(n)][m] for n in ns]
    if all(r is not None for r in runs):
      ax.errorbar(ns, [100 * np.mean(r) for r in runs], [100 * np.std(r) for r in runs],
                  marker="o", color=colour, capsize=3, label=f"{label} (ours)")
    if dataset in PAPER_TRANSFER:
      p = PAPER_TRANSFER[dataset][m]
      ax.plot(list(p), list(p.values()), "--s", color=colour, alpha=0.6,
              label=f"{label} (paper)")
  ax.set_xlabel("training images per class")
  ax.set_ylabel("mean per-class accuracy (%)")
  ax.set_title(f"Transfer to {dataset} (Fig. 9)")
  ax.set_ylim(0, 100)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return figures.save_figure(fig, path)

