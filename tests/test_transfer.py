"""Transfer and per-layer probes (zfnet_jax.transfer) against hand-made references."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from zfnet_jax import configs
from zfnet_jax.analyses import transfer, transfer_tables
from zfnet_jax.data import targets
from zfnet_jax.nn import models
from zfnet_jax.training import loop


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
  d = targets.load_digits(32, 3)
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
  alex = models.AlexNetLowRes(**TINY)          # Krizhevsky's order: a layer ends with its pool
  assert transfer.probe_layers(alex, 64, (1, 2)) == {1: "pool1", 2: "pool2"}
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
  d = targets.load_digits(32, 1)
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
  theader, trows = transfer_tables.transfer(m, v, mean, data, tc, 32)
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
  return targets.TargetData(np.clip(x, 0, 255), y, ["a", "b", "c"], multilabel=True,
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
  res = transfer.transfer_scores(m, v, data.images.mean(0), data, tc, 32)
  header, rows = transfer_tables.transfer_rows(res, tc.dataset)
  assert header == ["model", "all (mAP %)"]
  # Per-class AP of the scratch model (Table 6's column): its mean is the table's mAP.
  assert rows[1][1] == f"{100 * np.mean(res['per_class_ap']['scratch']):.1f}"
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
    targets.load_target(small_tc(dataset="mnist"), 32, 36, 1)


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
  loop.train_and_evaluate(config, workdir)
  header, rows = transfer_tables.probe_table(config, workdir)
  assert [r[1] for r in rows] == ["norm1", "fc7"]
  csv_text = open(os.path.join(workdir, "transfer", "probes.csv")).read()
  assert csv_text.splitlines()[0].startswith("layer,output,dims")
  assert os.path.exists(os.path.join(workdir, "transfer", "probes.md"))
  sections = transfer_tables.table_sections(os.path.join(workdir, "transfer"), config.transfer)
  assert sections[0].tables[0][1] == rows


def test_tfds_loaders_on_mock_data():
  tc = configs.default_config().transfer
  with tfds.testing.mock_data(num_examples=4):
    tc.dataset = "caltech101"
    d = targets.load_target(tc, 32, 36, 3)
    assert d.images.shape == (8, 32, 32, 3) and d.split is None    # train + test merged
    assert len(d.class_names) == 102 and d.labels.max() < 102
    tc.dataset = "voc2012"
    d = targets.load_target(tc, 32, 36, 1)
    assert d.images.shape == (8, 32, 32, 1) and d.labels.shape == (8, 20) and d.multilabel
    assert [len(s) for s in d.split] == [4, 4] and not set(d.split[0]) & set(d.split[1])
    assert 0 <= d.images.min() and d.images.max() <= 255


def test_average_precisions_equal_sklearn_per_class():
  """Per-class AP (Table 6) is scikit-learn's average_precision_score of each column; a class
  without positives is NaN and left out of the mean."""
  from sklearn.metrics import average_precision_score
  rng = np.random.default_rng(0)
  labels = (rng.uniform(size=(40, 5)) < 0.3).astype(np.int32)
  labels[:, 3] = 0
  scores = rng.normal(size=(40, 5)) + labels
  ap = transfer.average_precisions(labels, scores)
  for k in (0, 1, 2, 4):
    assert ap[k] == pytest.approx(average_precision_score(labels[:, k], scores[:, k]))
  assert np.isnan(ap[3])
  assert transfer.mean_average_precision(labels, scores) == pytest.approx(
      np.mean([average_precision_score(labels[:, k], scores[:, k]) for k in (0, 1, 2, 4)]))
  # Table 6 as transcribed: its 20 classes average to the paper's 79.0.
  assert len(transfer.PAPER_VOC_AP) == 20 and round(np.mean(transfer.PAPER_VOC_AP), 1) == 79.0


def write_caltech256(root):
  """A 256_ObjectCategories-shaped folder: 3 classes of 9, 8, 10 images (one grey, one PNG,
  sizes vary), a clutter class, a text file and a sub-folder that must be skipped."""
  from PIL import Image
  rng = np.random.default_rng(0)
  counts = {"001.ak47": 9, "002.american-flag": 8, "003.backpack": 10, "257.clutter": 5}
  for d, n in counts.items():
    os.makedirs(root / d / "greg")
    (root / d / "RENAME2").write_text("not an image")
    for i in range(n):
      h, w = 30 + 7 * i, 50 - 2 * i
      img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
      img = img.convert("L") if i == 0 else img
      img.save(root / d / f"{d[:3]}_{i:04d}.{'png' if i == 1 else 'jpg'}")
  return counts


def test_caltech256_folder_protocol_and_curve(tiny, tmp_path):
  """Caltech-256 (no TFDS builder: its folder): clutter left out; each setting of the
  15/30/45/60-style protocol has 5 folds with exactly n training images of every class;
  transfer.json holds every fold and the Fig. 9 curve is written."""
  m, v = tiny
  counts = write_caltech256(tmp_path / "256_ObjectCategories")
  tc = small_tc(dataset="caltech256", data_dir=str(tmp_path), train_per_class=(2, 4, 6),
                test_per_class=3, folds=5)                  # scratch: test_scratch_control
  data = targets.load_target(tc, 32, 36, 1)
  assert data.class_names == ["ak47", "american-flag", "backpack"]
  np.testing.assert_array_equal(np.bincount(data.labels), [9, 8, 10])
  assert data.images.shape == (27, 32, 32, 1) and data.images.dtype == np.uint8
  splits = transfer.splits_for(data, tc)
  assert list(splits) == ["2", "4", "6"]
  for n, folds in splits.items():
    assert len(folds) == 5
    for tr, te in folds:
      np.testing.assert_array_equal(np.bincount(data.labels[tr], minlength=3), [int(n)] * 3)
      assert np.bincount(data.labels[te], minlength=3).max() <= 3 and not set(tr) & set(te)
  out = str(tmp_path / "out")
  tables = transfer_tables.write_tables(m, v, data.images.mean(0), tc, 32, 36, out, which=("transfer",))
  header, rows = tables["transfer"]
  assert header[1:4] == [f"{n}/class (mean class acc %)" for n in (2, 4, 6)]
  assert header[4] == "paper (15 / 30 / 45 / 60 per class)"
  assert rows[0][4] == "65.7 / 70.6 / 72.7 / 74.2"
  with open(os.path.join(out, "transfer.json")) as f:
    res = json.load(f)
  assert res["dataset"] == "caltech256" and list(res["scores"]) == ["2", "4", "6"]
  for n in ("2", "4", "6"):
    assert len(res["scores"][n]["pretrained"]) == 5 and res["scores"][n]["scratch"] is None
    assert rows[0][1 + ["2", "4", "6"].index(n)].startswith(
        f"{100 * np.mean(res['scores'][n]['pretrained']):.1f} ± ")
  with open(os.path.join(out, "curve.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert sum(counts.values()) - counts["257.clutter"] == len(data.labels)
  section = transfer_tables.table_sections(out, tc)[0]
  assert section.figures[0][0] == os.path.join("out", "curve.png") and len(section.tables) == 1
  with pytest.raises(FileNotFoundError, match="256_ObjectCategories.tar"):
    targets.load_target(small_tc(dataset="caltech256", data_dir=str(tmp_path / "no")), 32, 36, 1)


def test_voc_per_class_ap_on_mock_data(tiny, tmp_path):
  """VOC 2012 on TFDS mock data: per_class_ap.csv (Table 6) has the 20 classes, each AP equal
  to scikit-learn's on the same classifier's validation scores, the mean row and the paper's."""
  from sklearn.metrics import average_precision_score
  m, v = tiny
  tc = small_tc(dataset="voc2012")
  out = str(tmp_path / "out")
  with tfds.testing.mock_data(num_examples=16):
    data = targets.load_target(tc, 32, 36, 1)
    mean = data.images.mean(0)
    tables = transfer_tables.write_tables(m, v, mean, tc, 32, 36, out, which=("transfer",))
  header, rows = tables["per_class_ap"]
  names = tfds.builder("voc/2012").info.features["labels"].feature.names
  assert [r[0] for r in rows] == list(names) + ["mean"]
  assert [float(r[3]) for r in rows[:20]] == list(transfer.PAPER_VOC_AP) and rows[20][3] == "79.0"
  with open(os.path.join(out, "transfer.json")) as f:
    res = json.load(f)
  assert len(res["per_class_ap"]["pretrained"]) == 20 and res["per_class_ap"]["scratch"] is None
  # Independent check: scikit-learn's AP of each class on the softmax's decision values.
  tr, te = data.split
  feats = transfer.extract_features(m, v, data.images, mean, {7: "fc7"}, tc.pool_grid)[7]
  dec = transfer.fit_predict("softmax", feats[tr], data.labels[tr], feats[te], tc.softmax_c, True)
  y = data.labels[te]
  for k in range(20):
    got = res["per_class_ap"]["pretrained"][k]
    if y[:, k].any():
      assert got == pytest.approx(average_precision_score(y[:, k], dec[:, k]))
      assert rows[k][1] == f"{100 * got:.1f}"
    else:
      assert got is None and rows[k][1] == "–"
  ref_mean = np.mean([average_precision_score(y[:, k], dec[:, k])
                      for k in range(20) if y[:, k].any()])
  assert rows[20][1] == f"{100 * ref_mean:.1f}"
  assert tables["transfer"][1][0][1] == f"{100 * ref_mean:.1f}"
  section = transfer_tables.table_sections(out, tc)[0]
  assert section.tables[1] == (header, rows) and not section.figures


def test_caltech256_config_states_the_papers_protocol():
  import importlib.util
  path = os.path.join(os.path.dirname(__file__), "..", "experiments", "transfer_caltech256.py")
  spec = importlib.util.spec_from_file_location("transfer_caltech256", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  tc = module.get_config().transfer
  assert (tc.dataset, tuple(tc.train_per_class), tc.folds) == ("caltech256", (15, 30, 45, 60), 5)
  paper = transfer.PAPER_TRANSFER["caltech256"]["pretrained"]
  assert list(paper) == [15, 30, 45, 60]
  assert " / ".join(map(str, paper.values())) == "65.7 / 70.6 / 72.7 / 74.2" in module.__doc__
