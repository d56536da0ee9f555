r"""Transfer to other datasets (Sec. 5.2) and per-layer linear probes (Table 7).

  python -m zfnet_jax.transfer --config=experiments/transfer_digits.py --workdir=workdirs/quickstart
  python -m zfnet_jax.transfer --config=experiments/transfer_caltech101.py \
      --workdir=workdirs/transfer_caltech101 --config.transfer.source_workdir=workdirs/zfnet

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
Outputs go to <workdir>/transfer/ (or the report's transfer/): probes.csv/.md,
transfer.csv/.md, transfer.json (every fold's score; per-class AP), for VOC
per_class_ap.csv/.md (Table 6), for single-label sets curve.png (Fig. 9: score
against training images per class).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Sequence

from absl import app, flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax
from sklearn import datasets as sk_datasets
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from zfnet_jax import configs, conv
from zfnet_jax import checkpoints, console, deconv, figures, input_pipeline, models, train_state
from zfnet_jax import sections as sections_lib

LAYER_OUTPUTS = {1: ("norm1", "pool1"), 2: ("norm2", "pool2"), 3: ("conv3",), 4: ("conv4",),
                 5: ("pool5",), 6: ("fc6",), 7: ("fc7",)}
DATASETS = ("digits", "caltech101", "caltech256", "voc2012")
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
CALTECH256_URL = "https://data.caltech.edu/records/nyy15-4j048/files/256_ObjectCategories.tar"


@dataclasses.dataclass
class TargetData:
  """A transfer dataset as arrays.

  images: uint8 or float32 (N, S, S, C) pixel values 0..255 at the model's input size.
  labels: int (N,) or, for multi-label sets, {0,1} (N, K).
  split: None (random folds) or (train indices, test indices), fixed.
  """
  images: np.ndarray
  labels: np.ndarray
  class_names: list[str]
  multilabel: bool = False
  split: tuple[np.ndarray, np.ndarray] | None = None


# -- data ----------------------------------------------------------------------
def load_digits(input_size: int, channels: int) -> TargetData:
  """scikit-learn's bundled 8x8 digits (1797 images, no download), upsampled bilinearly."""
  d = sk_datasets.load_digits()
  x = jnp.asarray(d.images, jnp.float32)[..., None] * (255.0 / 16.0)
  x = jax.image.resize(x, (x.shape[0], input_size, input_size, 1), "linear")
  x = np.clip(np.asarray(x), 0, 255)
  return TargetData(np.repeat(x, channels, axis=-1), d.target.astype(np.int32),
                    [str(i) for i in range(10)])


def _as_arrays(ds, desc, resize_size, crop_size, channels, label_fn):
  """tf.data of {"image": uint8 (H, W, 3), ...} -> uint8 (N, S, S, C), labels: smaller
  side to ``resize_size`` (antialiased), centre crop ``crop_size``."""
  import tensorflow as tf
  import tensorflow_datasets as tfds

  def prep(ex):
    img = ex["image"]
    h, w = tf.shape(img)[0], tf.shape(img)[1]
    scale = resize_size / tf.cast(tf.minimum(h, w), tf.float32)
    size = tf.cast(tf.round(tf.cast(tf.stack([h, w]), tf.float32) * scale), tf.int32)
    img = tf.image.resize(img, tf.maximum(size, resize_size), antialias=True)
    img = tf.image.resize_with_crop_or_pad(img, crop_size, crop_size)
    if channels == 1:
      img = tf.image.rgb_to_grayscale(img)
    return tf.cast(tf.clip_by_value(tf.round(img), 0, 255), tf.uint8), label_fn(ex)

  images, labels = [], []
  for img, lab in console.progress(tfds.as_numpy(ds.map(prep, num_parallel_calls=8).batch(256)),
                                   desc=desc, unit="batch"):
    images.append(img)
    labels.append(lab)
  return np.concatenate(images), np.concatenate(labels)


def _tfds_images(name, splits, data_dir, resize_size, crop_size, channels, label_fn):
  import tensorflow as tf
  import tensorflow_datasets as tfds
  tf.config.set_visible_devices([], "GPU")
  parts = [_as_arrays(tfds.load(name, split=split, data_dir=data_dir or None, download=False),
                      f"{name}:{split}", resize_size, crop_size, channels, label_fn)
           for split in splits]
  return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
          [len(p[1]) for p in parts])


