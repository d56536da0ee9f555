"""Input pipeline: IDX reader, preprocessing, determinism, eval padding, folders, errors."""
import gzip
import os

import jax
import numpy as np
import pytest
from PIL import Image

from zfnet_jax import configs
from zfnet_jax.data import iterators, preprocessing, sources

from helpers import fmnist_config, make_fmnist


@pytest.fixture
def fmnist(tmp_path):
  data = make_fmnist(tmp_path / "fm")
  sources._fashion_mnist.cache_clear()
  yield tmp_path / "fm", data
  sources._fashion_mnist.cache_clear()


def test_idx_reader_round_trip_and_truncation(fmnist, tmp_path):
  directory, data = fmnist
  path = os.path.join(directory, "train-images-idx3-ubyte.gz")
  np.testing.assert_array_equal(sources.read_idx(path), data["train"][0])
  raw = gzip.open(path).read()
  cut = str(tmp_path / "cut.gz")
  with gzip.open(cut, "wb") as f:
    f.write(raw[:-100])
  with pytest.raises(ValueError, match="truncated"):
    sources.read_idx(cut)
  with open(path, "rb") as f:  # a gzip stream cut short
    blob = f.read()
  with open(cut, "wb") as f:
    f.write(blob[:len(blob) // 2])
  with pytest.raises(ValueError, match="cut.gz"):
    sources.read_idx(cut)


def test_fashion_mnist_missing_names_both_routes(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds
  def no_download(*a, **k):
    raise ConnectionError("no network in tests")
  monkeypatch.setattr(tfds, "load", no_download)
  sources._fashion_mnist.cache_clear()
  c = fmnist_config(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError) as e:
    sources.dataset_info(c)
  msg = str(e.value)
  assert "train-images-idx3-ubyte.gz" in msg and "dataset-fashion-mnist" in msg
  assert "TFDS" in msg and "fashion_mnist" in msg
  sources._fashion_mnist.cache_clear()


def test_pixel_mean_matches_resized_images(fmnist, tmp_path):
  directory, data = fmnist
  c = fmnist_config(directory)
  info = sources.dataset_info(c)
  assert (info.num_classes, info.channels, info.input_size, info.num_train, info.num_eval) == \
      (10, 1, 10, 40, 10)
  wd = str(tmp_path / "wd")
  full = iterators.full_pixel_mean(c, wd)
  # Reference: resize each image on its own with jax.image.resize, then average.
  imgs = data["train"][0].astype(np.float32)
  ref = np.mean([np.asarray(jax.image.resize(x, (12, 12), "linear")) for x in imgs], 0)
  np.testing.assert_allclose(full[..., 0], ref, atol=1e-3)
  assert os.path.exists(os.path.join(wd, "pixel_mean.npy"))
  np.testing.assert_allclose(iterators.pixel_mean(c, wd)[..., 0], ref[1:11, 1:11], atol=1e-3)
  # Reused from the workdir: a changed file is what comes back.
  np.save(os.path.join(wd, "pixel_mean.npy"), full + 1)
  np.testing.assert_allclose(iterators.full_pixel_mean(c, wd), full + 1)


@pytest.mark.parametrize("size", [64, 12])   # upsampling (the quickstart) and downsampling
def test_resize_is_independent_of_the_batch(size):
  """The same image resized alone, in batches of any size and in any order: bit-identical."""
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (33, 28, 28, 1), dtype=np.uint8)
  alone = np.stack([preprocessing._np_resize_centre(x[None], size)[0] for x in images])
  for batch in (2, 4, 8, 16, 33):
    perm = rng.permutation(len(images))
    for start in range(0, len(images), batch):
      idx = perm[start:start + batch]
      np.testing.assert_array_equal(preprocessing._np_resize_centre(images[idx], size), alone[idx])
  # And it is jax.image.resize's linear resize (an independent implementation).
  ref = np.asarray(jax.image.resize(images[:4].astype(np.float32), (4, size, size, 1), "linear"))
  np.testing.assert_allclose(alone[:4], ref, rtol=1e-5, atol=1e-3)


def test_train_batches_deterministic_resumable_and_split_by_process(fmnist, tmp_path):
  directory, data = fmnist
  c = fmnist_config(directory)
  wd = str(tmp_path / "wd")
  it = iterators.create_train_iterator(c, wd, 0, 0, 1)
  batches = [next(it) for _ in range(7)]   # 5 steps per epoch: crosses an epoch
  resumed = iterators.create_train_iterator(c, wd, 3, 0, 1)
  for k in range(3, 7):
    b = next(resumed)
    np.testing.assert_array_equal(b["image"], batches[k]["image"])
    np.testing.assert_array_equal(b["label"], batches[k]["label"])
  # Each epoch's 5 batches hold 40 distinct examples' labels.
  epoch_labels = np.concatenate([b["label"] for b in batches[:5]])
  np.testing.assert_array_equal(np.sort(epoch_labels), np.sort(data["train"][1][:40]))
  # Two processes each get a contiguous half of the same global batch.
  halves = [next(iterators.create_train_iterator(c, wd, 2, p, 2)) for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]),
                                batches[2]["image"])
  assert batches[0]["image"].shape == (8, 10, 10, 1) and batches[0]["label"].dtype == np.int32


