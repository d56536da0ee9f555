"""The CPU convolution routing of zfnet_jax/xla.py: same maths, other kernels.

Convolutions compiled with ``xla.CPU_COMPILER_OPTIONS`` (what every function
the package compiles carries, ``xla.jit``) must not go to YNNPACK, and their value
and VJPs must equal NumPy loop references -- the input VJP being the
transposed convolution is what the deconvnet's "filter" step relies on.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from zfnet_jax import xla

DN = ("NHWC", "HWIO", "NHWC")
GEOMETRIES = [  # (input side, kernel, stride, (pad_lo, pad_hi)) as in the layer table
    (9, 3, 2, (0, 1)),   # conv1-like: stride 2, extra bottom/right padding
    (8, 3, 1, (1, 1)),   # conv3-like
    (11, 5, 2, (0, 0)),  # conv2-like
]


def np_conv(x, w, s, pad):
  """Direct convolution: y[b,i,j,o] = sum x_pad[b, i*s+di, j*s+dj, c] w[di,dj,c,o]."""
  k = w.shape[0]
  xp = np.pad(x, ((0, 0), pad, pad, (0, 0)))
  n = (xp.shape[1] - k) // s + 1
  y = np.zeros((x.shape[0], n, n, w.shape[3]))
  for i in range(n):
    for j in range(n):
      patch = xp[:, i * s:i * s + k, j * s:j * s + k, :]
      y[:, i, j] = np.einsum("bhwc,hwco->bo", patch, w)
  return y


def np_conv_vjp(x, w, g, s, pad):
  """(dx, dw) of np_conv by scattering every output's cotangent back."""
  k = w.shape[0]
  xp = np.pad(x, ((0, 0), pad, pad, (0, 0)))
  dxp, dw = np.zeros_like(xp), np.zeros_like(w)
  for i in range(g.shape[1]):
    for j in range(g.shape[2]):
      patch = xp[:, i * s:i * s + k, j * s:j * s + k, :]
      dxp[:, i * s:i * s + k, j * s:j * s + k, :] += np.einsum("bo,hwco->bhwc", g[:, i, j], w)
      dw += np.einsum("bhwc,bo->hwco", patch, g[:, i, j])
  n = x.shape[1]
  return dxp[:, pad[0]:pad[0] + n, pad[0]:pad[0] + n], dw


def _fns(s, pad, options):
  f = lambda x, w: lax.conv_general_dilated(x, w, (s, s), (pad, pad), dimension_numbers=DN)
  fwd = jax.jit(f, compiler_options=options)
  vjp = jax.jit(lambda x, w, g: jax.vjp(f, x, w)[1](g), compiler_options=options)
  return fwd, vjp


@pytest.mark.parametrize("size,k,s,pad", GEOMETRIES)
def test_routed_conv_matches_numpy(size, k, s, pad):
  rng = np.random.default_rng(size)
  x = rng.normal(size=(2, size, size, 3))
  w = rng.normal(size=(k, k, 3, 4))
  fwd, vjp = _fns(s, pad, xla.CPU_COMPILER_OPTIONS)
  want = np_conv(x, w, s, pad)
  got = fwd(jnp.float32(x), jnp.float32(w))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  g = rng.normal(size=want.shape)
  dx, dw = vjp(jnp.float32(x), jnp.float32(w), jnp.float32(g))
  want_dx, want_dw = np_conv_vjp(x, w, g, s, pad)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dw, want_dw, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU kernels only")
def test_options_route_convolutions_away_from_ynnpack():
  # (YNNPACK takes only convolutions big enough: 64 channels.)
  x, w = jnp.ones((2, 13, 13, 64)), jnp.ones((3, 3, 64, 64))
  g = jnp.ones((2, 6, 6, 64))
  texts = {}
  for name, opts in [("fast", xla.CPU_COMPILER_OPTIONS),
                     ("default", xla.DEFAULT_CPU_COMPILER_OPTIONS)]:
    fwd, vjp = _fns(2, (0, 1), opts)
    texts[name] = (fwd.lower(x, w).compile().as_text() + vjp.lower(x, w, g).compile().as_text())
  assert "__ynn_fusion" not in texts["fast"]
  assert "convolution(" in texts["fast"]
  if xla._jaxlib_version() in xla.KNOWN_JAXLIB:  # pylint: disable=protected-access
    assert "__ynn_fusion" in texts["default"]  # the option is what makes the difference


