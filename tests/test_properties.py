"""Property-based tests (hypothesis) of the preprocessing: crops, flips, the 10 crops;
and the training iterators' flips counted over many batches.

Images hold a unique index per pixel, so where a crop came from can be read off
its values (independently of how the crop was cut).  The projection API's
property test is tests/test_deconv.py::test_api_arguments_property.
"""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zfnet_jax.data import iterators, preprocessing
from zfnet_jax.training import steps as steps_lib

import helpers

SETTINGS = settings(max_examples=40, deadline=None)


def index_images(n, size, channels=1):
  """(n, size, size, channels) float32: value = ((i * size + row) * size + col) * channels + c."""
  return np.arange(n * size * size * channels, dtype=np.float32).reshape(n, size, size, channels)


@st.composite
def sizes(draw):
  size = draw(st.integers(1, 24))
  return size, draw(st.integers(1, size))


@SETTINGS
@given(sizes(), st.integers(1, 4), st.integers(0, 2**31 - 1), st.booleans())
def test_random_crops_are_windows_inside_the_image(sz, n, seed, flip):
  size, crop = sz
  images = index_images(n, size)
  rng = np.random.default_rng(seed)
  tops, lefts = rng.integers(0, size - crop + 1, (2, n))
  out = preprocessing.crops_and_flips(images, crop, tops, lefts, (rng.random(n) < 0.5) & flip)
  assert out.shape == (n, crop, crop, 1)
  for i in range(n):
    first = int(out[i].min()) - i * size * size        # the window's top-left pixel
    top, left = divmod(first, size)
    assert 0 <= top <= size - crop and 0 <= left <= size - crop
    window = images[i, top:top + crop, left:left + crop]
    mirrored = np.array_equal(out[i], window[:, ::-1])
    assert np.array_equal(out[i], window) or (flip and mirrored)


@SETTINGS
@given(sizes(), st.integers(0, 23), st.integers(0, 23), st.booleans())
def test_device_crop_is_the_window_and_flip_is_an_involution(sz, top, left, flip):
  size, crop = sz
  top, left = top % (size - crop + 1), left % (size - crop + 1)
  x = index_images(2, size, channels=2)
  got = np.asarray(steps_lib._crop(x, top, left, crop, flip))
  ref = x[:, top:top + crop, left:left + crop]
  np.testing.assert_array_equal(got, ref[:, :, ::-1] if flip else ref)
  # Flipping twice gives the crop back; flipping once reverses every row.
  twice = np.asarray(steps_lib._crop(steps_lib._crop(x, top, left, crop, True), 0, 0, crop, True))
  np.testing.assert_array_equal(twice, ref)
  once = np.asarray(steps_lib._crop(x, top, left, crop, True))
  for j in range(crop):
    np.testing.assert_array_equal(once[:, :, j], ref[:, :, crop - 1 - j])


@SETTINGS
@given(sizes())
def test_ten_crops_are_the_papers(sz):
  """4 corners + centre, each also mirrored: 10 windows inside the image."""
  size, crop = sz
  crops = preprocessing.ten_crop_offsets(size, crop)
  assert len(crops) == 10
  e = size - crop
  plain = [(t, l) for t, l, f in crops if not f]
  mirrored = [(t, l) for t, l, f in crops if f]
  assert sorted(plain) == sorted(mirrored)              # each crop also flipped
  assert all(0 <= t <= e and 0 <= l <= e for t, l in plain)
  rest = list(plain)
  for corner in ((0, 0), (0, e), (e, 0), (e, e)):         # each touches two borders
    rest.remove(corner)
  (t, l), = rest                                          # and the centre: equal margins
  assert abs(t - (e - t)) <= 1 and abs(l - (e - l)) <= 1 and abs(t - l) == 0


@SETTINGS
@given(sizes())
def test_centre_crop_has_equal_margins(sz):
  size, crop = sz
  x = index_images(1, size)
  out = preprocessing.centre_crop(x, crop)
  top, left = divmod(int(out.min()), size)
  assert top == left and abs(top - (size - crop - top)) <= 1
  np.testing.assert_array_equal(out, x[:, top:top + crop, left:left + crop])


def flipped(batch, originals):
  """(B,) bool: which images of ``batch`` (B, H, W, C) are an image of ``originals`` mirrored
  left-right; every one must be an original (up to float rounding), as it is or mirrored."""
  def distance(refs):
    diff = np.abs(batch[:, None] - refs[None]).reshape(len(batch), len(refs), -1)
    return diff.max(-1).min(1)
  plain, mirrored = distance(originals), distance(originals[:, :, ::-1])
  assert (np.minimum(plain, mirrored) < 1e-2).all()
  return mirrored < plain


def flip_batches(source, tmp_path, random_flip=True):
  """(batches of one training source with crop = full image, its unflipped images)."""
  if source == "memory":         # Fashion-MNIST IDX: 64 training images, batches of 32
    raw = helpers.make_fmnist(str(tmp_path), n_train=64, n_test=8)["train"][0]
    config = helpers.fmnist_config(str(tmp_path), resize=28, crop=28, batch=32)
    z = raw.astype(np.float64) - raw.mean(0)             # mean-subtracted, then flipped
    originals, steps = z[..., None], 50
  else:                          # an image folder read by tf.data: 48 images, batches of 16
    helpers.make_multihost_data("folder", str(tmp_path))
    config = helpers.multihost_config("folder", str(tmp_path))
    config.dataset.resize_size = config.dataset.crop_size = 36
    config.batch_size, steps = 16, 30
    originals = np.concatenate([b["image"][b["mask"]] for b in iterators.create_eval_iterator(
        config, None, split="train", batch_size=16)])     # centre crops = whole images
  config.dataset.random_flip = random_flip
  it = iterators.create_train_iterator(config, None)
  return [b["image"] for b in itertools.islice(it, steps)], originals


@pytest.mark.parametrize("source", ["memory", "folder"])
def test_training_flips_half_the_images(source, tmp_path):
  """Each batch has flipped and unflipped images; over all batches the rate is 1/2 within
  4 standard deviations; random_flip=False flips none."""
  batches, originals = flip_batches(source, tmp_path)
  flips = np.stack([flipped(b, originals) for b in batches])
  n = flips.size
  assert all(0 < f.sum() < len(f) for f in flips), flips.sum(1)
  assert abs(flips.mean() - 0.5) < 4 * np.sqrt(0.25 / n), (flips.mean(), n)
  batches, originals = flip_batches(source, tmp_path / "off", random_flip=False)
  assert not any(flipped(b, originals).any() for b in batches)
