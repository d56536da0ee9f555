"""The console: one line per event, bars that become plain lines in
logs, no library chatter, a summary table and timings.json at the end; the time
estimate's model."""
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
from tqdm import std as tqdm_std

from zfnet_jax import console, job, rundir

from helpers import make_fmnist, small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")


def log_bar(monkeypatch, steps):
  """A bar of ``steps`` steps written to a log (not a terminal), every 30 s, on a clock
  this test moves by 10 s a step: (the log, its lines)."""
  err = io.StringIO()
  monkeypatch.setattr(sys, "stderr", err)
  monkeypatch.setenv("ZFNET_PROGRESS_SECONDS", "30")
  now = [1000.0]
  monkeypatch.setattr(tqdm_std, "time", lambda: now[0])     # the bar's clock
  monkeypatch.setattr(tqdm_std.tqdm, "monitor_interval", 0)  # no monitor thread (real time)
  bar = console.progress(desc="phase", total=steps, unit="step")
  for _ in range(steps):
    now[0] += 10.0
    bar.update(1)
  bar.close()
  return err, err.getvalue().splitlines()


def test_bar_in_a_log_is_plain_lines(monkeypatch):
  """Not a terminal: no carriage returns; a line once ZFNET_PROGRESS_SECONDS have passed
  since the last one, and none at the end when nothing is new.  The bar reads a clock
  this test moves (10 s per step), so the lines do not depend on the machine's speed:
  at 30, 60, 90 and 120 s, i.e. after steps 3, 6, 9 and 12."""
  err, lines = log_bar(monkeypatch, 12)
  assert "\r" not in err.getvalue()
  assert [l.split("|")[-1].split()[0] for l in lines] == ["3/12", "6/12", "9/12", "12/12"], lines
  assert all(l.startswith("phase:") for l in lines), lines
  assert lines[-1].startswith("phase: 100%")


def test_bar_in_a_log_prints_the_last_count_at_close(monkeypatch):
  """Work done since the last periodic line is printed once when the bar closes."""
  _, lines = log_bar(monkeypatch, 5)
  assert [l.split("|")[-1].split()[0] for l in lines] == ["3/5", "5/5"], lines


def test_job_console_is_short_and_says_each_thing_once(tmp_path, capfd, monkeypatch):
  """The console budget, in-process (the command line's is checked by the slow
  ``test_cli_console_is_short_and_quiet``): the plan first, training and evaluation in a
  few lines, the summary table last; no line twice, no library chatter."""
  monkeypatch.delenv("ZFNET_PROGRESS_SECONDS", raising=False)
  d = str(tmp_path / "fm")
  make_fmnist(d, n_train=64, n_test=16)
  c = small_config(d, steps=6)
  c.log_every_steps, c.checkpoint_every_steps = 2, 3
  out = job.run(c, str(tmp_path / "wd"), train_model=True, write_report=False)
  assert out["results"]["steps"] == 6
  captured = capfd.readouterr()
  out, err = captured.out.splitlines(), captured.err.splitlines()
  lines = out + err
  assert len(lines) <= 20, "\n".join(lines)
  assert out[0].startswith("zfnet_jax: ZFNetLowRes on fashion_mnist_idx"), lines
  assert out[1].startswith("  1. train 0.75 epochs (6 steps of 8 images"), lines
  assert out[-1] == "-" * len(out[-1]) and any(l.startswith("top-1 error") for l in out)
  assert err and all(l.startswith("training ZFNetLowRes: ") for l in err), err   # the bar
  events = [l for l in lines if set(l) != {"-"}]
  assert len(set(events)) == len(events), "a line printed twice:\n" + "\n".join(lines)
  for chatter in ("checkpoint_manager", "orbax", "I0000", "oneDNN", "Traceback", "\r"):
    assert not any(chatter in l for l in lines), (chatter, lines)


def test_say_prints_once_and_warnings_go_to_stderr(capsys):
  console.say("event")
  console.say("careful", warn=True)
  out, err = capsys.readouterr()
  assert out == "event\n" and err == "warning: careful\n"