def caltech256_files(root: str) -> tuple[list[str], np.ndarray, list[str]]:
  """(image paths, int labels, class names) of Caltech-256's 256_ObjectCategories folder.

  ``root`` is that folder or one holding it; one sub-folder per class, "001.ak47" ...
  "256.toad" (names without the number). "257.clutter" is left out: in Griffin et
  al.'s protocol, which the paper follows, clutter is background, not one of the 256
  classes. Only files directly in a class folder with an image extension are read.
  """
  if os.path.isdir(os.path.join(root, "256_ObjectCategories")):
    root = os.path.join(root, "256_ObjectCategories")
  if not root or not os.path.isdir(root):
    raise FileNotFoundError(
        f"Caltech-256 folder {root!r} not found (TFDS has no Caltech-256): download "
        f"{CALTECH256_URL} (1.2 GB), untar it and set --config.transfer.data_dir to "
        "the 256_ObjectCategories folder or the folder holding it")
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))
                   and d.split(".", 1)[-1] != "clutter")
  paths, labels = [], []
  for label, d in enumerate(classes):
    files = sorted(f for f in os.listdir(os.path.join(root, d))
                   if f.lower().endswith(input_pipeline.IMAGE_EXTENSIONS)
                   and os.path.isfile(os.path.join(root, d, f)))
    paths += [os.path.join(root, d, f) for f in files]
    labels += [label] * len(files)
  if len(classes) < 2 or not paths:
    raise ValueError(f"Caltech-256 folder {root!r} has {len(classes)} class folder(s) and "
                     f"{len(paths)} images; expected 256 folders 001.ak47 ... 256.toad")
  return paths, np.asarray(labels, np.int32), [d.split(".", 1)[-1] for d in classes]


def load_caltech256(root: str, input_size: int, resize_size: int, channels: int) -> TargetData:
  """Caltech-256 (256 classes, 30,607 images less 827 clutter) from its folder, as uint8."""
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")
  paths, labels, names = caltech256_files(root)
  ds = tf.data.Dataset.from_tensor_slices((paths, labels)).map(lambda p, l: {
      "image": tf.io.decode_image(tf.io.read_file(p), channels=3, expand_animations=False),
      "label": l})
  x, y = _as_arrays(ds, "caltech256", resize_size, input_size, channels, lambda ex: ex["label"])
  return TargetData(x, y.astype(np.int32), names)


def load_target(settings, input_size: int, resize_size: int, channels: int) -> TargetData:
  """The dataset ``settings.dataset`` names, preprocessed for a model of this input."""
  if settings.dataset == "digits":
    return load_digits(input_size, channels)
  if settings.dataset == "caltech256":
    return load_caltech256(settings.data_dir, input_size, resize_size, channels)
  import tensorflow_datasets as tfds
  if settings.dataset == "caltech101":
    # TFDS's train/test split is merged; folds are drawn per class as in the paper.
    x, y, _ = _tfds_images("caltech101", ("train", "test"), settings.data_dir, resize_size,
                           input_size, channels, lambda ex: ex["label"])
    names = tfds.builder("caltech101", data_dir=settings.data_dir or None).info.features[
        "label"].names
    return TargetData(x, y.astype(np.int32), names)
  if settings.dataset == "voc2012":
    import tensorflow as tf
    multi_hot = lambda ex: tf.reduce_max(tf.one_hot(ex["labels"], 20, dtype=tf.int32), axis=0)
    x, y, (n_train, _) = _tfds_images("voc/2012", ("train", "validation"), settings.data_dir,
                                      resize_size, input_size, channels, multi_hot)
    names = tfds.builder("voc/2012", data_dir=settings.data_dir or None).info.features[
        "labels"].feature.names
    idx = np.arange(len(x))
    return TargetData(x, y, names, multilabel=True,
                      split=(idx[:n_train], idx[n_train:]))
  raise ValueError(f"unknown transfer dataset {settings.dataset!r}; allowed: "
                   f"{', '.join(DATASETS)}")


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
  order = models.layer_names(deconv.as_network(net), input_size)
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

  @conv.jit
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