def test_train_crops_are_windows_of_the_mean_subtracted_image(fmnist, tmp_path):
  directory, data = fmnist
  c = fmnist_config(directory, resize=14, crop=9)
  c.dataset.max_train_examples = 8  # one batch per epoch: batch 0 is a permutation
  wd = str(tmp_path / "wd")
  full = preprocessing._np_resize_centre(data["train"][0][:8, ..., None], 14) - iterators.full_pixel_mean(c, wd)
  b = next(iterators.create_train_iterator(c, wd, 0, 0, 1))
  for img, lab in zip(b["image"], b["label"]):
    found = False
    for src in full:
      for cand in (src, src[:, ::-1]):
        for t in range(6):
          for l in range(6):
            if np.allclose(cand[t:t + 9, l:l + 9], img, atol=1e-4):
              found = True
    assert found


def test_ten_crops_are_the_papers():
  crops = preprocessing.ten_crop_offsets(256, 224)
  assert len(crops) == 10 and len(set(crops)) == 10
  corners = {(0, 0), (0, 32), (32, 0), (32, 32)}
  for flip in (False, True):
    assert {(t, l) for t, l, f in crops if f == flip} == corners | {(16, 16)}


@pytest.mark.parametrize("processes", [1, 2])
def test_eval_counts_every_example_once_with_uneven_last_batch(fmnist, tmp_path, processes):
  directory, data = fmnist
  c = fmnist_config(directory)
  wd = str(tmp_path / "wd")
  seen, labels = [], []
  for p in range(processes):
    for b in iterators.create_eval_iterator(c, wd, batch_size=4, process_index=p,
                                     process_count=processes):
      assert b["image"].shape == (4 // processes, 10, 10, 1)
      assert b["image"].dtype == np.float32 and b["mask"].dtype == bool
      seen += list(b["id"][b["mask"]])
      labels += list(b["label"][b["mask"]])
      assert np.all(b["id"][~b["mask"]] == -1)
  assert sorted(seen) == list(range(10))   # 10 examples in batches of 4: 4, 4, 2 + padding
  np.testing.assert_array_equal(np.array(labels)[np.argsort(seen)], data["test"][1])
  # Values: centre crop of the resized image minus the mean.
  b = next(iterators.create_eval_iterator(c, wd, batch_size=4))
  ref = np.asarray(jax.image.resize(data["test"][0][0].astype(np.float32), (12, 12), "linear"))
  np.testing.assert_allclose(b["image"][0, ..., 0] + iterators.pixel_mean(c, wd)[..., 0], ref[1:11, 1:11],
                             atol=1e-3)
  assert sum(b["mask"].sum() for b in iterators.create_eval_iterator(c, wd, batch_size=4,
                                                              max_examples=6)) == 6


def _folder(root, corrupt=True):
  rng = np.random.default_rng(0)
  for cls in ("cat", "dog"):
    os.makedirs(root / cls)
    for i in range(5):
      Image.fromarray(rng.integers(0, 256, (20 + i, 16, 3), dtype=np.uint8)).save(
          root / cls / f"{i}.png")
  if corrupt:
    (root / "dog" / "broken.jpg").write_bytes(b"not an image")


def test_folder_dataset_skips_or_stops_on_corrupt(tmp_path):
  _folder(tmp_path / "imgs")
  c = configs.default_config()
  c.dataset.name = "folder"
  c.dataset.folder = str(tmp_path / "imgs")
  c.dataset.eval_split = "validation"
  c.dataset.folder_eval_fraction = 0.2
  c.dataset.resize_size, c.dataset.crop_size = 16, 12
  c.batch_size = 4
  info = sources.dataset_info(c)
  assert info.class_names == ("cat", "dog") and info.channels == 3
  assert (info.num_train, info.num_eval) == (8, 2)  # the corrupt file skipped
  assert sources._folder_split(c, "train")[3] == 1
  b = next(iterators.create_train_iterator(c, str(tmp_path / "wd"), 0, 0, 1))
  assert b["image"].shape == (4, 12, 12, 3)
  ev = list(iterators.create_eval_iterator(c, str(tmp_path / "wd"), batch_size=4))
  assert sum(x["mask"].sum() for x in ev) == 2
  c.dataset.on_corrupt = "stop"
  with pytest.raises(ValueError, match="broken.jpg"):
    sources.dataset_info(c)


def test_folder_with_one_class_is_an_error(tmp_path):
  os.makedirs(tmp_path / "one" / "only")
  c = configs.default_config()
  c.dataset.name, c.dataset.folder = "folder", str(tmp_path / "one")
  with pytest.raises(ValueError, match="only"):
    sources.dataset_info(c)


def test_missing_imagenet_tarballs_named(tmp_path):
  c = configs.default_config()
  c.dataset.name = "imagenet2012"
  c.dataset.data_dir = str(tmp_path / "tfds")
  c.dataset.manual_dir = str(tmp_path / "manual")
  with pytest.raises(FileNotFoundError) as e:
    sources.dataset_info(c)
  msg = str(e.value)
  assert "ILSVRC2012_img_train.tar" in msg and "ILSVRC2012_img_val.tar" in msg
  assert str(tmp_path / "manual") in msg


def test_preprocessing_matches_an_independent_resize_and_converts_channels(tmp_path):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
  Image.fromarray(rgb).save(tmp_path / "c.png")
  grey = preprocessing.read_image(str(tmp_path / "c.png"), 1)
  assert grey.shape == (30, 50, 1) and grey.dtype == np.uint8
  ref_grey = np.asarray(Image.fromarray(rgb).convert("L"))[..., None]   # PIL's luminance
  np.testing.assert_array_equal(grey, ref_grey)
  assert preprocessing.read_image(str(tmp_path / "c.png"), 3).shape == (30, 50, 3)
  mean = rng.normal(100, 10, (16, 16, 3)).astype(np.float32)
  prep = preprocessing.Preprocessing(20, 16, 3, mean, std=np.array([2.0, 4.0, 8.0]))
  x = prep(rgb)
  # Reference: smaller side to 20 (30x50 -> 20x33) with jax.image.resize, centre 20x20, centre 16.
  big = np.asarray(jax.image.resize(rgb.astype(np.float32), (20, 33, 3), "linear"))
  ref = big[:, 6:26][2:18, 2:18]
  np.testing.assert_allclose(x, (ref - mean) / np.array([2.0, 4.0, 8.0]), atol=1e-3)
  np.testing.assert_allclose(prep.display(x), np.clip(ref / 255, 0, 1), atol=1e-5)


def test_preprocessing_of_a_config_takes_its_sizes_and_the_training_mean():
  c = configs.default_config()
  c.dataset.resize_size, c.dataset.crop_size = 40, 32
  mean = np.random.default_rng(0).normal(100, 5, (32, 32, 3)).astype(np.float32)
  prep = preprocessing.preprocessing(c, mean)
  assert (prep.resize_size, prep.crop_size, prep.channels, prep.std) == (40, 32, 3, 1.0)
  np.testing.assert_array_equal(prep.mean, mean)