def test_table_and_minutes():
  t = console.table([("top-1 error", "0.0881"), ("total", "5 min 32 s")], "title")
  lines = t.splitlines()
  assert lines[0] == "title" and lines[2] == "top-1 error  0.0881" and lines[3] == "total        5 min 32 s"
  assert console.minutes(332.4) == "5 min 32 s" and console.minutes(59.4) == "59 s"


def test_estimate_model_by_hand(tmp_path):
  """estimate_seconds = the documented model: steps x step time; a forward pass is a third
  of a step per batch; the report REPORT_STEPS steps plus two forward passes of the scan."""
  d = str(tmp_path / "fm")
  make_fmnist(d, n_train=40, n_test=10)
  c = small_config(d)                      # batch 8, 10 test images, centre crop
  c.report.max_examples = -1
  est = job.estimate_seconds(c, str(tmp_path / "wd"), 0.3, remaining_steps=100,
                                  write_report=True)
  fwd = 0.3 / 3 / 8
  assert est["training"] == pytest.approx(30.0)
  assert est["final evaluation"] == pytest.approx(10 * fwd)
  assert est["report"] == pytest.approx(job.REPORT_STEPS * 0.3 + 2 * 10 * fwd)
  assert not [k for k in est if k.startswith("comparison")]  # small_config trains none
  c.ten_crop_eval = True
  est = job.estimate_seconds(c, str(tmp_path / "wd"), 0.3, remaining_steps=0,
                                  write_report=False)
  assert est == pytest.approx({"training": 0.0, "final evaluation": 100 * fwd})


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  """``python -m zfnet_jax.main`` on a tiny config with a small report, output captured."""
  tmp = tmp_path_factory.mktemp("console")
  fm = str(tmp / "fm")
  make_fmnist(fm, n_train=64, n_test=16)
  cfg = tmp / "cfg.py"
  cfg.write_text(textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {TESTS!r})
      from helpers import small_config
      def get_config():
        c = small_config({fm!r}, steps=6)
        c.log_every_steps = 2
        c.checkpoint_every_steps = 3
        c.report.enabled = True
        c.analyses.enabled = False
        return c
      """))
  workdir = tmp / "wd"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  env.pop("ZFNET_PROGRESS_SECONDS", None)
  p = subprocess.run([sys.executable, "-m", "zfnet_jax.main", f"--config={cfg}",
                      f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True,
                     timeout=300, env=env)
  return p, workdir


@pytest.mark.slow
def test_cli_console_is_short_and_quiet(cli_run):
  p, workdir = cli_run
  assert p.returncode == 0, p.stderr[-3000:]
  lines = (p.stdout + p.stderr).splitlines()
  assert len(lines) <= 40, "\n".join(lines)
  for chatter in ("checkpoint_manager", "orbax", "I0000", "oneDNN", "absl::InitializeLog",
                  "Traceback", "\r"):
    assert not any(chatter in l for l in lines), (chatter, lines)
  events = [l for l in lines if set(l) != {"-"}]       # the table's two rules are alike
  assert len(set(events)) == len(events), "a line printed twice:\n" + "\n".join(lines)
  # the plan first, the summary table last, with the report's path
  assert lines[0].startswith("zfnet_jax: ZFNetLowRes on fashion_mnist_idx")
  assert any(l.startswith("  1. train") for l in lines)
  report = os.path.join(str(workdir), "report", "index.html")
  assert any(l.startswith("report") and l.endswith(report) for l in lines)
  assert os.path.exists(report)
  assert any(l.startswith("top-1 error") for l in lines)


@pytest.mark.slow
def test_cli_writes_timings(cli_run):
  p, workdir = cli_run
  assert p.returncode == 0
  t = rundir.read_json(os.path.join(str(workdir), rundir.TIMINGS))
  assert set(t["phases"]) == {"training and evaluation", "report"}
  assert set(t["report_sections"]) == {"run", "atlas"}
  assert t["machine"]["cores"] == os.cpu_count() and t["machine"]["cpu"]
  assert t["total_seconds"] >= sum(t["phases"].values())
  assert "jax" in t["versions"]
  res = json.load(open(os.path.join(str(workdir), rundir.RESULTS)))
  assert res["eval_seconds"] > 0 and res["train_seconds"] > 0
