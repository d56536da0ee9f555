"""The target datasets of transfer (Sec. 5.2) and the probes (Table 7), as arrays:
scikit-learn's digits (offline), Caltech-101/256 and VOC 2012 (TFDS or a folder).
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from sklearn import datasets as sk_datasets

from zfnet_jax import console
from zfnet_jax.data import sources

DATASETS = ("digits", "caltech101", "caltech256", "voc2012")


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
                   if f.lower().endswith(sources.IMAGE_EXTENSIONS)
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

