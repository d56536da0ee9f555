"""Input pipelines: TFDS datasets, a folder of images, and offline Fashion-MNIST.

The paper's preprocessing (Sec. 3), with sizes from the config:

* the smaller side is resized to ``resize_size`` (R, paper 256) and the centre
  R x R square is kept;
* the per-pixel mean over the training split (an (R, R, C) image, saved in the
  workdir as ``pixel_mean.npy`` and reused) is subtracted;
* training takes random ``crop_size`` (S, paper 224) crops and horizontal flips;
  evaluation takes the centre crop, or the paper's 10 crops (4 corners + centre,
  each flipped; done on device in ``train.py`` from the full R x R image).

Order is a pure function of (seed, step): the batch of step ``s`` is the same
whether or not the run was interrupted before it.  On every path each process
gets its own contiguous slice of every global batch (one global example order,
augmentation keyed on the global position), so P processes train exactly as one.

Small datasets (Fashion-MNIST from its IDX files) live in memory as uint8 and
are preprocessed in NumPy; TFDS datasets and folders stream through tf.data.
Batches are dicts of NumPy arrays: ``image`` float32 (B, S, S, C) mean-subtracted,
``label`` int32 (B,), and for evaluation ``mask`` bool (B,) and ``id`` int64 (B,).
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import queue
import struct
import threading
from typing import Iterator

import numpy as np
import threadpoolctl

from zfnet_jax import console, rundir

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
# NumPy preprocessing (in-memory datasets).
# ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) matrix of jax.image.resize's linear (antialiased) resize."""
  import jax
  return np.asarray(jax.image.resize(np.eye(n_in, dtype=np.float32), (n_out, n_in), "linear"),
                    np.float32)


