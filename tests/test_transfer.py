"""Transfer and per-layer probes (zfnet_jax.transfer) against hand-made references."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from zfnet_jax import configs, models, train, transfer


def np_grid_max(x, g):
  """Reference: explicit loops over the adaptive bins [floor(i n/g), ceil((i+1) n/g))."""
  n, h, w, c = x.shape
  gh, gw = min(g, h), min(g, w)
  out = np.zeros((n, gh, gw, c), x.dtype)
  for i in range(gh):
    for j in range(gw):
      r0, r1 = int(np.floor(i * h / gh)), int(np.ceil((i + 1) * h / gh))
      c0, c1 = int(np.floor(j * w / gw)), int(np.ceil((j + 1) * w / gw))
      for a in range(n):
        for k in range(c):
          out[a, i, j, k] = max(x[a, r, s, k] for r in range(r0, r1) for s in range(c0, c1))
  return out.reshape(n, -1)


def test_grid_max_pool_by_hand():
  x = np.arange(25, dtype=np.float32).reshape(1, 5, 5, 1)
  # g=2 on 5: bins rows/cols [0,3) and [2,5) (they overlap at index 2).
  np.testing.assert_array_equal(transfer.grid_max_pool(jnp.asarray(x), 2), [[12, 14, 22, 24]])
  # A 1x1 map stays 1x1 however large the grid.
  np.testing.assert_array_equal(transfer.grid_max_pool(jnp.ones((2, 1, 1, 3)), 3).shape, (2, 3))


@pytest.mark.parametrize("shape,g", [((2, 7, 7, 3), 3), ((1, 6, 6, 2), 3), ((1, 2, 2, 2), 3),
                                     ((2, 11, 11, 1), 4)])
def test_grid_max_pool_matches_loops(shape, g):
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(transfer.grid_max_pool(jnp.asarray(x), g)),
                                np_grid_max(x, g))


def test_grid_max_pool_has_torchs_adaptive_bins():
  """13 -> 3 as torch.nn.AdaptiveMaxPool2d bins it (start floor(i*13/3), end ceil((i+1)*13/3)):
  rows/cols [0, 5), [4, 9), [8, 13), written out by hand."""
  x = np.random.default_rng(1).normal(size=(2, 13, 13, 4)).astype(np.float32)
  bins = [(0, 5), (4, 9), (8, 13)]
  ref = np.stack([x[:, r0:r1, c0:c1].max(axis=(1, 2)) for r0, r1 in bins for c0, c1 in bins], 1)
  np.testing.assert_array_equal(np.asarray(transfer.grid_max_pool(jnp.asarray(x), 3)),
                                ref.reshape(2, -1))


def test_class_folds():
  labels = np.repeat(np.arange(4), [40, 35, 31, 60])
  folds = transfer.class_folds(labels, 30, 50, 3, seed=0)
  assert len(folds) == 3
  for tr, te in folds:
    assert not set(tr) & set(te)
    np.testing.assert_array_equal(np.bincount(labels[tr]), [30, 30, 30, 30])
    np.testing.assert_array_equal(np.bincount(labels[te]), [10, 5, 1, 30])
  assert not np.array_equal(folds[0][0], folds[1][0])
  with pytest.raises(ValueError, match="class 0 has 40 images"):
    transfer.class_folds(labels, 40, 50, 1)


def test_scores_by_hand():
  y = np.array([0, 0, 0, 0, 1, 1])
  p = np.array([0, 0, 0, 1, 0, 1])
  assert transfer.mean_class_accuracy(y, p) == pytest.approx((3 / 4 + 1 / 2) / 2)
  # AP of class 0 (scores 0.9, 0.8, 0.7, 0.1 for labels 1, 0, 1, 0): (1/1 + 2/3) / 2.
  labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
  scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.1, 0.9]])
  ap0 = (1 + 2 / 3) / 2
  ap1 = (1 / 2 + 2 / 3) / 2      # class 1 ranks: 0.9 (neg), 0.3 (pos), 0.2 (pos), 0.1 (neg)
  assert transfer.mean_average_precision(labels, scores) == pytest.approx((ap0 + ap1) / 2)


def test_load_digits():
  d = transfer.load_digits(32, 3)
  assert d.images.shape == (1797, 32, 32, 3) and d.labels.shape == (1797,)
  assert d.images.min() >= 0 and d.images.max() <= 255 and d.images.max() > 250
  assert np.array_equal(d.images[..., 0], d.images[..., 2])
  # Upsampling keeps the mean brightness: 8x8 values 0..16 -> 0..255.
  from sklearn.datasets import load_digits
  raw = load_digits().images[:50] * 255 / 16
  np.testing.assert_allclose(d.images[:50, ..., 0].mean((1, 2)), raw.mean((1, 2)), rtol=0.05)


TINY = dict(num_classes=10, conv_features=(4, 6, 8, 8, 6), fc_features=16)


@pytest.fixture(scope="module")
def tiny():
  m = models.ZFNetLowRes(**TINY)
  return m, jax.jit(m.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)))


def test_probe_layers():
  m = models.ZFNetLowRes(**TINY)
  assert transfer.probe_layers(m, 32, range(1, 8)) == {
      1: "norm1", 2: "norm2", 3: "conv3", 4: "conv4", 5: "pool5", 6: "fc6", 7: "fc7"}
  m2 = m.clone(contrast_norm=False, removed=("conv3", "fc7"))
  assert transfer.probe_layers(m2, 32, range(1, 8)) == {
      1: "pool1", 2: "pool2", 4: "conv4", 5: "pool5", 6: "fc6"}
  with pytest.raises(ValueError, match=r"unknown layers \[8\]"):
    transfer.probe_layers(m, 32, [8])


def test_extract_features_equal_direct_apply(tiny):
  m, v = tiny
  x = np.random.default_rng(0).uniform(0, 255, (5, 32, 32, 1)).astype(np.float32)
  mean = np.full((32, 32, 1), 100.0, np.float32)
  names = transfer.probe_layers(m, 32, range(1, 8))
  got = transfer.extract_features(m, v, x, mean, names, 3, batch_size=2)   # uneven last batch
  ref = m.apply(v, jnp.asarray(x - mean), method="features")
  for l, name in names.items():
    r = np.asarray(ref[name])
    r = np_grid_max(r, 3) if r.ndim == 4 else r
    np.testing.assert_allclose(got[l], r, rtol=1e-5, atol=1e-5)


def small_tc(**kw):
  tc = configs.default_config().transfer
  tc.train_per_class = (10,)
  tc.test_per_class = 20
  tc.folds = 2
  tc.scratch_steps = 0
  tc.update(kw)
  return tc


def digits_subset(n=400):
  d = transfer.load_digits(32, 1)
  d.images, d.labels = d.images[:n], d.labels[:n]
  return d


def test_probes_table_and_transfer_consistent(tiny):
  m, v = tiny
  data = digits_subset()
  mean = data.images.mean(0)
  tc = small_tc(layers=(1, 5, 7))
  header, rows = transfer.probes(m, v, mean, data, tc, 32)
  assert header[:5] == ["layer", "output", "dims", "svm 10/class (mean class acc %)",
                        "softmax 10/class (mean class acc %)"]
  assert [r[:3] for r in rows] == [["1", "norm1", "36"], ["5", "pool5", "6"], ["7", "fc7", "16"]]
  acc = {r[0]: float(r[3].split(" ± ")[0]) for r in rows}
  assert acc["1"] > 30.0                  # far above chance (10%) on digits, even untrained
  assert all(0.0 <= float(r[k].split(" ± ")[0]) <= 100.0 for r in rows for k in (3, 4))
  assert rows[0][-2:] == ["44.8", "–"] and rows[2][-2:] == ["85.5", "85.4"]
  # The transfer table's "pretrained" cell is the softmax probe of fc7 on the same folds.
  theader, trows = transfer.transfer(m, v, mean, data, tc, 32)
  assert trows[0][1] == rows[2][4]
  assert trows[1][1] == "not run"


def multilabel_data(planted=True):
  """60 noise images; each of 3 classes present w.p. 0.4.  ``planted``: class k brightens
  rows [11k, 11k + 10) (+200, clipped), a signal any useful feature finds.  Test: the last 20."""
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 255, (60, 32, 32, 1)).astype(np.float32)
  y = (rng.uniform(size=(60, 3)) < 0.4).astype(np.int32)
  for k in range(3 if planted else 0):
    x[y[:, k] == 1, 11 * k:11 * k + 10] += 200
  return transfer.TargetData(np.clip(x, 0, 255), y, ["a", "b", "c"], multilabel=True,
                             split=(np.arange(40), np.arange(40, 60)))


def chance_map(labels, draws=4000):
  """Expected mAP (%) of random rankings: per class, the mean over random orders of the
  precision at each positive's rank, by NumPy (sklearn's AP without ties)."""
  rng = np.random.default_rng(0)
  aps = []
  for k in range(labels.shape[1]):
    for _ in range(draws):
      ranked = labels[rng.permutation(len(labels)), k]
      hits = np.cumsum(ranked)
      aps.append(np.mean((hits / np.arange(1, len(ranked) + 1))[ranked == 1]))
  return 100 * np.mean(aps)


def test_multilabel_probes(tiny):
  """Every probe finds the planted classes (mAP far above chance); without the signal the
  same probes score near chance."""
  m, v = tiny
  data = multilabel_data()
  chance = chance_map(data.labels[40:])
  assert 40 < chance < 55
  header, rows = transfer.probes(m, v, data.images.mean(0), data, small_tc(layers=(2, 7)), 32)
  assert header[3:5] == ["svm all (mAP %)", "softmax all (mAP %)"]
  assert [r[0] for r in rows] == ["2", "7"]
  assert all(chance + 35 <= float(r[k]) <= 100.0 for r in rows for k in (3, 4)), (chance, rows)
  noise = multilabel_data(planted=False)
  _, rows = transfer.probes(m, v, noise.images.mean(0), noise, small_tc(layers=(2, 7)), 32)
  assert all(abs(float(r[k]) - chance) < 15 for r in rows for k in (3, 4)), (chance, rows)


@pytest.mark.slow
def test_scratch_control(tiny):
  """The from-scratch model (100 SGD steps) learns the planted classes: its mAP beats
  chance by 20 points (the frozen features' softmax by 35)."""
  m, v = tiny
  data = multilabel_data()
  tc = small_tc(scratch_steps=100, scratch_batch_size=16)
  header, rows = transfer.transfer(m, v, data.images.mean(0), data, tc, 32)
  assert header == ["model", "all (mAP %)"]
  assert rows[1][0] == "same architecture from scratch"
  chance = chance_map(data.labels[40:])
  assert chance + 35 <= float(rows[0][1]) <= 100.0, (chance, rows)
  assert chance + 20 <= float(rows[1][1]) <= 100.0, (chance, rows)


def test_bad_config_errors(tiny):
  m, v = tiny
  data = digits_subset(200)
  with pytest.raises(ValueError, match="unknown classifiers \\['knn'\\]"):
    transfer.probes(m, v, data.images.mean(0), data, small_tc(classifiers=("knn",)), 32)
  with pytest.raises(ValueError, match="unknown transfer dataset 'mnist'.*digits"):
    transfer.load_target(small_tc(dataset="mnist"), 32, 36, 1)


@pytest.mark.slow
def test_probe_table_from_trained_workdir(tmp_path):
  import importlib.util
  root = os.path.join(os.path.dirname(__file__), "..", "experiments", "transfer_digits.py")
  spec = importlib.util.spec_from_file_location("transfer_digits", root)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.conv_features = (4, 4, 4, 4, 4)
  config.model.fc_features = 8
  config.num_train_steps = 2
  config.batch_size = 8
  config.ten_crop_eval = False
  config.dataset.max_train_examples = 64
  config.dataset.max_eval_examples = 64
  config.evolution_epochs = ()
  config.report.enabled = False
  config.transfer.layers = (1, 7)
  config.transfer.train_per_class = (5,)
  config.transfer.folds = 1
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  header, rows = transfer.probe_table(config, workdir)
  assert [r[1] for r in rows] == ["norm1", "fc7"]
  csv_text = open(os.path.join(workdir, "transfer", "probes.csv")).read()
  assert csv_text.splitlines()[0].startswith("layer,output,dims")
  assert os.path.exists(os.path.join(workdir, "transfer", "probes.md"))
  sections = transfer.table_sections(os.path.join(workdir, "transfer"), config.transfer)
  assert sections[0].tables[0][1] == rows


def test_tfds_loaders_on_mock_data():
  tc = configs.default_config().transfer
  with tfds.testing.mock_data(num_examples=4):
    tc.dataset = "caltech101"
    d = transfer.load_target(tc, 32, 36, 3)
    assert d.images.shape == (8, 32, 32, 3) and d.split is None    # train + test merged
    assert len(d.class_names) == 102 and d.labels.max() < 102
    tc.dataset = "voc2012"
    d = transfer.load_target(tc, 32, 36, 1)
    assert d.images.shape == (8, 32, 32, 1) and d.labels.shape == (8, 20) and d.multilabel
    assert [len(s) for s in d.split] == [4, 4] and not set(d.split[0]) & set(d.split[1])
    assert 0 <= d.images.min() and d.images.max() <= 255