# -- from-scratch control -------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _scratch_step(model, learning_rate: float, multilabel: bool, flip: bool, clip_radius: float):
  """(optimiser, jitted step) for ``train_scratch``; cached so folds share one compile."""
  tx = train_state.make_optimizer("sgd", momentum=0.9, weight_decay=5e-4)

  def loss_fn(p, x, y, key):
    logits = model.apply({"params": p}, x, train=True, rngs={"dropout": key})
    if multilabel:
      return optax.sigmoid_binary_cross_entropy(logits, y).sum(-1).mean()
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @conv.jit
  def step(p, s, x, y, mean, key):
    flip_key, drop_key = jax.random.split(key)
    if flip:
      flips = jax.random.bernoulli(flip_key, 0.5, (x.shape[0], 1, 1, 1))
      x = jnp.where(flips, x[:, :, ::-1], x)
    x = x - mean
    loss, grads = jax.value_and_grad(loss_fn)(p, x, y, drop_key)
    p, s = train_state.step_update(tx, grads, s, p, learning_rate, clip_radius)
    return p, s, loss

  return tx, step


def train_scratch(model, images, labels, mean, *, steps: int, batch_size: int,
                  learning_rate: float, multilabel: bool, flip: bool = True, seed: int = 0,
                  clip_radius: float = 0.1):
  """Trains ``model`` from a fresh init on pixel images (N, S, S, C) -> variables.

  The training recipe of ``train_state``: SGD momentum 0.9, weight decay 5e-4
  on kernels, feature scale clipping of conv filters at ``clip_radius`` (0 =
  off); random flips (``flip``), dropout; batches drawn at random without
  replacement.
  """
  tx, step = _scratch_step(model, float(learning_rate), bool(multilabel), bool(flip),
                           float(clip_radius))
  shape = (1, *images.shape[1:])
  # Not jitted: the seed is a constant of init_fn, and eager ops compile once for all folds.
  state = train_state.init_fn(model, shape, tx, seed=seed, clip_radius=clip_radius)()
  params, opt_state = state.params, state.opt_state
  rng = np.random.default_rng(seed)
  key = jax.random.PRNGKey(seed + 1)
  mean = jnp.asarray(mean, jnp.float32)
  loss = 0.0
  for i in console.progress(range(steps), desc="scratch", unit="step"):
    idx = rng.choice(len(images), size=min(batch_size, len(images)), replace=False)
    params, opt_state, loss = step(params, opt_state, images[idx], labels[idx], mean,
                                   jax.random.fold_in(key, i))
  if not np.isfinite(float(loss)):
    raise FloatingPointError(f"from-scratch control diverged (loss {float(loss)}); "
                             "lower transfer.scratch_learning_rate")
  return {"params": params}


def scratch_outputs(model, variables, images, mean, multilabel, batch_size=128) -> np.ndarray:
  """A (from-scratch) model's own classifier on pixel images: logits (N, K) for
  multi-label data, else predicted labels (N,)."""
  apply = _jitted_apply(model)
  logits = []
  for i in range(0, len(images), batch_size):
    x = np.zeros((batch_size, *images.shape[1:]), np.float32)   # one shape: one compile
    x[:len(images[i:i + batch_size])] = images[i:i + batch_size]
    logits.append(np.asarray(apply(variables, x, mean))[:len(images[i:i + batch_size])])
  logits = np.concatenate(logits)
  return logits if multilabel else logits.argmax(-1)


@functools.lru_cache(maxsize=8)
def _jitted_apply(model):
  return conv.jit(lambda variables, x, mean: model.apply(variables, x - mean))


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


def transfer_rows(result: dict, dataset: str) -> tuple[list[str], list[list[str]]]:
  """The Sec. 5.2 table (Tables 4, 5; VOC's mean) of ``transfer_scores``' result."""
  header = ["model"] + [f"{n}{'/class' if n != 'all' else ''} ({result['metric']} %)"
                        for n in result["scores"]]
  pre = ["pretrained, layers 1-7 frozen + softmax"]
  scratch = ["same architecture from scratch"]
  for by_model in result["scores"].values():
    pre.append(_fmt(by_model["pretrained"]))
    scratch.append("not run" if by_model["scratch"] is None else _fmt(by_model["scratch"]))
  paper = _paper_transfer(dataset)
  if paper:
    header.append(paper[0])
    pre.append(paper[1])
    scratch.append(paper[2])
  return header, [pre, scratch]