@functools.lru_cache(maxsize=16)
def _resize_taps(n_in: int, n_out: int, start: int, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Rows [start, start + size) of ``_resize_matrix`` as taps: (index, weight), each (T, size).

  Output pixel i is sum_t weight[t, i] * input[index[t, i]], with the nonzero
  weights of row i in ascending input order (unused taps: weight 0).
  """
  a = _resize_matrix(n_in, n_out)[start:start + size]
  taps = max(1, int((a != 0).sum(1).max()))
  index, weight = np.zeros((taps, size), np.intp), np.zeros((taps, size), np.float32)
  for i, row in enumerate(a):
    nz = np.flatnonzero(row)
    index[:len(nz), i], weight[:len(nz), i] = nz, row[nz]
  return index, weight


def _resize_axis(x: np.ndarray, taps: tuple[np.ndarray, np.ndarray], axis: int) -> np.ndarray:
  """Linear resize of one axis by element-wise multiply-adds in a fixed tap order."""
  index, weight = taps
  shape = [1] * x.ndim
  shape[axis] = -1
  out = np.take(x, index[0], axis=axis) * weight[0].reshape(shape)
  for t in range(1, len(index)):
    out += np.take(x, index[t], axis=axis) * weight[t].reshape(shape)
  return out


def _np_resize_centre(images: np.ndarray, size: int) -> np.ndarray:
  """uint8 (N, H, W, C) -> float32 (N, size, size, C): smaller side to size, centre crop.

  Separable, with the same weights as ``jax.image.resize(..., "linear")``, and
  computed by element-wise float32 multiply-adds in a fixed order (no BLAS): an
  image's result is bit-identical whatever batch it comes in, on any CPU.
  """
  h, w = images.shape[1:3]
  scale = size / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  x = images.astype(np.float32)
  x = _resize_axis(x, _resize_taps(h, nh, (nh - size) // 2, size), 1)
  return _resize_axis(x, _resize_taps(w, nw, (nw - size) // 2, size), 2)


def crops_and_flips(images: np.ndarray, crop: int, tops, lefts, flips) -> np.ndarray:
  """(N, R, R, C) -> (N, crop, crop, C): the window at (tops[i], lefts[i]) of image i,
  mirrored left-right where flips[i]."""
  out = np.empty((images.shape[0], crop, crop, images.shape[3]), np.float32)
  for i, (t, l, f) in enumerate(zip(tops, lefts, flips)):
    x = images[i, t:t + crop, l:l + crop]
    out[i] = x[:, ::-1] if f else x
  return out


def centre_crop(images, crop: int):
  """(..., R, R, C) -> (..., crop, crop, C), top-left at (R - crop) // 2."""
  r = images.shape[-3]
  o = (r - crop) // 2
  return images[..., o:o + crop, o:o + crop, :]


def ten_crop_offsets(size: int, crop: int) -> list[tuple[int, int, bool]]:
  """The paper's 10 crops: (top, left, flipped) for 4 corners + centre, each also flipped."""
  c, e = (size - crop) // 2, size - crop
  pos = [(0, 0), (0, e), (e, 0), (e, e), (c, c)]
  return [(t, l, f) for f in (False, True) for t, l in pos]


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


# ----------------------------------------------------------------------------
# Per-pixel mean.
# ----------------------------------------------------------------------------

def full_pixel_mean(config, workdir: str | None) -> np.ndarray:
  """float32 (R, R, C) mean of the training split after resize + centre crop.

  Cached in ``<workdir>/pixel_mean.npy`` (computed once, reused on resume).
  """
  d = config.dataset
  path = rundir.path(workdir, rundir.MEAN) if workdir else None
  if path and os.path.exists(path):
    mean = np.load(path)
    if mean.shape[0] == d.resize_size:
      return mean.astype(np.float32)
  limit = d.mean_max_examples if d.mean_max_examples > 0 else d.max_train_examples
  if _source_kind(config) == "memory":
    images, _ = _fashion_mnist(d.fashion_mnist_dir, d.train_split)
    images = images[:_limit(len(images), limit)]
    raw_mean = images.astype(np.float64).mean(0, keepdims=True)  # resize is linear
    mean = _np_resize_centre(raw_mean, d.resize_size)[0]
  else:
    import tensorflow as tf
    channels = dataset_info(config).channels
    ds = _tf_examples(config, d.train_split, train=False)
    if limit and limit > 0:
      ds = ds.take(limit)
    ds = ds.map(lambda ex: _tf_decode_resize(ex["image"], config, channels),
                num_parallel_calls=tf.data.AUTOTUNE).batch(256)
    total, count = 0.0, 0
    try:
      for batch in ds.as_numpy_iterator():
        total = total + batch.astype(np.float64).sum(0)
        count += batch.shape[0]
    except tf.errors.InvalidArgumentError as e:   # a file changed since the folder scan
      raise ValueError(f"an image of dataset {d.name!r} {d.folder or d.data_dir} could not be "
                       f"decoded for the pixel mean ({str(e).splitlines()[0][:200]}); "
                       "remove or replace it") from None
    mean = total / max(count, 1)
  mean = np.asarray(mean, np.float32)
  if path:
    import jax
    if jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
      tmp = path + f".tmp{os.getpid()}.npy"
      np.save(tmp, mean)
      os.replace(tmp, path)
  return mean


def pixel_mean(config, workdir: str | None) -> np.ndarray:
  """float32 (S, S, C): the centre crop of the training mean (image + mean = 0..255 pixels)."""
  return np.ascontiguousarray(centre_crop(full_pixel_mean(config, workdir),
                                          config.dataset.crop_size))


# ----------------------------------------------------------------------------
# Iterators.
# ----------------------------------------------------------------------------

def single_thread_blas():
  """Context manager: NumPy's BLAS on one thread while XLA computes.

  A guard for host-side NumPy on the prefetch thread beside XLA: OpenBLAS's idle
  workers spin and take XLA's cores.  (The in-memory resize itself uses no BLAS
  any more; when it did, the quickstart trained at 7 steps/s without this guard.)
  """
  return threadpoolctl.threadpool_limits(limits=1, user_api="blas")


def _prefetch(it: Iterator, size: int) -> Iterator:
  """Run ``it`` in a background thread, ``size`` items ahead."""
  if size <= 0:
    yield from it
    return
  q: queue.Queue = queue.Queue(maxsize=size)
  done = object()
  stop = threading.Event()

  def worker():
    try:
      for item in it:
        if stop.is_set():
          return
        q.put(item)
      q.put(done)
    except BaseException as e:  # pylint: disable=broad-except
      q.put(e)

  t = threading.Thread(target=worker, daemon=True)
  t.start()
  try:
    while True:
      item = q.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()


def _process():
  import jax
  return jax.process_index(), jax.process_count()


def steps_per_epoch(config) -> int:
  n = dataset_info(config).num_train
  if n < config.batch_size:
    raise ValueError(f"batch_size={config.batch_size} is larger than the training split "
                     f"({n} examples)")
  return n // config.batch_size


def create_train_iterator(config, workdir: str | None, start_step: int = 0,
                          process_index: int | None = None,
                          process_count: int | None = None) -> Iterator[dict]:
  """Infinite iterator of this process's part of each global training batch.

  Batch ``k`` of the iterator is the batch of step ``start_step + k``; it
  depends only on (config.seed, step), never on interruptions.
  Yields {'image': float32 (B/P, S, S, C), 'label': int32 (B/P,)}.
  """
  if process_index is None:
    process_index, process_count = _process()
  d, batch = config.dataset, config.batch_size
  if batch % process_count:
    raise ValueError(f"batch_size={batch} does not divide by the {process_count} processes")
  local = batch // process_count
  mean = full_pixel_mean(config, workdir)
  if _source_kind(config) == "memory":
    images, labels = _fashion_mnist(d.fashion_mnist_dir, d.train_split)
    n = _limit(len(labels), d.max_train_examples)
    steps_per_epoch = n // batch
    if steps_per_epoch < 1:
      raise ValueError(f"batch_size={batch} is larger than the training split ({n} examples)")

    def gen():
      step = start_step
      perm_epoch, perm = -1, None
      while True:
        epoch, k = divmod(step, steps_per_epoch)
        if epoch != perm_epoch:
          perm_epoch, perm = epoch, np.random.default_rng([config.seed, 0, epoch]).permutation(n)
        idx = perm[k * batch:(k + 1) * batch][process_index * local:(process_index + 1) * local]
        rng = np.random.default_rng([config.seed, 1, step])
        # Draw the global batch's crops, keep this process's: independent of P.
        tops = rng.integers(0, d.resize_size - d.crop_size + 1, batch)
        lefts = rng.integers(0, d.resize_size - d.crop_size + 1, batch)
        flips = (rng.random(batch) < 0.5) & bool(d.random_flip)
        sl = slice(process_index * local, (process_index + 1) * local)
        full = _np_resize_centre(images[idx], d.resize_size) - mean
        out = crops_and_flips(full, d.crop_size, tops[sl], lefts[sl], flips[sl])
        yield {"image": out, "label": labels[idx]}
        step += 1
    return _prefetch(gen(), d.prefetch)
  return _prefetch(_tf_train_iterator(config, mean, start_step, process_index, process_count,
                                      local), 0)


def _tf_train_iterator(config, mean, start_step, process_index, process_count, local):
  """TFDS / folder training batches: one global example order for every process.

  Every process reads the whole split in the same order and shuffles each
  epoch e with seed (seed, e), so all see the same global sequence; example g
  of that sequence (counted from the start of training) is in global batch
  g // B at row g % B, and a process keeps rows [p * B/P, (p + 1) * B/P) of
  every batch (it decodes only those).  Augmentation is keyed on (seed, g), so
  P processes train exactly as one, and a resume skips exactly what was seen.
  """
  import tensorflow as tf
  d = config.dataset
  info = dataset_info(config)
  n, batch = info.num_train, config.batch_size
  steps_per_epoch = n // batch
  base = _tf_examples(config, d.train_split, train=True, read=False).take(n)
  epochs = tf.data.Dataset.range(start_step // steps_per_epoch, 2 ** 62)
  ds = epochs.flat_map(
      lambda e: _shuffled(base, d, n, config.seed, e, steps_per_epoch * batch))
  first_epoch, offset = divmod(start_step, steps_per_epoch)
  ds = ds.enumerate(start=first_epoch * steps_per_epoch * batch).skip(offset * batch)
  if process_count > 1:
    ds = ds.filter(lambda g, ex: (g % batch) // local == process_index)
  mean_t = tf.constant(mean)
  s, channels = d.crop_size, info.channels
  folder = _source_kind(config) == "folder"

  def prep(i, ex):
    seed = tf.stack([tf.cast(config.seed, tf.int64), i])
    encoded = tf.io.read_file(ex["image"]) if folder else ex["image"]
    image = _tf_decode_resize(encoded, config, channels) - mean_t
    image = tf.image.stateless_random_crop(image, (s, s, channels), seed=seed)
    if d.random_flip:
      image = tf.image.stateless_random_flip_left_right(image, seed=seed + 1)
    return {"image": image, "label": tf.cast(ex["label"], tf.int32)}

  opts = tf.data.Options()
  opts.deterministic = True
  ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE).batch(local, drop_remainder=True)
  ds = ds.with_options(opts).prefetch(max(d.prefetch, 1))
  return ds.as_numpy_iterator()


def _shuffled(ds, d, n, seed, epoch, count):
  """Epoch ``epoch`` of ``ds`` (``n`` examples): a deterministic shuffle seeded by (seed, epoch)."""
  import tensorflow as tf
  buf = max(1, min(d.shuffle_buffer, n))
  epoch_seed = tf.cast(seed, tf.int64) * 1_000_003 + epoch
  return ds.shuffle(buf, seed=epoch_seed, reshuffle_each_iteration=False).take(count)


def train_subset(config) -> np.ndarray:
  """The training examples behind ``train_top1_error``: sorted ids (index in the training
  split, within ``max_train_examples``) of min(eval split size, training split size)
  examples drawn without replacement by ``default_rng([config.seed, 2])``."""
  info = dataset_info(config)
  rng = np.random.default_rng([config.seed, 2])
  return np.sort(rng.choice(info.num_train, min(info.num_eval, info.num_train), replace=False))


def create_eval_iterator(config, workdir: str | None, split: str | None = None,
                         batch_size: int | None = None, max_examples: int = -1, *,
                         full_size: bool = False, process_index: int = 0,
                         process_count: int = 1, ids=None) -> Iterator[dict]:
  """Batches of a split in its fixed order; the last one padded with mask False.

  ``ids``: only these examples (sorted distinct indices into the split, e.g.
  ``train_subset``); a TFDS or folder split is then read (not decoded) up to the last id.

  Every process sees the same global batches (``batch_size`` examples) and
  keeps its contiguous slice, so all processes run the same number of steps
  and every example is counted exactly once.
  Yields {'image': float32 (b, S, S, C) mean-subtracted (or (b, R, R, C) if
  ``full_size``, for 10-crop evaluation), 'label': int32 (b,), 'mask': bool (b,),
  'id': int64 (b,)} with b = batch_size / process_count.
  """
  d = config.dataset
  split = split or d.eval_split
  batch_size = batch_size or config.eval_batch_size
  if batch_size % process_count:
    raise ValueError(f"eval batch size {batch_size} does not divide by {process_count} processes")
  local = batch_size // process_count
  lo, hi = process_index * local, (process_index + 1) * local
  limit = max_examples if max_examples and max_examples > 0 else -1
  if split == d.eval_split and d.max_eval_examples > 0:
    limit = d.max_eval_examples if limit < 0 else min(limit, d.max_eval_examples)
  if split == d.train_split and d.max_train_examples > 0:
    limit = d.max_train_examples if limit < 0 else min(limit, d.max_train_examples)
  mean = full_pixel_mean(config, workdir)
  size = d.resize_size if full_size else d.crop_size
  mean_c = centre_crop(mean, size)

  def finish(images, labels, ids):
    n = len(labels)
    pad = batch_size - n
    images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], np.float32)])
    labels = np.concatenate([labels, np.zeros(pad, np.int32)]).astype(np.int32)
    mask = np.arange(batch_size) < n
    ids = np.concatenate([ids, np.full(pad, -1)]).astype(np.int64)
    return {"image": images[lo:hi], "label": labels[lo:hi], "mask": mask[lo:hi], "id": ids[lo:hi]}

  if ids is not None:
    ids = np.asarray(ids, np.int64)
    if ids.ndim != 1 or not len(ids) or np.any(np.diff(ids) <= 0) or ids[0] < 0:
      raise ValueError(f"eval ids must be sorted distinct indices >= 0, got {ids[:10]}...")
  if _source_kind(config) == "memory":
    images, labels = _fashion_mnist(d.fashion_mnist_dir, split)
    n = _limit(len(labels), limit)
    order = np.arange(n) if ids is None else ids[ids < n]

    def gen():
      for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        full = _np_resize_centre(images[idx], d.resize_size)
        yield finish(centre_crop(full, size) - mean_c, labels[idx], idx)
    return _prefetch(gen(), d.prefetch)

  import tensorflow as tf
  channels = dataset_info(config).channels
  folder = _source_kind(config) == "folder"
  ds = _tf_examples(config, split, train=False, read=ids is None)
  if limit > 0:
    ds = ds.take(limit)
  if ids is not None:   # keep the ids (read, not decoded), then read a folder's files
    keep = np.zeros(int(ids[-1]) + 1, bool)
    keep[ids] = True
    keep_t = tf.constant(keep)
    ds = ds.take(len(keep)).enumerate().filter(lambda i, ex: tf.gather(keep_t, i))
    ds = ds.map(lambda i, ex: {"image": tf.io.read_file(ex["image"]) if folder else ex["image"],
                               "label": ex["label"]})
  mean_t = tf.constant(mean_c)

  def prep(ex):
    image = _tf_decode_resize(ex["image"], config, channels)
    off = (d.resize_size - size) // 2
    return image[off:off + size, off:off + size] - mean_t, tf.cast(ex["label"], tf.int32)

  ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(
      max(d.prefetch, 1))

  def gen_tf():
    start = 0
    for images, labels in ds.as_numpy_iterator():
      got = (np.arange(start, start + len(labels)) if ids is None else
             ids[start:start + len(labels)])
      yield finish(images, labels, got)
      start += len(labels)
  return gen_tf()


