"""Batches for training and evaluation, and the pixel mean of the training split.

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

import os
import queue
import threading
from typing import Iterator

import numpy as np
import threadpoolctl

from zfnet_jax import rundir
from zfnet_jax.data.preprocessing import _np_resize_centre, centre_crop, crops_and_flips
from zfnet_jax.data.sources import (
  _fashion_mnist,
  _limit,
  _source_kind,
  _tf_decode_resize,
  _tf_examples,
  dataset_info,
)

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
  size = d.resize_size if full_size else d.crop_size
  mean_c = centre_crop(full_pixel_mean(config, workdir), size)
  if ids is not None:
    ids = np.asarray(ids, np.int64)
    if ids.ndim != 1 or not len(ids) or np.any(np.diff(ids) <= 0) or ids[0] < 0:
      raise ValueError(f"eval ids must be sorted distinct indices >= 0, got {ids[:10]}...")
  pad = lambda b: _padded(*b, batch_size, lo, hi)
  if _source_kind(config) == "memory":
    images, labels = _fashion_mnist(d.fashion_mnist_dir, split)
    n = _limit(len(labels), limit)
    order = np.arange(n) if ids is None else ids[ids < n]

    def gen():
      for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        full = _np_resize_centre(images[idx], d.resize_size)
        yield pad((centre_crop(full, size) - mean_c, labels[idx], idx))
    return _prefetch(gen(), d.prefetch)
  return map(pad, _tf_eval_batches(config, split, limit, ids, size, mean_c, batch_size))


def _padded(images, labels, ids, batch_size: int, lo: int, hi: int) -> dict:
  """One global eval batch padded to ``batch_size`` (mask False), this process's rows."""
  n = len(labels)
  pad = batch_size - n
  images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], np.float32)])
  labels = np.concatenate([labels, np.zeros(pad, np.int32)]).astype(np.int32)
  mask = np.arange(batch_size) < n
  ids = np.concatenate([ids, np.full(pad, -1)]).astype(np.int64)
  return {"image": images[lo:hi], "label": labels[lo:hi], "mask": mask[lo:hi], "id": ids[lo:hi]}


def _tf_eval_batches(config, split, limit, ids, size, mean_c, batch_size):
  """(images, labels, ids) of a TFDS or folder split through tf.data; the dataset is
  built now (errors come at once), read as the result is iterated."""
  import tensorflow as tf
  d = config.dataset
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
      yield images, labels, got
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

