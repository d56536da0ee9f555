"""What several test modules share: fake data, small configs, NumPy references, a plain CNN.

No test module imports another test module; they import this one.
"""
import contextlib
import gzip
import itertools
import json
import os
import shutil
import struct
import subprocess
import sys
import sysconfig
import textwrap
import time
import zipfile

import flax.linen as nn
import jax
import numpy as np

from zfnet_jax import configs, deconv
from zfnet_jax.data import iterators, sources
from zfnet_jax.nn import geometry

# -- fake Fashion-MNIST IDX files ----------------------------------------------

def write_idx(path, array):
  """Write uint8 ``array`` as a gzipped IDX file (independent of the reader)."""
  header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def make_fmnist(directory, n_train=40, n_test=10, seed=0):
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  out = {}
  for split, n in (("train", n_train), ("test", n_test)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    img_file, lab_file = sources.FASHION_MNIST_FILES[split]
    write_idx(os.path.join(directory, img_file), images)
    write_idx(os.path.join(directory, lab_file), labels)
    out[split] = (images, labels)
  return out


def fmnist_config(directory, resize=12, crop=10, batch=8):
  c = configs.default_config()
  c.dataset.name = "fashion_mnist_idx"
  c.dataset.fashion_mnist_dir = str(directory)
  c.dataset.eval_split = "test"
  c.dataset.resize_size = resize
  c.dataset.crop_size = crop
  c.dataset.prefetch = 1
  c.batch_size = batch
  return c


# -- small configs ----------------------------------------------------------------

def small_config(fmnist_dir, steps=3, batch=8):
  c = configs.default_config()
  c.model.name = "ZFNetLowRes"
  c.model.conv_features = (4, 8, 8, 8, 8)
  c.model.fc_features = 16
  c.model.kernel_init_std = 0.05
  c.model.dropout_rate = 0.0
  c.dataset.name = "fashion_mnist_idx"
  c.dataset.fashion_mnist_dir = fmnist_dir
  c.dataset.eval_split = "test"
  c.dataset.resize_size, c.dataset.crop_size = 36, 32
  c.dataset.prefetch = 0
  c.batch_size = batch
  c.num_train_steps = steps
  c.learning_rate = 1e-3
  c.schedule = "constant"
  c.eval_every_epochs = 0.0
  c.eval_batch_size = 8
  c.ten_crop_eval = False
  c.evolution_epochs = ()
  c.log_every_steps = 1
  c.report.enabled = False
  return c


def tiny_config():
  """ZFNetLowRes with narrow widths on a 1024-image Fashion-MNIST subset (48 steps)."""
  c = configs.default_config()
  c.model.name = "ZFNetLowRes"
  c.model.conv_features = (8, 16, 16, 16, 16)
  c.model.fc_features = 32
  c.model.kernel_init_std = 0.03
  c.model.dropout_rate = 0.0
  c.dataset.name = "fashion_mnist_idx"
  c.dataset.eval_split = "test"
  c.dataset.resize_size = 64
  c.dataset.crop_size = 64
  c.dataset.max_train_examples = 1024
  c.dataset.max_eval_examples = 256
  c.batch_size = 64
  c.num_epochs = 3.0
  c.optimizer = "adam"                 # the quickstart's recipe: learns in a few dozen steps
  c.learning_rate = 3e-3
  c.weight_decay = 0.0
  c.schedule = "cosine"
  c.eval_batch_size = 128
  c.evolution_epochs = (1, 2, 3)
  c.evolution_reference_epochs = 0.0
  c.checkpoint_every_steps = 1000
  c.log_every_steps = 16
  c.report.enabled = False
  c.analyses.evolution.tensorboard_every_steps = 24  # Fig. 4 panels live in TensorBoard
  return c


RELIABILITY_STEPS, RELIABILITY_EVERY = 24, 4


def reliability_config(fmnist_dir, steps=RELIABILITY_STEPS):
  """small_config with dropout, a larger rate and frequent checkpoints (kill/resume tests)."""
  c = small_config(fmnist_dir, steps)
  c.model.dropout_rate = 0.5          # the dropout key must survive the restart too
  c.learning_rate = 1e-2
  c.checkpoint_every_steps = RELIABILITY_EVERY
  c.keep_checkpoints = 2
  return c


# -- the three data paths, for multi-process tests ------------------------------------

def make_multihost_data(path, directory):
  """Fake data for ``path`` ("memory", "folder", "tfds"); returns what multihost_config needs."""
  os.makedirs(directory, exist_ok=True)
  if path == "memory":
    make_fmnist(directory, n_train=64, n_test=23)
  elif path == "folder":
    from PIL import Image  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("validation", 5)):
      for cls in ("a", "b", "c"):
        os.makedirs(os.path.join(directory, split, cls), exist_ok=True)
        for i in range(n):
          Image.fromarray(rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)).save(
              os.path.join(directory, split, cls, f"{i}.png"))
  return directory


