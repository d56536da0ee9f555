"""launch/sweep.py: expansion into commands (dry run), the summary of the runs' results.json
files, and a real two-run sweep."""
import csv
import json
import pathlib
import subprocess
import sys
import textwrap

import pytest

from zfnet_jax.studies import sweeps

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "launch" / "sweep.py")


def test_grid_zip_product():
  assert sweeps.grid(a=[1, 2], b=["x", "y"]) == [
      {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
  assert sweeps.zip_(a=[1, 2], b=[3, 4]) == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
  assert sweeps.product([{"a": 1}, {"a": 2}], [{"b": 0}]) == [{"a": 1, "b": 0}, {"a": 2, "b": 0}]
  with pytest.raises(ValueError, match="equal length"):
    sweeps.zip_(a=[1], b=[1, 2])


def test_dry_run_lists_commands(tmp_path):
  sweep = tmp_path / "s.py"
  sweep.write_text(textwrap.dedent("""
      from zfnet_jax.studies.sweeps import grid, zip_
      CONFIG = "experiments/quickstart.py"
      def get_sweep():
        return (grid(**{"model.fc_features": [64, 128], "config.learning_rate": [0.1]})
                + zip_(**{"config": ["experiments/alexnet.py:no_fc7"],
                          "model.removed": [("fc6", "fc7")], "_paper": ["27.4"]}))
  """))
  out = subprocess.run([sys.executable, SCRIPT, f"--sweep={sweep}", "--root=/r", "--dry_run",
                        "--python=py", "--", "--config.num_train_steps=3"],
                       cwd=ROOT, capture_output=True, text=True, check=True).stdout
  expected = [
      "py -m zfnet_jax.main --config=experiments/quickstart.py "
      "--workdir=/r/fc_features=64__learning_rate=0.1 --config.model.fc_features=64 "
      "--config.learning_rate=0.1 --config.num_train_steps=3",
      "py -m zfnet_jax.main --config=experiments/quickstart.py "
      "--workdir=/r/fc_features=128__learning_rate=0.1 --config.model.fc_features=128 "
      "--config.learning_rate=0.1 --config.num_train_steps=3",
      "py -m zfnet_jax.main --config=experiments/alexnet.py:no_fc7 "
      "--workdir=/r/alexnet-no_fc7__removed=fc6-fc7 "
      "'--config.model.removed=('\"'\"'fc6'\"'\"', '\"'\"'fc7'\"'\"')' --config.num_train_steps=3",
  ]
  assert out.strip().splitlines() == expected


def test_table3_sweep_has_every_paper_row(monkeypatch):
  runs, _ = sweeps.load_sweep(str(ROOT / "experiments" / "table3_sweep.py"))
  monkeypatch.chdir(ROOT)
  planned = sweeps.expand(runs, "/r")
  assert len(planned) == 12            # 7 AlexNet + 5 ZFNet rows of Table 3
  by_name = {p["name"]: p for p in planned}
  assert by_name["alexnet-no_conv34_fc67"]["meta"] == {
      "paper_train_top1": 71.1, "paper_val_top1": 71.3, "paper_val_top5": 50.1}
  assert by_name["zfnet-fc8192_conv512"]["meta"]["paper_train_top1"] == 10.0


def test_bad_sweep_errors(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="nope.py"):
    sweeps.load_sweep(str(tmp_path / "nope.py"))
  monkeypatch.chdir(ROOT)
  with pytest.raises(FileNotFoundError, match="missing.py"):
    sweeps.expand([{"config": "experiments/missing.py"}], "/r")


def assert_row_is_results(row, results, other_columns):
  """Each result column of a summary row (all but run, status and ``other_columns``) holds
  the run's results.json value (floats to 4 decimals, "" where the run has none)."""
  columns = set(row) - {"run", "status", *other_columns}
  assert {"top1_error", "top5_error", "num_eval_examples", "steps", "train_seconds"} <= columns
  for k in columns:
    v = results.get(k)
    if v is None or isinstance(v, int):
      assert row[k] == ("" if v is None else str(v)), k
    else:
      assert row[k] and float(row[k]) == pytest.approx(v, abs=5e-5, nan_ok=True), k


def test_collect_copies_each_runs_results(tmp_path, monkeypatch):
  """Two finished runs with hand-written results.json, one failed, one never started."""
  monkeypatch.chdir(ROOT)
  planned = sweeps.expand(sweeps.zip_(**{"model.fc_features": [8, 16, 32, 64],
                                          "_paper": ["1", "2", "3", "4"]}),
                          str(tmp_path), "experiments/quickstart.py")
  written = [dict(top1_error=0.123456, top5_error=0.01, top1_error_10crop=0.11119,
                  num_eval_examples=500, steps=20, train_seconds=3.5),
             dict(top1_error=0.9, top5_error=0.5, num_eval_examples=64, steps=2,
                  train_seconds=12.25)]
  for run, res in zip(planned, written):
    (tmp_path / run["name"]).mkdir()
    (tmp_path / run["name"] / "results.json").write_text(json.dumps(res))
  status = {planned[2]["name"]: 1}
  sweeps.collect(planned, str(tmp_path), status)
  with open(tmp_path / "summary.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["run"] for r in rows] == [p["name"] for p in planned]
  assert [r["model.fc_features"] for r in rows] == ["8", "16", "32", "64"]
  assert [r["paper"] for r in rows] == ["1", "2", "3", "4"]
  assert [r["status"] for r in rows] == ["ok", "ok", "failed", "missing"]
  for row, res in zip(rows, written + [{}, {}]):
    assert_row_is_results(row, res, ("model.fc_features", "paper"))
  assert rows[0]["top1_error_10crop"] == "0.1112" and rows[1]["top1_error_10crop"] == ""


@pytest.mark.slow
def test_real_two_run_sweep(tmp_path):
  sweep = tmp_path / "s.py"
  sweep.write_text(textwrap.dedent("""
      from zfnet_jax.studies.sweeps import grid
      CONFIG = "experiments/quickstart.py"
      def get_sweep():
        return grid(**{"model.fc_features": [8, 16]})
  """))
  tiny = ["--config.model.conv_features=(4, 4, 4, 4, 4)", "--config.num_train_steps=2",
          "--config.batch_size=8", "--config.eval_batch_size=500", "--config.ten_crop_eval=False",
          "--config.dataset.resize_size=36", "--config.dataset.crop_size=32",
          "--config.report.enabled=False", "--config.evolution_epochs=()",
          "--config.log_every_steps=1", "--config.dataset.max_train_examples=64",
          "--config.dataset.max_eval_examples=64"]
  root = tmp_path / "runs"
  proc = subprocess.run([sys.executable, SCRIPT, f"--sweep={sweep}", f"--root={root}",
                         "--parallel=2", "--", *tiny], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(root / "summary.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["run"] for r in rows] == ["fc_features=8", "fc_features=16"]
  assert [r["model.fc_features"] for r in rows] == ["8", "16"]
  for r in rows:
    assert r["status"] == "ok"
    results = json.loads((root / r["run"] / "results.json").read_text())
    assert_row_is_results(r, results, ("model.fc_features",))
    assert 0.0 <= results["top1_error"] <= 1.0 and results["steps"] == 2
  md = (root / "summary.md").read_text()
  assert md.startswith("| run | model.fc_features |") and "fc_features=16" in md
