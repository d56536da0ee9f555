"""Where the examples come from: TFDS datasets, a folder of images, and offline
Fashion-MNIST (Debian's IDX files), each described by a ``DatasetInfo``.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import struct

import numpy as np

from zfnet_jax import console

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


IMAGENET_TARBALLS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".webp")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  channels: int
  input_size: int          # crop size S fed to the model
  class_names: tuple[str, ...]
  num_train: int
  num_eval: int


# ----------------------------------------------------------------------------
# Fashion-MNIST from IDX files.
# ----------------------------------------------------------------------------

def read_idx(path: str) -> np.ndarray:
  """Read a (gzipped) IDX file into a uint8 array; truncated files are an error."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (EOFError, OSError, gzip.BadGzipFile) as e:
    raise ValueError(f"cannot read IDX file {path}: {e} (truncated or corrupt; "
                     "reinstall Debian's dataset-fashion-mnist package)") from e
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic {data[:4]!r})")
  ndim = data[3]
  if len(data) < 4 + 4 * ndim:
    raise ValueError(f"IDX file {path} is truncated: header cut short")
  shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
  expected = int(np.prod(shape))
  body = data[4 + 4 * ndim:]
  if len(body) != expected:
    raise ValueError(f"IDX file {path} is truncated or corrupt: header says shape {shape} "
                     f"({expected} bytes of data), found {len(body)} bytes")
  return np.frombuffer(body, np.uint8).reshape(shape)