def multihost_config(path, directory, steps=3):
  """small_config on ``path``'s data, with dropout and random crops (so every step's
  examples and augmentations matter) and a checkpoint mid-run."""
  c = small_config(directory, steps)
  c.model.dropout_rate = 0.5
  c.learning_rate = 1e-2
  c.checkpoint_every_steps = 2
  if path == "folder":
    c.dataset.name, c.dataset.folder = "folder", directory
  elif path == "tfds":
    c.dataset.name, c.dataset.data_dir = "mnist", directory
    c.dataset.max_train_examples, c.dataset.shuffle_buffer = 48, 16
  if path != "memory":
    c.dataset.eval_split = "validation" if path == "folder" else "test"
    c.dataset.max_eval_examples = 11
  return c


def _mock_mnist(self, split, decoders=None, read_config=None, shuffle_files=False):
  """Deterministic fake MNIST (the same in every process): a seeded generator per split."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  del self, decoders, read_config, shuffle_files
  n = 64 if str(split).startswith("train") else 11
  rng = np.random.default_rng(len(str(split)))
  images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, n).astype(np.int64)
  ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
  if "[:" in str(split):
    ds = ds.take(int(str(split).split("[:")[1].rstrip("]")))
  return ds


def multihost_data(path):
  """A context: TFDS mock data for "tfds" (no download), nothing otherwise."""
  if path != "tfds":
    return contextlib.nullcontext()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.testing.mock_data(num_examples=64, as_dataset_fn=_mock_mnist)


def slow_down_training(delay):
  """Make every training batch take ``delay`` s longer (so a kill lands mid-run)."""
  make = iterators.create_train_iterator

  def slow(*args, **kwargs):
    for batch in make(*args, **kwargs):
      time.sleep(delay)
      yield batch
  iterators.create_train_iterator = slow


# -- NumPy references of the layers ------------------------------------------------

def np_conv(x, w, b, s, p):
  """cuda-convnet convolution: pad p top/left, whatever the last window needs bottom/right."""
  n, k = x.shape[0], w.shape[0]
  out = 1 + -(-(2 * p + n - k) // s)
  hi = max((out - 1) * s + k - n - p, 0)
  xp = np.pad(x, ((p, hi), (p, hi), (0, 0)))
  y = np.zeros((out, out, w.shape[3]))
  for i, j in itertools.product(range(out), range(out)):
    y[i, j] = np.tensordot(xp[i * s:i * s + k, j * s:j * s + k], w, axes=3) + b
  return y


def np_conv_down(r, w, s, p, n):
  """The paper's "filter" step: correlate the stride-dilated signal, fully padded,
  with the flipped filters (in/out channels swapped); crop the top/left padding."""
  ho, k = r.shape[0], w.shape[0]
  d = np.zeros(((ho - 1) * s + 1, (ho - 1) * s + 1, r.shape[2]))
  d[::s, ::s] = r
  d = np.pad(d, ((k - 1, k - 1), (k - 1, k - 1), (0, 0)))
  flipped = w[::-1, ::-1].transpose(0, 1, 3, 2)  # (k, k, out, in)
  full = (ho - 1) * s + k  # rows of the padded input the windows cover
  g = np.zeros((full, full, w.shape[2]))
  for i, j in itertools.product(range(full), range(full)):
    g[i, j] = np.tensordot(d[i:i + k, j:j + k], flipped, axes=3)
  out = np.zeros((n, n, w.shape[2]))
  m = min(n, full - p)
  out[:m, :m] = g[p:p + m, p:p + m]
  return out


def np_relu_down(r, x, rule):
  return {"backprop": r * (x > 0), "deconvnet": np.maximum(r, 0),
          "guided": r * (x > 0) * (r > 0)}[rule]


def np_pool(x, window=3, stride=2, pad=((0, 0), (0, 0))):
  """Max-pool of (H, W, C) by explicit loops; (out, switches (Ho, Wo, C, 2)).

  Padding (top/left, bottom/right) is never chosen; ties go to the first
  maximum in row-major order within the window (strict > while scanning).
  """
  h, w, c = x.shape
  (pt, pb), (pl, pr) = pad
  ho = (h + pt + pb - window) // stride + 1
  wo = (w + pl + pr - window) // stride + 1
  out = np.zeros((ho, wo, c), x.dtype)
  sw = np.zeros((ho, wo, c, 2), np.int64)
  for i, j, ch in itertools.product(range(ho), range(wo), range(c)):
    best, arg = -np.inf, None
    for di in range(window):
      for dj in range(window):
        r, q = i * stride + di - pt, j * stride + dj - pl
        if 0 <= r < h and 0 <= q < w and x[r, q, ch] > best:
          best, arg = x[r, q, ch], (r, q)
    out[i, j, ch] = best
    sw[i, j, ch] = arg
  return out, sw


def np_unpool(r, sw, shape):
  out = np.zeros(shape, r.dtype)
  ho, wo, c = r.shape
  for i, j, ch in itertools.product(range(ho), range(wo), range(c)):
    out[sw[i, j, ch, 0], sw[i, j, ch, 1], ch] += r[i, j, ch]
  return out


def np_lrn(a, k, n, alpha, beta):
  """Forward and exact VJP of AlexNet's LRN over the last axis, by loops."""
  c = a.shape[-1]
  nb = lambda ch: range(max(0, ch - n // 2), min(c, ch + (n - 1) // 2 + 1))
  d = np.zeros_like(a)
  for ch in range(c):
    d[..., ch] = k + alpha * sum(a[..., q] ** 2 for q in nb(ch))
  b = a / d ** beta

  def vjp(r):
    # db_c/da_j = [c == j] d_c^-beta - 2 alpha beta a_c a_j d_c^(-beta-1) [j in nb(c)]
    g = r * d ** -beta
    for ch in range(c):
      for q in nb(ch):
        g[..., q] -= 2 * alpha * beta * r[..., ch] * a[..., ch] * a[..., q] * d[..., ch] ** (-beta - 1)
    return g
  return b, vjp


# -- NumPy reference deconvnet of a PaperNet (one image, HWC, float64) ---------------

# ZFNetLowRes's conv layers, (kernel, stride, pad), from its definition in the paper's
# table scaled to small images (not read from the package).
LOWRES_GEOMETRY = {"conv1": (7, 2, 0), "conv2": (5, 2, 0), "conv3": (3, 1, 1),
                   "conv4": (3, 1, 1), "conv5": (3, 1, 1)}


def np_forward(params, img, conv_geometry, norm_first=False):
  """Forward of a PaperNet with contrast norm; records every step for the way down.
  ``norm_first``: Krizhevsky's order in layers 1 and 2 (ReLU, normalise, max-pool)
  instead of ZFNet's (ReLU, max-pool, normalise).

  Returns (steps, {layer: activation}, {pool: number of windows with a tie}).
  """
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  steps, acts, ties, x = [], {}, {}, np.asarray(img, np.float64)

  def mark(name, value):
    acts[name] = value
    steps.append(("mark", name))
    return value

  for name, (k, s, pad) in conv_geometry.items():
    w, b = p[name]["kernel"], p[name]["bias"]
    steps.append(("conv", x.shape[0], w, s, pad))
    x = np_conv(x, w, b, s, pad)
    steps.append(("relu", x))
    x = mark(name, np.maximum(x, 0))
    if name in ("conv1", "conv2", "conv5"):
      i, n = name[-1], x.shape[0]

      def normalise(x):
        y, vjp = np_lrn(x, 2.0, 5, 1e-4, 0.75)
        steps.append(("norm", vjp))
        return mark(f"norm{i}", y)
      if norm_first and name != "conv5":
        x = normalise(x)
      hi = -(-max(n - 3, 0) // 2) * 2 + 3 - n  # ceil mode: the last window fits
      y, sw = np_pool(x, pad=((0, hi), (0, hi)))
      ties[f"pool{i}"] = sum(int((x[a * 2:a * 2 + 3, c * 2:c * 2 + 3, ch] == y[a, c, ch]).sum() > 1)
                             for a, c, ch in itertools.product(*map(range, y.shape)))
      steps.append(("pool", x.shape, sw))
      x = mark(f"pool{i}", y)
      if not norm_first and name != "conv5":
        x = normalise(x)
  for name, pname in (("fc6", "fc6"), ("fc7", "fc7"), ("logits", "fc8")):
    w, b = p[pname]["kernel"], p[pname]["bias"]
    steps.append(("fc", x.shape, w))
    x = x.reshape(-1) @ w + b
    if name != "logits":
      steps.append(("relu", x))
      x = np.maximum(x, 0)
    x = mark(name, x)
  return steps, acts, ties


def np_project(steps, acts, layer, channel, position, rule):
  """Start from the selected activation's value, go down to the pixels."""
  a = acts[layer]
  a3 = a.reshape(1, 1, -1) if a.ndim == 1 else a
  if position is None:
    position = np.unravel_index(np.argmax(a3[..., channel]), a3.shape[:2])  # first max
  r = np.zeros_like(a3)
  r[position[0], position[1], channel] = a3[position[0], position[1], channel]
  r = r.reshape(a.shape)
  for step in reversed(steps[:steps.index(("mark", layer))]):
    kind = step[0]
    if kind == "relu":
      r = np_relu_down(r, step[1], rule)
    elif kind == "conv":
      _, n, w, s, pad = step
      r = np_conv_down(r, w, s, pad, n)
    elif kind == "pool":
      r = np_unpool(r, step[2], step[1])
    elif kind == "norm":
      r = step[1](r.copy())
    elif kind == "fc":
      r = (step[2] @ r).reshape(step[1])
  return r


def crop_to_field(image, rf, i, j):
  """(S, S, C) -> unit (i, j)'s receptive field as the atlas crops it: t = min(size, S)
  pixels a side, mid-grey outside the image; along each axis the t pixels that start at
  the field's first pixel, or, when the field starts before the image, that end at its
  last pixel inside the image."""
  s = image.shape[0]
  t = min(rf.size, s)
  padded = np.pad(image, ((rf.size, rf.size), (rf.size, rf.size), (0, 0)), constant_values=0.5)

  def span(k):
    first = rf.offset + k * rf.stride
    lo = first if first >= 0 else min(first + rf.size, s) - t
    return slice(lo + rf.size, lo + rf.size + t)
  return padded[span(i), span(j)]


# -- a hand-built Flax CNN that is not one of our models ---------------------------

class PlainCNN(nn.Module):
  """A small CNN written the ordinary way (nn.relu, nn.max_pool), with a ``features`` method.

  At 32x32x1: c1 5x5/1 valid -> 28, p1 2x2/2 -> 14, c2 3x3/1 same -> 14,
  p2 2x2/2 -> 7, dense -> logits.
  """
  num_classes: int = 3

  @nn.compact
  def features(self, x):
    out = {}
    x = out["c1"] = nn.relu(nn.Conv(4, (5, 5), padding="VALID", name="c1")(x))
    x = out["p1"] = nn.max_pool(x, (2, 2), (2, 2))
    x = out["c2"] = nn.relu(nn.Conv(6, (3, 3), padding="SAME", name="c2")(x))
    x = out["p2"] = nn.max_pool(x, (2, 2), (2, 2))
    out["logits"] = nn.Dense(self.num_classes, name="d")(x.reshape(x.shape[0], -1))
    return out

  def __call__(self, x):
    return self.features(x)["logits"]


# Receptive fields of PlainCNN by hand (size, stride, offset): c1 5/1; p1 6/2;
# c2 (3x3 at stride 2, SAME padding 1) 10/2 offset -2; p2 12/4 offset -2.
PLAIN_FIELDS = {"c1": geometry.ReceptiveField(5, 1, 0), "p1": geometry.ReceptiveField(6, 2, 0),
                "c2": geometry.ReceptiveField(10, 2, -2), "p2": geometry.ReceptiveField(12, 4, -2)}


def plain_network(seed=0, size=32, channels=1, num_classes=3):
  """(deconv.Network, variables) of PlainCNN with random weights and nonzero biases."""
  cnn = PlainCNN(num_classes)
  variables = cnn.init(jax.random.PRNGKey(seed), np.zeros((1, size, size, channels), np.float32),
                       method="features")
  variables = jax.tree_util.tree_map(lambda a: a + 0.05 if a.ndim == 1 else a, variables)
  net = deconv.from_features(lambda v, x: cnn.apply(v, x, method="features"), variables,
                             channels, receptive_fields=PLAIN_FIELDS, name="PlainCNN")
  return net, variables


# -- checkpoints, read without our code ------------------------------------------------

def saved_state(step_dir):
  """A checkpoint step's saved TrainState as a dict of NumPy arrays (Orbax alone, no
  target, no checksum check)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.StandardCheckpointer() as c:
    state = c.restore(os.path.join(step_dir, "state"))
  return jax.tree.map(np.asarray, state)


# -- a real browser (headless Chromium) opening a static page ----------------------

def available(path: str, what: str) -> bool:
  """Whether ``path`` exists.  A check that shrinks without it (a local machine without the
  dataset or the browser) fails instead under ``CI=true``, where everything is installed."""
  if os.path.exists(path):
    return True
  if os.environ.get("CI", "").lower() in ("1", "true"):
    import pytest  # pylint: disable=import-outside-toplevel
    pytest.fail(f"{what} is missing ({path}); CI installs it, so the full check must run")
  return False


CHROMIUM = "/usr/bin/chromium"


def chromium(*args, timeout=90):
  return subprocess.run(
      [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
       "--disable-component-update", "--no-first-run", "--disable-sync", "--mute-audio",
       *args], capture_output=True, text=True, timeout=timeout, check=False)


CHECKER = """<script nonce="zfcheck">
window.__alerts = []; window.alert = function (m) { window.__alerts.push(String(m)); };
window.addEventListener("load", function () {
  var r = {alerts: window.__alerts, scripts: document.scripts.length, images: [], sections: []};
  for (const im of document.images) r.images.push([im.getAttribute("src"), im.naturalWidth]);
  for (const s of document.querySelectorAll("section")) r.sections.push(s.id);
  var pre = document.createElement("pre"); pre.id = "zfcheck";
  var m = "ZF" + "CHECK"; pre.textContent = m + JSON.stringify(r) + m;
  document.body.appendChild(pre);
});</script>"""


def browser_check(report_dir, tmp, name, *, keep_csp=True, inject=""):
  """Open a copy of index.html (with a checker script allowed by a nonce) in
  headless Chromium; returns what the checker saw after load."""
  text = open(os.path.join(report_dir, "index.html"), encoding="utf-8").read()
  if keep_csp:
    text = text.replace("default-src 'none';", "default-src 'none'; script-src 'nonce-zfcheck';")
  else:
    text = text.replace("Content-Security-Policy", "x-no-csp")
  text = text.replace("<title>", CHECKER + "<title>", 1)  # after the CSP
  text = text.replace("</h1>", "</h1>" + inject, 1)
  page = os.path.join(report_dir, name)
  with open(page, "w", encoding="utf-8") as f:
    f.write(text)
  out = chromium(f"--user-data-dir={tmp / ('profile-' + name)}", "--virtual-time-budget=10000",
                 "--dump-dom", f"file://{page}")
  assert "ZFCHECK" in out.stdout, out.stderr[-2000:]
  return json.loads(out.stdout.split("ZFCHECK")[1])


# -- ``python -m zfnet_jax.main`` in a child process, with faults injected -------------

TESTS = os.path.dirname(os.path.abspath(__file__))


def kill_in(module: str, name: str) -> str:
  """``start_main`` setup lines: ``module.name`` sends SIGTERM to its own process, then
  runs (the signal arrives while it runs)."""
  return textwrap.dedent(f"""
      real = {module}.{name}
      def {name}(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
        return real(*args, **kwargs)
      {module}.{name} = {name}
      """)


def start_main(tmp_path, fmnist_dir, workdir, *, setup="", overrides="", name="run",
               flags=()):
  """``python -m zfnet_jax.main`` on ``reliability_config(fmnist_dir)`` (plus
  ``overrides``, lines on ``c``) after ``setup`` (lines run in the child first: fault
  injection, e.g. ``helpers.slow_down_training(0.1)``); stdout and stderr piped."""
  cfg = tmp_path / f"{name}_cfg.py"
  cfg.write_text(textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {TESTS!r})
      import helpers
      def get_config():
        c = helpers.reliability_config({fmnist_dir!r})
      """) + textwrap.indent(textwrap.dedent(overrides), "  ") + "  return c\n")
  runner = tmp_path / f"{name}_main.py"
  runner.write_text(textwrap.dedent(f"""
      import os, signal, sys, time
      sys.path.insert(0, {TESTS!r})
      from absl import app
      import helpers
      from zfnet_jax import main
      from zfnet_jax.data import iterators
      from zfnet_jax.report import report, visualize
      from zfnet_jax.training import loop
      """) + textwrap.dedent(setup) + textwrap.dedent(f"""
      sys.argv = ["main", "--config={cfg}", "--workdir={workdir}", *{list(flags)!r}]
      app.run(main.main)
      """))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             # Reruns reuse the first run's compiled steps.
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return subprocess.Popen([sys.executable, str(runner)], cwd=os.path.dirname(TESTS),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


# -- packages: the wheel, fresh virtualenvs, stand-in distributions ----------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_wheel(out_dir) -> str:
  """The package's wheel, built offline into ``out_dir`` from a copy of this checkout's
  package and build files (setuptools writes build/ beside its sources)."""
  source = os.path.join(str(out_dir), "source")
  shutil.copytree(os.path.join(REPO, "zfnet_jax"), os.path.join(source, "zfnet_jax"),
                  ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("setup.cfg", "pyproject.toml", "README.md"):
    shutil.copy(os.path.join(REPO, name), source)
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                  "--no-build-isolation", "-w", str(out_dir), source],
                 check=True, capture_output=True, timeout=600, cwd=out_dir)
  wheels = [f for f in os.listdir(out_dir) if f.startswith("zfnet_jax-") and f.endswith(".whl")]
  assert len(wheels) == 1, wheels
  return os.path.join(out_dir, wheels[0])


def fake_wheel(out_dir, name: str, version: str) -> str:
  """A wheel that holds only the metadata of distribution ``name`` ``version``: what pip
  and importlib.metadata count as installed, without the code (which stays the real one)."""
  dist = f"{name.replace('-', '_')}-{version}"
  files = {f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\n"
                                         f"Version: {version}\n",
           f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\n"
                                      "Root-Is-Purelib: true\nTag: py3-none-any\n"}
  files[f"{dist}.dist-info/RECORD"] = "".join(f"{n},,\n" for n in files) + \
      f"{dist}.dist-info/RECORD,,\n"
  path = os.path.join(out_dir, f"{dist}-py3-none-any.whl")
  with zipfile.ZipFile(path, "w") as z:
    for n, text in files.items():
      z.writestr(n, text)
  return path


def fresh_venv(path, hide=("zfnet_jax",), hide_metadata=()) -> tuple[str, dict]:
  """A new virtualenv at ``path`` that imports this interpreter's packages (the tests never
  download) but not the distributions named in ``hide`` (code and metadata), nor the
  editable install of this checkout; of those in ``hide_metadata`` it sees the code but
  not the metadata (pip counts them as not installed).  -> (its python, an environment
  for pip offline)."""
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True,
                 timeout=300)
  python = os.path.join(path, "bin", "python")
  site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                        check=True, capture_output=True, text=True).stdout.strip()
  shared = os.path.join(str(path), "shared-site")
  os.makedirs(shared)
  norm = lambda name: name.replace("-", "_").lower()
  outer = sysconfig.get_path("purelib")
  for entry in os.listdir(outer):
    name, _, rest = entry.partition("-")
    metadata = norm(name) if rest.endswith((".dist-info", ".egg-info")) else None
    if entry.startswith("__editable__") or entry.endswith(".pth") or \
        metadata in map(norm, hide + hide_metadata) or entry in hide:
      continue
    os.symlink(os.path.join(outer, entry), os.path.join(shared, entry))
  with open(os.path.join(site, "outer.pth"), "w", encoding="utf-8") as f:
    f.write(shared + "\n")   # a plain path: the outer .pth files are not run
  env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
  env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
  return python, env