def per_class_ap_rows(result: dict) -> tuple[list[str], list[list[str]]]:
  """Table 6: AP % of each class (pretrained, scratch, the paper's) and their mean."""
  ap = result["per_class_ap"]
  cell = lambda v: "–" if v is None or np.isnan(v) else f"{100 * v:.1f}"
  header = ["class", "pretrained, layers 1-7 frozen + softmax (AP %)",
            "same architecture from scratch (AP %)", "paper Table 6 (test AP %)"]
  paper = list(PAPER_VOC_AP) if len(result["classes"]) == len(PAPER_VOC_AP) else []
  rows = []
  for k, name in enumerate(result["classes"]):
    rows.append([name] + [cell(None if ap[m] is None else ap[m][k])
                          for m in ("pretrained", "scratch")] + [str(paper[k]) if paper else "–"])
  mean = lambda m: None if ap[m] is None else float(np.nanmean(ap[m]))
  rows.append(["mean"] + [cell(mean(m)) for m in ("pretrained", "scratch")]
              + ["79.0" if paper else "–"])
  return header, rows


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


def transfer(net, variables, mean, data: TargetData, settings, input_size: int, seed: int = 0,
             clip_radius: float = 0.1) -> tuple[list[str], list[list[str]]]:
  """The Sec. 5.2 table of ``transfer_scores`` (header, rows)."""
  return transfer_rows(transfer_scores(net, variables, mean, data, settings, input_size, seed,
                                       clip_radius), settings.dataset)


def table_sections(directory: str, settings) -> list[sections_lib.Section]:
  """Report sections of the tables in ``directory`` (probes.csv, transfer.csv)."""
  out = []
  probes_csv, transfer_csv = (os.path.join(directory, f"{n}.csv") for n in ("probes", "transfer"))
  if os.path.exists(probes_csv):
    out.append(sections_lib.Section(
        "Per-layer linear probes (Table 7)", "probes",
        [f"Features of each layer on {settings.dataset} (conv outputs max-pooled over a "
         f"{settings.pool_grid}x{settings.pool_grid} grid, standardised), classified by a "
         "linear SVM and a softmax; mean ± std over random folds. The paper's column is "
         f"{'Caltech-256 at 60' if settings.dataset == 'caltech256' else 'Caltech-101 at 30'} "
         "images per class with ImageNet features: compare the trend over layers."],
        tables=[sections_lib.read_table(probes_csv)]))
  if os.path.exists(transfer_csv):
    section = sections_lib.Section(
        "Transfer: frozen features vs training from scratch (Sec. 5.2)", "transfer",
        [f"A new softmax on the frozen layers 1-7, against the same architecture trained from "
         f"a fresh initialisation on the same {settings.dataset} images."],
        tables=[sections_lib.read_table(transfer_csv)])
    ap_csv = os.path.join(directory, "per_class_ap.csv")
    if os.path.exists(ap_csv):
      section.paragraphs.append("Average precision of each class on the validation split "
                                "(Table 6; the paper's is on the test server's split).")
      section.tables.append(sections_lib.read_table(ap_csv))
    if os.path.exists(os.path.join(directory, "curve.png")):
      section.figures.append((os.path.join(os.path.basename(directory), "curve.png"),
                              "Score against training images per class, mean ± std over "
                              "folds (Fig. 9)" + ("; dashed: the paper's numbers."
                                                  if settings.dataset in PAPER_TRANSFER else ".")))
    out.append(section)
  return out


TABLES = ("probes", "transfer")


def write_tables(net, variables, mean, settings, input_size: int, resize_size: int, directory: str,
                 *, seed: int = 0, clip_radius: float = 0.1, which: Sequence[str] = TABLES
                 ) -> dict[str, tuple[list[str], list[list[str]]]]:
  """The ``which`` tables (probes: Table 7; transfer: Sec. 5.2) of a network on
  ``settings.dataset``, written to <directory>/<name>.csv and .md."""
  _check(settings)
  data = load_target(settings, input_size, resize_size, np.shape(mean)[-1])
  tables = {}
  if "probes" in which:
    tables["probes"] = probes(net, variables, mean, data, settings, input_size)
  if "transfer" in which:
    result = transfer_scores(net, variables, mean, data, settings, input_size, seed, clip_radius)
    tables["transfer"] = transfer_rows(result, settings.dataset)
    if data.multilabel:
      tables["per_class_ap"] = per_class_ap_rows(result)
    else:
      transfer_curve(result, settings.dataset, os.path.join(directory, "curve.png"))
    write_json(result, settings.dataset, os.path.join(directory, "transfer.json"))
  for stem, (header, rows) in tables.items():
    sections_lib.write_table(header, rows, directory, stem)
  return tables