def load_examples(config, workdir: str | None, *, split: str | None = None, num: int = -1,
                  ids=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(images float32 (N, S, S, C) mean-subtracted centre crops, labels (N,), ids (N,)).

  The first ``num`` examples of ``split`` (all if num <= 0), or exactly the
  examples with these ``ids`` (index in the split; ValueError naming the
  missing ones if the split is shorter).
  """
  split = split or config.dataset.eval_split
  want = None if ids is None else [int(i) for i in ids]
  max_examples = num if want is None else max(want) + 1
  images, labels, got = [], [], []
  for batch in create_eval_iterator(config, workdir, split=split, max_examples=max_examples):
    m = np.asarray(batch["mask"])
    images.append(np.asarray(batch["image"])[m])
    labels.append(np.asarray(batch["label"])[m])
    got.append(np.asarray(batch["id"])[m])
  images, labels, got = (np.concatenate(a) for a in (images, labels, got))
  if want is None:
    keep = slice(None, num if num > 0 else None)
    return images[keep], labels[keep], got[keep]
  index = {int(i): k for k, i in enumerate(got)}
  missing = [i for i in want if i not in index]
  if missing:
    raise ValueError(f"image ids {missing} not in split {split!r} ({len(got)} examples read)")
  sel = [index[i] for i in want]
  return images[sel], labels[sel], got[sel]


# ----------------------------------------------------------------------------
# One image from a file or an array (``zfnet_jax.visualize``).
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class Preprocessing:
  """How an image becomes a model input, as the model was trained.

  The smaller side is resized to ``resize_size`` (R) and the centre R x R square
  kept (``_np_resize_centre``, the in-memory pipeline's resize), then the centre
  ``crop_size`` (S) square; the input is (pixels - mean) / std, pixels in 0..255.
  mean: (S, S, C) per-pixel or (C,) per-channel, in 0..255 units; std: 1 (our
  models: mean-subtracted pixels) or (C,) in 0..255 units (ImageNet-normalised models).
  channels: 1 (an RGB image is converted to grey) or 3 (a grey one to RGB).
  """
  resize_size: int
  crop_size: int
  channels: int
  mean: np.ndarray
  std: float | np.ndarray = 1.0

  def __call__(self, pixels: np.ndarray) -> np.ndarray:
    """uint8 or float pixels (H, W, C) in 0..255 -> float32 (S, S, C) model input."""
    x = np.asarray(pixels, np.float32)
    if x.ndim == 2:
      x = x[..., None]
    if x.ndim != 3 or x.shape[-1] != self.channels:
      raise ValueError(f"image must be (H, W, {self.channels}) pixels, got shape {x.shape}")
    x = _np_resize_centre(x[None], self.resize_size)
    x = centre_crop(x, self.crop_size)[0]
    return ((x - np.asarray(self.mean, np.float32)) /
            np.asarray(self.std, np.float32)).astype(np.float32)

  def display(self, x: np.ndarray) -> np.ndarray:
    """Model inputs (..., S, S, C) -> display pixels in [0, 1]."""
    return np.clip((np.asarray(x, np.float32) * np.asarray(self.std, np.float32) +
                    np.asarray(self.mean, np.float32)) / 255.0, 0.0, 1.0)


def preprocessing(config, pixel_mean: np.ndarray) -> Preprocessing:
  """Our models' preprocessing: ``config.dataset`` sizes, the (S, S, C) training mean."""
  mean = np.asarray(pixel_mean, np.float32)
  return Preprocessing(int(config.dataset.resize_size), int(config.dataset.crop_size),
                       int(mean.shape[-1]), mean)


def read_image(path: str, channels: int) -> np.ndarray:
  """uint8 (H, W, channels) pixels of a JPEG/PNG/... file (EXIF rotation applied,
  converted to grey or RGB); ValueError naming the path if it is missing, not an
  image or corrupt."""
  from PIL import Image, ImageOps, UnidentifiedImageError
  if not os.path.exists(path):
    raise ValueError(f"{path}: no such file")
  if os.path.isdir(path):
    raise ValueError(f"{path}: a folder, not an image file")
  try:
    with Image.open(path) as im:
      im = ImageOps.exif_transpose(im)
      im = im.convert("L" if channels == 1 else "RGB")
      pixels = np.asarray(im, np.uint8)
  except UnidentifiedImageError:
    raise ValueError(f"{path}: not an image (allowed: {', '.join(IMAGE_EXTENSIONS)})") from None
  except (OSError, SyntaxError, ValueError) as e:
    raise ValueError(f"{path}: corrupt or truncated image ({e})") from None
  return pixels.reshape(pixels.shape[0], pixels.shape[1], channels)
