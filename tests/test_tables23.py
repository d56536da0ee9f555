"""Tables 2 and 3: the training error in results.json and the sweep summary, and the
ensemble evaluation (softmax averaged over runs), against NumPy references."""
import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from zfnet_jax.data import iterators, sources
from zfnet_jax.nn import models
from zfnet_jax.studies import sweeps
from zfnet_jax.training import ensemble, loop

import helpers
from helpers import make_fmnist, saved_state, small_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST = 48, 13


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Two finished 3-step runs (seeds 0 and 1) planned as a sweep: (planned, root, data, dir)."""
  d = str(tmp_path_factory.mktemp("fm"))
  data = make_fmnist(d, n_train=N_TRAIN, n_test=N_TEST)
  sources._fashion_mnist.cache_clear()
  root = str(tmp_path_factory.mktemp("sweep"))
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    planned = sweeps.expand(sweeps.grid(seed=[0, 1]), root, "experiments/quickstart.py")
  finally:
    os.chdir(cwd)
  for run in planned:
    c = small_config(d, steps=3)
    c.seed = run["overrides"]["seed"]
    c.eval_batch_size = 6          # 13 examples: padded batches
    loop.train_and_evaluate(c, run["workdir"])
  return planned, root, data, d


def _member(workdir, config):
  """(apply, full mean (36, 36, 1)) of a run, its parameters read by Orbax alone."""
  params = saved_state(os.path.join(workdir, "checkpoints", "3"))["params"]
  model = models.from_config(config.model, 10)
  mean = np.load(os.path.join(workdir, "pixel_mean.npy"))
  return (lambda x: np.asarray(model.apply({"params": params}, x), np.float64)), mean


def _softmax(logits):
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def _resized(images):
  return np.stack([np.asarray(jax.image.resize(x.astype(np.float32)[..., None], (36, 36, 1),
                                               "linear")) for x in images])


def test_train_error_is_on_a_seeded_training_subset_and_fills_the_sweep_table(runs):
  planned, root, data, d = runs
  images, labels = data["train"]
  for run in planned:
    res = json.loads(pathlib.Path(run["workdir"], "results.json").read_text())
    seed = run["overrides"]["seed"]
    # as large as the eval split, drawn without replacement by default_rng([seed, 2])
    ids = np.sort(np.random.default_rng([seed, 2]).choice(N_TRAIN, N_TEST, replace=False))
    apply, mean = _member(run["workdir"], small_config(d))
    x = _resized(images[ids])[:, 2:34, 2:34] - mean[2:34, 2:34]    # centre crop, no flips
    logits = apply(x)
    assert res["num_train_eval_examples"] == N_TEST
    assert res["train_top1_error"] == pytest.approx(np.mean(logits.argmax(1) != labels[ids]))
    top5 = np.argsort(-logits, 1)[:, :5]
    assert res["train_top5_error"] == pytest.approx(
        np.mean(~(top5 == labels[ids][:, None]).any(1)))
  header, rows = sweeps.collect(planned, root)
  with open(os.path.join(root, "summary.csv")) as f:
    table = list(csv.DictReader(f))
  assert "train_top1_error" in header and len(table) == 2
  for row, run in zip(table, planned):
    res = json.loads(pathlib.Path(run["workdir"], "results.json").read_text())
    assert row["train_top1_error"] == f"{res['train_top1_error']:.4f}"


@pytest.mark.parametrize("path", ["memory", "folder", "tfds"])
def test_eval_iterator_with_ids_yields_exactly_those_examples(path, tmp_path):
  """The training subset: sorted ids drawn by default_rng([seed, 2]), as many as the eval
  split; on every data path the iterator with ids gives those rows of the full split."""
  data = helpers.make_multihost_data(path, str(tmp_path / "data"))
  sources._fashion_mnist.cache_clear()
  c = helpers.multihost_config(path, data)
  c.seed = 7
  with helpers.multihost_data(path):
    info = sources.dataset_info(c)
    ids = iterators.train_subset(c)
    want = np.sort(np.random.default_rng([7, 2]).choice(info.num_train, info.num_eval,
                                                        replace=False))
    np.testing.assert_array_equal(ids, want)
    wd = str(tmp_path / "wd")

    def read(**kw):
      batches = list(iterators.create_eval_iterator(c, wd, split=c.dataset.train_split, batch_size=4,
                                             **kw))
      return {k: np.concatenate([b[k][b["mask"]] for b in batches])
              for k in ("image", "label", "id")}
    full, sub = read(), read(ids=ids)
  np.testing.assert_array_equal(full["id"], np.arange(info.num_train))
  np.testing.assert_array_equal(sub["id"], ids)
  np.testing.assert_array_equal(sub["label"], full["label"][ids])
  np.testing.assert_allclose(sub["image"], full["image"][ids], atol=1e-4)
  with pytest.raises(ValueError, match="sorted distinct"):
    next(iterators.create_eval_iterator(c, wd, ids=[3, 1]))


def test_ensemble_equals_numpy_average_of_softmax(runs, tmp_path):
  planned, _, data, d = runs
  workdirs = [run["workdir"] for run in planned]
  c = small_config(d)
  c.ten_crop_eval = True
  c.eval_batch_size = 8
  out = str(tmp_path / "ens")
  res = ensemble.evaluate_ensemble(c, workdirs, out)
  images, labels = data["test"]
  full = _resized(images)
  views = [(2, 2, False)] + [(t, l, f) for f in (False, True)
                             for t, l in ((0, 0), (0, 4), (4, 0), (4, 4), (2, 2))]
  centre, crops, single = [], [], []
  for w in workdirs:
    apply, mean = _member(w, c)
    probs = [_softmax(apply(np.stack([(x - mean)[t:t + 32, l:l + 32][:, ::-1 if f else 1]
                                      for x in full]))) for t, l, f in views]
    centre.append(probs[0])
    crops.append(np.mean(probs[1:], 0))
    single.append(probs[0])
  ens, ens10 = np.mean(centre, 0), np.mean(crops, 0)
  saved = np.load(os.path.join(out, "ensemble_predictions.npz"))
  np.testing.assert_array_equal(saved["id"], np.arange(N_TEST))
  np.testing.assert_array_equal(saved["label"], labels)
  np.testing.assert_array_equal(saved["top5"], np.argsort(-ens, 1)[:, :5])
  np.testing.assert_array_equal(saved["top5_10crop"], np.argsort(-ens10, 1)[:, :5])
  assert res["num_eval_examples"] == N_TEST
  assert res["top1_error"] == pytest.approx(np.mean(ens.argmax(1) != labels))
  assert res["top1_error_10crop"] == pytest.approx(np.mean(ens10.argmax(1) != labels))
  for member, p in zip(res["members"], single):
    assert member["top1_error"] == pytest.approx(np.mean(p.argmax(1) != labels))
  assert json.loads(pathlib.Path(out, "ensemble_results.json").read_text())["top1_error"] == \
      res["top1_error"]


def test_ensemble_errors_before_work(runs, tmp_path):
  planned, _, _, d = runs
  w0, w1 = (run["workdir"] for run in planned)
  c = small_config(d)
  out = str(tmp_path / "out")
  with pytest.raises(ValueError, match="at least 2 distinct workdirs"):
    ensemble.evaluate_ensemble(c, [w0, w0], out)
  with pytest.raises(FileNotFoundError, match="ensemble member '.*nope': no such directory"):
    ensemble.evaluate_ensemble(c, [w0, str(tmp_path / "nope")], out)
  other = str(tmp_path / "other")
  shutil.copytree(w1, other)
  info = json.loads(pathlib.Path(other, "dataset_info.json").read_text())
  info["class_names"][0] = "Tee"
  pathlib.Path(other, "dataset_info.json").write_text(json.dumps(info))
  with pytest.raises(ValueError, match="has classes 10 classes \\['Tee'.*must share"):
    ensemble.evaluate_ensemble(c, [w0, other], out)
  c.dataset.resize_size = 40
  with pytest.raises(ValueError, match="resize_size 36, the ensemble's config has 40"):
    ensemble.evaluate_ensemble(c, [w0, w1], out)
  assert not os.path.exists(out)
  # the command line: one line, exit 2
  cfg = tmp_path / "cfg.py"
  cfg.write_text(f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\nimport helpers\n"
                 f"def get_config():\n  return helpers.small_config({d!r})\n")
  proc = subprocess.run([sys.executable, "-m", "zfnet_jax.main", f"--config={cfg}",
                         f"--workdir={out}", "--mode=ensemble", f"--ensemble={w0},{tmp_path}/x"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [
      f"error: ensemble member '{tmp_path}/x': no such directory"]