def write_json(result: dict, dataset: str, path: str) -> str:
  """``transfer_scores``' result as JSON (scores in [0, 1]; NaN -> null), with the paper's."""
  plain = lambda v: [None if np.isnan(x) else float(x) for x in v] if isinstance(
      v, np.ndarray) else v
  out = {"dataset": dataset, **result}
  if "per_class_ap" in out:
    out["per_class_ap"] = {m: plain(v) for m, v in out["per_class_ap"].items()}
    out["paper_per_class_ap"] = list(PAPER_VOC_AP) if dataset == "voc2012" else None
  if dataset in PAPER_TRANSFER:
    out["paper"] = {m: {str(n): v for n, v in p.items()}
                    for m, p in PAPER_TRANSFER[dataset].items()}
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=1)
  return path


# -- the report ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Options:
  """``config.transfer`` (``settings``) and the clipping radius of the run's recipe."""
  settings: ml_collections.ConfigDict
  clip_radius: float


def validate(options, net, data: sections_lib.Data) -> Options:
  """``config.transfer`` plus ``clip_radius`` (added by the report), checked."""
  _check(options)
  probe_layers(net, data.input_size, options.layers)
  return Options(options, float(options.get("clip_radius", 0.1)))


def sections(context: sections_lib.Context, options: Options) -> list[sections_lib.Section]:
  """Table 7 probes and the Sec. 5.2 transfer of the report's network (transfer/*.csv)."""
  directory = context.path("transfer/probes.csv").rsplit(os.sep, 1)[0]
  write_tables(context.net, context.variables, context.pixel_mean, options.settings,
               context.data.input_size, context.data.resize_size, directory, seed=context.seed,
               clip_radius=options.clip_radius,
               which=TABLES if options.settings.scratch_steps > 0 else ("probes",))
  return table_sections(directory, options.settings)


# -- command line ----------------------------------------------------------------
def _source(config, workdir):
  """-> (model, variables, pixel mean (S,S,C), train config) of the model to transfer."""
  src = config.transfer.source_workdir or workdir
  model, variables, src_config = checkpoints.load_trained(src)
  return model, variables, np.asarray(input_pipeline.pixel_mean(src_config, src)), src_config


def _tables(config, workdir, which):
  model, variables, mean, src = _source(config, workdir)
  return write_tables(model, variables, mean, config.transfer, mean.shape[0],
                      src.dataset.resize_size, os.path.join(workdir, "transfer"),
                      seed=config.seed, clip_radius=train_state.clip_radius(src), which=which)


def probe_table(config, workdir: str) -> tuple[list[str], list[list[str]]]:
  """Per-layer probes of the model in ``config.transfer.source_workdir`` (or ``workdir``)
  on ``config.transfer.dataset``; writes <workdir>/transfer/probes.csv and .md."""
  return _tables(config, workdir, ("probes",))["probes"]


def transfer_table(config, workdir: str) -> tuple[list[str], list[list[str]]]:
  """Pretrained-frozen vs from-scratch; writes <workdir>/transfer/transfer.csv and .md."""
  return _tables(config, workdir, ("transfer",))["transfer"]


def main(argv):
  del argv
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  for name, (header, rows) in _tables(config, workdir, TABLES).items():
    print(f"\n{name}:\n" + sections_lib.markdown_table(header, rows))
  print(f"Tables written to {os.path.join(workdir, 'transfer')}")


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Output directory (and the model, unless "
                      "config.transfer.source_workdir is set).")
  config_flags.DEFINE_config_file("config", None, "Experiment configuration file.",
                                  lock_config=True)
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=lambda argv: flags.FLAGS(configs.config_argv(argv)))