_CHILD = """
import os, sys, json
before = os.environ.get("XLA_FLAGS")
import zfnet_jax
from zfnet_jax import xla
import jax, jax.numpy as jnp
from jax import lax
f = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
args = jnp.ones((2, 13, 13, 64)), jnp.ones((3, 3, 64, 64))
ours = xla.jit(f).lower(*args).compile().as_text()       # how the package compiles
theirs = jax.jit(f).lower(*args).compile().as_text()      # a user's own jit
print(json.dumps({"flags_unchanged": os.environ.get("XLA_FLAGS") == before,
                  "ours_ynn": "__ynn_fusion" in ours, "theirs_ynn": "__ynn_fusion" in theirs,
                  "options": xla.compiler_options(), "n": jax.local_device_count()}))
"""


def _child(env_updates):
  """What a plain script gets: no set-up call, nothing in XLA_FLAGS but ``env_updates``."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla.OPT_OUT)}
  env.update(env_updates, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                       text=True, timeout=120, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(xla._jaxlib_version() not in xla.KNOWN_JAXLIB,  # pylint: disable=protected-access
                    reason="options only given for measured jaxlib versions")
def test_package_functions_carry_the_options_however_called():
  plain = _child({})
  assert plain["flags_unchanged"] and plain["n"] == 1        # nothing process-wide
  assert plain["options"] == xla.CPU_COMPILER_OPTIONS
  assert not plain["ours_ynn"] and plain["theirs_ynn"]       # ours routed, the user's own not
  off = _child({xla.OPT_OUT: "1"})
  assert off["options"] is None and off["ours_ynn"]
  user = _child({"XLA_FLAGS": f"--{xla.FLAG}={xla.DEFAULT_VALUE}"})
  assert user["options"] is None and user["ours_ynn"]         # the user's own setting wins


_DEVICES_CHILD = """
import json, os, sys
from zfnet_jax import xla
n = xla.set_host_devices(int(sys.argv[1]))
import jax
jax.devices()
try:
  xla.set_host_devices(2)
  late = None
except ValueError as e:
  late = str(e)
print(json.dumps({"flags": os.environ.get("XLA_FLAGS", ""), "n": jax.local_device_count(),
                  "returned": n, "late": late}))
"""


@pytest.mark.parametrize("asked,user,want", [(1, "", 1), (3, "", 3), (2, "5", 5)])
def test_host_devices_are_opt_in_and_the_users_count_wins(asked, user, want):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla.OPT_OUT)}
  env.update(JAX_PLATFORMS="cpu")
  if user:
    env["XLA_FLAGS"] = f"--{xla.DEVICES_FLAG}={user}"
  got = json.loads(subprocess.run(
      [sys.executable, "-c", _DEVICES_CHILD, str(asked)], env=env, capture_output=True,
      text=True, timeout=120, check=True).stdout.strip().splitlines()[-1])
  assert got["n"] == got["returned"] == want
  assert got["flags"].count(xla.DEVICES_FLAG) == (0 if want == 1 else 1)
  if not user:
    assert "JAX has started already" in got["late"]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_host_devices_refuse_a_bad_count(bad):
  with pytest.raises(ValueError, match=r"cpu_host_devices=.*allowed: a positive int"):
    xla.set_host_devices(bad)


def test_nan_propagating_options_let_nan_reach_every_maximum():
  # conv 5x5 valid -> bias + ReLU -> 2x2/2 max-pool (which XLA turns into a reduction)
  # on images with a NaN column: the pool's maximum must be NaN exactly in the windows
  # that hold a NaN.  (With the process's default options, jaxlib 0.10's YNNPACK gave
  # finite maxima there.)
  x = np.zeros((3, 32, 32, 1), np.float32)
  for i, c in enumerate([0, 1, 5]):
    x[i, :, c, :] = np.nan
  w = np.random.default_rng(0).normal(0, 0.1, (5, 5, 1, 4)).astype(np.float32)

  def f(a):
    y = lax.conv_general_dilated(a, w, (1, 1), "VALID", dimension_numbers=DN)
    r = jax.nn.relu(y + 0.05)
    return r, lax.reduce_window(r, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
  r, got = jax.jit(f, compiler_options=xla.nan_propagating_options())(jnp.asarray(x))
  want_r = np.isnan(np_conv(x, w, 1, (0, 0)))          # NaN where a window reads the column
  np.testing.assert_array_equal(np.isnan(np.asarray(r)), want_r)
  want = want_r.reshape(3, 14, 2, 14, 2, 4).any(axis=(2, 4))
  assert want.any()
  np.testing.assert_array_equal(np.isnan(np.asarray(got)), want)
