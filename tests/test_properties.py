"""Property-based tests (hypothesis) of the preprocessing: crops, flips, the 10 crops.

Images hold a unique index per pixel, so where a crop came from can be read off
its values (independently of how the crop was cut).  The projection API's
property test is tests/test_deconv.py::test_api_arguments_property.
"""
import numpy as np
from hypothesis import given, settings, strategies as st

from zfnet_jax import input_pipeline as ip, train

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
  out = ip.random_crops_and_flips(images, crop, np.random.default_rng(seed), flip=flip)
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
  got = np.asarray(train._crop(x, top, left, crop, flip))
  ref = x[:, top:top + crop, left:left + crop]
  np.testing.assert_array_equal(got, ref[:, :, ::-1] if flip else ref)
  # Flipping twice gives the crop back; flipping once reverses every row.
  twice = np.asarray(train._crop(train._crop(x, top, left, crop, True), 0, 0, crop, True))
  np.testing.assert_array_equal(twice, ref)
  once = np.asarray(train._crop(x, top, left, crop, True))
  for j in range(crop):
    np.testing.assert_array_equal(once[:, :, j], ref[:, :, crop - 1 - j])


@SETTINGS
@given(sizes())
def test_ten_crops_are_the_papers(sz):
  """4 corners + centre, each also mirrored: 10 windows inside the image."""
  size, crop = sz
  crops = ip.ten_crop_offsets(size, crop)
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
  out = ip.centre_crop(x, crop)
  top, left = divmod(int(out.min()), size)
  assert top == left and abs(top - (size - crop - top)) <= 1
  np.testing.assert_array_equal(out, x[:, top:top + crop, left:left + crop])