@functools.lru_cache(maxsize=4)
def _fashion_mnist(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 (N, 28, 28, 1), labels int32 (N,)) from IDX files or TFDS."""
  if split not in FASHION_MNIST_FILES:
    raise ValueError(f"unknown Fashion-MNIST split {split!r}; allowed: train, test")
  paths = [os.path.join(directory, f) for f in FASHION_MNIST_FILES[split]]
  missing = [p for p in paths if not os.path.exists(p)]
  if not missing:
    images, labels = (read_idx(p) for p in paths)
    if images.shape[0] != labels.shape[0]:
      raise ValueError(f"{paths[0]} has {images.shape[0]} images but {paths[1]} has "
                       f"{labels.shape[0]} labels")
    return images[..., None], labels.astype(np.int32)
  try:  # Fallback: TFDS's fashion_mnist (downloads if not prepared).
    import tensorflow_datasets as tfds
    ds = tfds.as_numpy(tfds.load("fashion_mnist", split=split, batch_size=-1))
    return ds["image"].astype(np.uint8), ds["label"].astype(np.int32)
  except Exception as e:  # pylint: disable=broad-except
    raise FileNotFoundError(
        f"Fashion-MNIST not found. Route 1 (offline): the IDX files {', '.join(missing)} "
        f"are missing; install them with `apt-get install dataset-fashion-mnist` or set "
        f"--config.dataset.fashion_mnist_dir to a folder holding "
        f"{', '.join(FASHION_MNIST_FILES[split])}. Route 2: TFDS 'fashion_mnist' failed "
        f"({type(e).__name__}: {e}).") from e


# ----------------------------------------------------------------------------
# TFDS and folder sources.
# ----------------------------------------------------------------------------

def _tfds_builder(config):
  import tensorflow_datasets as tfds
  d = config.dataset
  builder = tfds.builder(d.name, data_dir=d.data_dir or None)
  mocked = "mock" in getattr(type(builder).download_and_prepare, "__name__", "")  # mock_data
  if d.name.startswith("imagenet2012") and not mocked and not _is_prepared(builder):
    manual = d.manual_dir or os.path.join(builder._data_dir_root, "downloads", "manual")  # pylint: disable=protected-access
    missing = [t for t in IMAGENET_TARBALLS if not os.path.exists(os.path.join(manual, t))]
    if missing:
      raise FileNotFoundError(
          f"ImageNet 2012 is not prepared in {builder.data_dir} and the tarballs "
          f"{', '.join(missing)} are missing from {manual}. Download them from "
          f"https://image-net.org (login required) and put them in {manual} (or set "
          f"--config.dataset.manual_dir); they are prepared on the first run.")
  if not _is_prepared(builder):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=d.manual_dir or None))
  return builder


def _is_prepared(builder) -> bool:
  try:
    return bool(builder.is_prepared())
  except Exception:  # pylint: disable=broad-except
    return os.path.exists(os.path.join(builder.data_dir, "dataset_info.json"))


def _tfds_split_size(builder, split: str) -> int:
  """Examples in a split (counted when the metadata has no split sizes, e.g. mock data)."""
  if builder.info.splits:
    if split not in builder.info.splits:
      raise ValueError(f"TFDS dataset {builder.name!r} has no split {split!r}; allowed: "
                       f"{', '.join(builder.info.splits)}")
    return int(builder.info.splits[split].num_examples)
  ds = builder.as_dataset(split=split)
  n = int(ds.cardinality())
  return n if n >= 0 else sum(1 for _ in ds)


UNLABELLED = "unlabelled"   # the one class of a flat folder of images


@functools.lru_cache(maxsize=None)
def _warn_once(msg: str) -> None:
  """A warning about the data, said once per process (every split lists the folder)."""
  console.say(msg, warn=True)


@functools.lru_cache(maxsize=4)
def _folder_files(root: str, split: str, eval_split: str, fraction: float, on_corrupt: str
                  ) -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...], int]:
  """(paths, labels, class names, number skipped) of one split of a folder dataset.

  A flat folder (images directly in ``root``, no class sub-folder with images) is one
  class ``UNLABELLED`` whose every split is all of its images (for the report and
  visualize of a model trained elsewhere; training needs 2 classes).
  If ``root/<split>/`` exists it is used; otherwise every class is split
  deterministically: each ``round(1/fraction)``-th file (sorted) goes to eval.
  Every image is decoded once (JPEGs at 1/8 scale, about 0.6 ms each), so a
  truncated file that passes PIL's ``verify()`` is found here, not mid-run: it is
  skipped and counted, or with ``on_corrupt="stop"`` named in a ValueError.  A
  class folder without image files is left out with a warning (ValueError with
  ``on_corrupt="stop"``).
  """
  from PIL import Image
  if not os.path.isdir(root):
    raise FileNotFoundError(f"dataset folder {root!r} does not exist")
  base = os.path.join(root, split) if os.path.isdir(os.path.join(root, split)) else root
  classes = sorted(e for e in os.listdir(base) if os.path.isdir(os.path.join(base, e)))
  if on_corrupt not in ("skip", "stop"):
    raise ValueError(f"dataset.on_corrupt={on_corrupt!r}; allowed: skip, stop")
  listed = {cls: sorted(f for f in os.listdir(os.path.join(base, cls))
                        if f.lower().endswith(IMAGE_EXTENSIONS)) for cls in classes}
  flat = sorted(f for f in os.listdir(base) if f.lower().endswith(IMAGE_EXTENSIONS)
                and os.path.isfile(os.path.join(base, f)))
  if flat and not any(listed.values()):   # a flat folder: one class, every split = all of it
    classes, listed, fraction = [UNLABELLED], {UNLABELLED: flat}, 0.0
  empty = [cls for cls in classes if not listed[cls]]
  if empty:
    if on_corrupt == "stop":
      raise ValueError(f"folder dataset {base!r}: class folder(s) {empty} hold no images "
                       f"(extensions {', '.join(IMAGE_EXTENSIONS)}); remove them or set "
                       "--config.dataset.on_corrupt=skip to leave them out")
    _warn_once(f"folder dataset {base}: left out empty class folder(s) {empty}")
    classes = [cls for cls in classes if listed[cls]]
  if len(classes) < 2 and classes != [UNLABELLED]:
    raise ValueError(f"folder dataset {base!r} has {len(classes)} class sub-folder(s) "
                     f"{classes}{f' with images (empty: {empty})' if empty else ''}; need at "
                     "least 2 (one sub-folder of images per class), or images directly in "
                     f"the folder (one {UNLABELLED!r} class: for --mode=report/visualize of "
                     "imported weights)")
  every = max(2, round(1 / fraction)) if fraction > 0 else 0
  is_eval = split == eval_split and base == root
  paths, labels, skipped = [], [], 0
  for label, cls in enumerate(classes):
    files = listed[cls]
    if base == root and every:
      files = [f for i, f in enumerate(files) if (i % every == every - 1) == is_eval]
    for f in files:
      p = os.path.join(base, f) if classes == [UNLABELLED] else os.path.join(base, cls, f)
      try:
        with Image.open(p) as im:
          im.verify()
        with Image.open(p) as im:       # verify() does not decode: a truncated JPEG passes
          im.draft(im.mode, (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
          im.load()
      except Exception as e:  # pylint: disable=broad-except
        if on_corrupt == "stop":
          raise ValueError(f"corrupt or unreadable image {p}: {e} "
                           "(set --config.dataset.on_corrupt=skip to skip such files)") from e
        skipped += 1
        continue
      paths.append(p)
      labels.append(label)
  if not paths:
    raise ValueError(f"folder dataset {base!r} split {split!r} has no readable images "
                     f"(extensions {', '.join(IMAGE_EXTENSIONS)}; {skipped} corrupt)")
  if skipped:
    console.say(f"folder dataset {base}: skipped {skipped} corrupt/unreadable files", warn=True)
  return tuple(paths), tuple(labels), tuple(classes), skipped


def _folder_split(config, split):
  d = config.dataset
  return _folder_files(os.path.abspath(d.folder), split, d.eval_split,
                       float(d.folder_eval_fraction), d.on_corrupt)


def _source_kind(config) -> str:
  if config.dataset.name == "fashion_mnist_idx":
    return "memory"
  if config.dataset.name == "folder":
    return "folder"
  return "tfds"


def _limit(n: int, limit: int) -> int:
  return min(n, limit) if limit and limit > 0 else n


def dataset_info(config) -> DatasetInfo:
  """Classes, channels, model input size and split sizes (after max_*_examples)."""
  d = config.dataset
  if d.crop_size < 1 or d.resize_size < d.crop_size:
    raise ValueError(f"need 1 <= dataset.crop_size <= dataset.resize_size, got crop_size="
                     f"{d.crop_size}, resize_size={d.resize_size}")
  kind = _source_kind(config)
  if kind == "memory":
    n_train = len(_fashion_mnist(d.fashion_mnist_dir, d.train_split)[1])
    n_eval = len(_fashion_mnist(d.fashion_mnist_dir, d.eval_split)[1])
    names, channels = FASHION_MNIST_CLASSES, 1
  elif kind == "folder":
    tr, ev = _folder_split(config, d.train_split), _folder_split(config, d.eval_split)
    if tr[2] != ev[2]:
      raise ValueError(f"train classes {tr[2]} differ from eval classes {ev[2]}")
    n_train, n_eval, names, channels = len(tr[0]), len(ev[0]), tr[2], 3
  else:
    builder = _tfds_builder(config)
    feats = builder.info.features
    if "image" not in feats or "label" not in feats:
      raise ValueError(f"TFDS dataset {d.name!r} has features {list(feats)}; need 'image' "
                       "and 'label' (an image-classification dataset)")
    names = tuple(feats["label"].names)
    channels = feats["image"].shape[-1] or 3
    n_train = _tfds_split_size(builder, d.train_split)
    n_eval = _tfds_split_size(builder, d.eval_split)
  return DatasetInfo(len(names), int(channels), int(d.crop_size), tuple(names),
                     _limit(n_train, d.max_train_examples), _limit(n_eval, d.max_eval_examples))


def validate(dataset_config) -> None:
  """ValueError naming the first impossible ``config.dataset`` value and what is allowed."""
  d = dataset_config
  if d.crop_size < 1 or d.resize_size < d.crop_size:
    raise ValueError(f"need 1 <= dataset.crop_size <= dataset.resize_size, got crop_size="
                     f"{d.crop_size}, resize_size={d.resize_size}")
  if d.on_corrupt not in ("skip", "stop"):
    raise ValueError(f"dataset.on_corrupt={d.on_corrupt!r}; allowed: skip, stop")
  if d.name == "folder" and not d.folder:
    raise ValueError("dataset.name='folder' needs --config.dataset.folder=DIR")


def _tf_decode_resize(image, config, channels):
  """Encoded or decoded image -> float32 (R, R, C): smaller side to R, centre crop."""
  import tensorflow as tf
  if image.dtype == tf.string:
    image = tf.io.decode_image(image, channels=channels, expand_animations=False)
  r = config.dataset.resize_size
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  scale = r / tf.minimum(h, w)
  nh = tf.maximum(r, tf.cast(tf.round(h * scale), tf.int32))
  nw = tf.maximum(r, tf.cast(tf.round(w * scale), tf.int32))
  image = tf.image.resize(tf.cast(image, tf.float32), (nh, nw), antialias=True)
  top, left = (nh - r) // 2, (nw - r) // 2
  image = image[top:top + r, left:left + r]
  return tf.reshape(image, (r, r, channels))


def _tf_off_accelerators(tf) -> None:
  """TensorFlow only feeds tf.data here: it gets no GPU (it would reserve JAX's memory)."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:   # TensorFlow's devices are already set up (by an earlier call)
    pass


def _tf_examples(config, split, *, train: bool, read: bool = True):
  """tf.data of {'image': encoded/decoded, 'label'} in the split's fixed order (the
  same in every process; images are not decoded).  ``read=False``: a folder's
  images are file paths, read later (by the process that uses them)."""
  import tensorflow as tf
  _tf_off_accelerators(tf)
  import tensorflow_datasets as tfds
  d = config.dataset
  if _source_kind(config) == "folder":
    paths, labels, _, _ = _folder_split(config, split)
    n = _limit(len(paths), d.max_train_examples if train else -1)
    ds = tf.data.Dataset.from_tensor_slices((list(paths[:n]), list(labels[:n])))
    return ds.map(lambda p, l: {"image": tf.io.read_file(p) if read else p, "label": l})
  builder = _tfds_builder(config)
  limit = d.max_train_examples if train else -1
  if limit and limit > 0:
    split = f"{split}[:{limit}]"
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()},
                          read_config=tfds.ReadConfig(shuffle_seed=0, interleave_cycle_length=1))
  return ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})

