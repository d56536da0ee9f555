"""Reliability II: the workdir lock, divergence, records across a resume, SIGTERM inside
and outside the training loop, leftovers of interrupted writes, a full disk.

A tiny ZFNetLowRes on random Fashion-MNIST-format data, one CPU device; faults are
injected in-process (a hook that sends SIGTERM to this process, a writer that raises
ENOSPC) or, where the exit code or a second process matters, in ``zfnet_jax.main``
subprocesses.
"""
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import textwrap
import time

import jax
import numpy as np
import pytest

from zfnet_jax import rundir
from zfnet_jax.data import sources
from zfnet_jax.training import checkpoints, loop, runtime

import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY, LOG = helpers.RELIABILITY_STEPS, helpers.RELIABILITY_EVERY, 5


def config(fmnist_dir, steps=STEPS):
  """reliability_config logging every 5 steps (rows average several steps; checkpoints
  every 4 fall between rows)."""
  c = helpers.reliability_config(fmnist_dir, steps)
  c.log_every_steps = LOG
  return c


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """(fmnist dir, workdir of an uninterrupted run)."""
  d = str(tmp_path_factory.mktemp("fm"))
  helpers.make_fmnist(d, n_train=64, n_test=8)
  sources._fashion_mnist.cache_clear()
  full = str(tmp_path_factory.mktemp("full"))
  run(config(d), full)
  return d, full


def run(c, workdir, hooks=()):
  return loop.train_and_evaluate(c, workdir, devices=jax.devices()[:1], hooks=hooks)


def steps_on_disk(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def rows(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def dead_pid():
  """The pid of a process that has ended (and been reaped)."""
  p = subprocess.Popen(["true"])
  p.wait()
  return p.pid


def start_main(tmp_path, fmnist_dir, workdir, *, setup="", overrides="", name="run"):
  """``helpers.start_main`` with this module's logging cadence."""
  return helpers.start_main(tmp_path, fmnist_dir, workdir, setup=setup, name=name,
                            overrides=f"c.log_every_steps = {LOG}\n" + textwrap.dedent(overrides))


# -- 1. the workdir lock ----------------------------------------------------------------

@pytest.mark.slow   # two processes start (imports, compilation)
def test_second_training_process_stops_at_once_naming_the_first(data, tmp_path):
  fmnist_dir, _ = data
  wd, release = str(tmp_path / "wd"), str(tmp_path / "release")
  # The first process waits before step 6 until the test releases it.
  hold = f"""
      make = iterators.create_train_iterator
      def held(*args, **kwargs):
        for i, b in enumerate(make(*args, **kwargs), start=args[2] + 1):
          while i == 6 and not os.path.exists({release!r}):
            time.sleep(0.05)
          yield b
      iterators.create_train_iterator = held
      """
  first = start_main(tmp_path, fmnist_dir, wd, setup=hold, name="first")
  t0 = time.time()
  while EVERY not in steps_on_disk(wd):
    assert first.poll() is None, first.communicate()[0][-3000:]
    assert time.time() - t0 < 120
    time.sleep(0.05)
  second = start_main(tmp_path, fmnist_dir, wd, name="second")
  out = second.communicate(timeout=120)[0]
  assert second.returncode == 2, out[-3000:]
  last = out.strip().splitlines()[-1]
  assert last.startswith(f"error: workdir {wd} is in use by another training process "
                         f"(pid {first.pid} on host {socket.gethostname()}"), last
  assert "Traceback" not in out and first.poll() is None
  open(release, "w").close()
  out = first.communicate(timeout=120)[0]
  assert first.returncode == 0, out[-3000:]
  # The first run's records are whole: one row per log, in order, one evaluation.
  want = sorted(set(range(LOG, STEPS + 1, LOG)) | {STEPS})
  assert [r["step"] for r in rows(wd) if r["split"] == "train"] == want
  assert [r["step"] for r in rows(wd) if r["split"] == "eval"] == [STEPS]
  assert steps_on_disk(wd) == [STEPS - EVERY, STEPS]


def test_lock_names_its_holder_and_a_stale_one_is_taken_over(data, tmp_path, capsys):
  fmnist_dir, _ = data
  wd = str(tmp_path / "wd")
  os.makedirs(wd)
  lock = os.path.join(wd, "training.lock")
  # A live holder (this test, through its own file descriptor): refused at once.
  fd = os.open(lock, os.O_RDWR | os.O_CREAT)
  fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  os.write(fd, json.dumps({"pid": 4242, "host": "otherhost", "since": "today"}).encode())
  with pytest.raises(OSError, match=f"workdir {wd} is in use by another training process "
                                    r"\(pid 4242 on host otherhost"):
    run(config(fmnist_dir, steps=2), wd)
  assert os.listdir(wd) == ["training.lock"]    # nothing else written
  os.close(fd)
  # A holder killed without releasing: its record is stale; taken over with a notice.
  gone = dead_pid()
  with open(lock, "w") as f:
    json.dump({"pid": gone, "host": socket.gethostname(), "since": "yesterday"}, f)
  res = run(config(fmnist_dir, steps=2), wd)
  assert res["steps"] == 2
  out = capsys.readouterr().err
  assert f"warning: taking over the lock of workdir {wd}: its holder (pid {gone} on host " \
         f"{socket.gethostname()}" in out
  assert os.path.getsize(lock) == 0             # released


# -- SIGTERM, in-process (the subprocess versions are slow-marked) -------------------------

def test_sigterm_in_training_saves_that_step_and_the_rerun_equals_an_uninterrupted_run(
    data, tmp_path, capsys):
  """A real SIGTERM to this process after step 6 (between checkpoints): the step finishes,
  is saved, and the run returns preempted; the same call again resumes and ends with the
  uninterrupted run's parameters, bit for bit."""
  fmnist_dir, full = data
  wd = str(tmp_path / "wd")

  def sigterm_at_6(step, state, writer):
    del state, writer
    if step == 6:
      os.kill(os.getpid(), signal.SIGTERM)

  before = signal.getsignal(signal.SIGTERM)
  res = run(config(fmnist_dir), wd, hooks=[sigterm_at_6])
  assert res == {"preempted": True, "steps": 6}
  assert signal.getsignal(signal.SIGTERM) is before           # handler restored
  assert 6 in steps_on_disk(wd) and max(steps_on_disk(wd)) == 6
  assert "SIGTERM: stopped after step 6 and saved checkpoint step 6" in capsys.readouterr().err
  res = run(config(fmnist_dir), wd)
  assert res["steps"] == STEPS
  got = helpers.saved_state(os.path.join(wd, "checkpoints", str(STEPS)))["params"]
  want = helpers.saved_state(os.path.join(full, "checkpoints", str(STEPS)))["params"]
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)


def test_sigterm_outside_training_raises_preempted_once_and_restores_the_handler():
  """Start-up, final evaluation, report: the first SIGTERM raises ``Preempted`` (a
  BaseException, so ``except Exception`` cannot swallow it); later ones are ignored
  while the work unwinds; the previous handler comes back."""
  before = signal.getsignal(signal.SIGTERM)
  unwound = []
  with pytest.raises(runtime.Preempted):
    with runtime.sigterm_raises():
      try:
        try:
          os.kill(os.getpid(), signal.SIGTERM)
          time.sleep(5)                                 # interrupted at once
        except Exception:                               # pylint: disable=broad-except
          pytest.fail("Preempted was caught as an Exception")
      finally:
        os.kill(os.getpid(), signal.SIGTERM)            # a second one during clean-up
        unwound.append(True)
  assert unwound == [True]
  assert signal.getsignal(signal.SIGTERM) is before


# -- 4. divergence -----------------------------------------------------------------------

@pytest.mark.parametrize("max_loss,at", [(1e4, 2), (0.0, 4)])
def test_divergence_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, max_loss, at):
  """Adam at learning rate 1e6: the loss jumps from ln 10 to ~1e25 at step 2 and stays
  far above (never NaN).  With the ceiling it stops at step 2; without it after
  ``divergence_patience`` (3) rows above 100 x ln 10, at step 4."""
  fmnist_dir, _ = data
  c = helpers.small_config(fmnist_dir, steps=12)
  c.optimizer, c.learning_rate, c.weight_decay = "adam", 1e6, 0.0
  c.checkpoint_every_steps, c.max_loss = 1, max_loss
  wd = str(tmp_path / "div")
  with pytest.raises(FloatingPointError,
                     match=f"training diverged at step {at}: .*last good checkpoint is step 1"):
    run(c, wd)
  assert steps_on_disk(wd) == [1]               # no diverged state saved
  assert not os.path.exists(os.path.join(wd, "results.json"))
  loss = [r["loss"] for r in rows(wd) if r["split"] == "train"]
  assert loss[0] == pytest.approx(np.log(10), abs=0.05) and min(loss[1:]) > 100 * np.log(10)
  params = helpers.saved_state(os.path.join(wd, "checkpoints", "1"))["params"]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.parametrize("initial_loss,quiet,diverges", [(0.5, 3.0, 4.7), (5.0, 6.0, 10.1)])
def test_divergence_level_is_the_larger_of_first_loss_and_ln_classes(initial_loss, quiet,
                                                                     diverges):
  """Level = factor x max(first loss, ln 10): with factor 2, 2 ln 10 = 4.61 when the first
  loss (0.5) is below ln 10, 10 when it (5.0) is above.  ``quiet`` is above the other
  term's level and must pass; ``diverges`` is above this one and must stop."""
  from types import SimpleNamespace
  from zfnet_jax.training import progress
  cfg = SimpleNamespace(divergence_factor=2.0, divergence_patience=1, max_loss=0.0,
                        model=SimpleNamespace(name="m"))
  run_ = SimpleNamespace(config=cfg, info=SimpleNamespace(num_classes=10), num_steps=100,
                         workdir="/w")
  mngr = SimpleNamespace(latest_step=lambda: 7)
  p = progress._Progress(run_, 0, {"initial_loss": initial_loss})
  try:
    p.check_divergence(10, quiet, mngr)
    assert not p.diverging
    level = 2 * max(initial_loss, np.log(10))
    with pytest.raises(FloatingPointError, match=f"step 20: loss {diverges:.4g} above "
                       f"{level:.4g} .* last good checkpoint is step 7 in /w/checkpoints"):
      p.check_divergence(20, diverges, mngr)
  finally:
    p.close()


# -- 6. records after a resume -------------------------------------------------------------

@pytest.mark.slow   # about 7 s of sleeps, two starts
def test_records_after_sigterm_and_resume_match_an_uninterrupted_run(data, tmp_path):
  fmnist_dir, full = data
  wd, stop = str(tmp_path / "wd"), 18     # stop: between rows (15, 20) and checkpoints (16, 20)
  seen = {}                               # step -> wall time of its hook

  def hook(step, state, writer):
    del state, writer
    if step <= stop:
      time.sleep(0.4)                     # a long first segment: it must count
    seen[step] = time.time()
    if step == stop and not os.path.exists(os.path.join(wd, "resumed")):
      os.kill(os.getpid(), signal.SIGTERM)
  out = run(config(fmnist_dir), wd, hooks=[hook])
  assert out == {"preempted": True, "steps": stop}
  open(os.path.join(wd, "resumed"), "w").close()
  res = run(config(fmnist_dir), wd, hooks=[hook])
  # Every row as in the uninterrupted run (the steps 16-18 before the stop are in row 20).
  keys = ("step", "epoch", "split", "loss", "top1_error", "top5_error", "learning_rate")
  got, want = rows(wd), rows(full)
  assert [[r[k] for k in keys[:3]] for r in got] == [[r[k] for k in keys[:3]] for r in want]
  for g, w in zip(got, want):
    for k in keys[3:]:
      if k in w:
        assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-6), (g, w)
  # Training time of both segments: at least the time between their steps' hooks.
  spans = (seen[stop] - seen[1]) + (seen[STEPS] - seen[stop + 1])
  assert res["train_seconds"] >= spans, (res["train_seconds"], spans)


def test_rerun_of_a_finished_run_changes_nothing_in_its_records(data, tmp_path):
  fmnist_dir, full = data
  wd = str(tmp_path / "wd")
  shutil.copytree(full, wd)
  files = ("metrics.jsonl", "results.json", "config.json", "evolution.json")
  before = {f: open(os.path.join(wd, f), "rb").read() for f in files}
  events = sorted(f for f in os.listdir(wd) if f.startswith("events.out"))
  again = run(config(fmnist_dir), wd)
  stored = json.load(open(os.path.join(wd, "results.json")))
  assert json.dumps(again, sort_keys=True) == \
      json.dumps({k: v for k, v in stored.items() if k != "versions"}, sort_keys=True)
  assert {f: open(os.path.join(wd, f), "rb").read() for f in files} == before
  assert sorted(f for f in os.listdir(wd) if f.startswith("events.out")) == events


# -- 7. SIGTERM outside the training loop ------------------------------------------------------

REPORT = """
c.report.enabled = True
c.analyses.enabled = False
c.report.layers = ("conv1",)
c.report.num_maps, c.report.top_k = 2, 2
c.report.max_examples, c.report.batch_size, c.report.chunk_size = 8, 8, 8
"""


@pytest.mark.slow   # three runs of main in subprocesses
def test_sigterm_in_final_evaluation_and_in_report_exits_75_then_rerun_finishes(data, tmp_path):
  fmnist_dir, _ = data
  wd = str(tmp_path / "wd")
  # 1. SIGTERM during the final evaluation: exit 75, the last checkpoint kept, no results.
  p = start_main(tmp_path, fmnist_dir, wd, setup=helpers.kill_in("loop", "evaluate"),
                 overrides=REPORT, name="eval")
  out = p.communicate(timeout=300)[0]
  assert p.returncode == 75, out[-3000:]
  assert "SIGTERM" in out and "Traceback" not in out
  assert max(steps_on_disk(wd)) == STEPS
  assert not os.path.exists(os.path.join(wd, "results.json"))
  # 2. SIGTERM while the report is written: exit 75, no temporary folder left.
  p = start_main(tmp_path, fmnist_dir, wd, setup=helpers.kill_in("report.pages", "render"),
                 overrides=REPORT, name="report")
  out = p.communicate(timeout=300)[0]
  assert p.returncode == 75, out[-3000:]
  assert "Traceback" not in out
  assert [f for f in os.listdir(wd) if f.startswith(".report")] == []
  assert not os.path.exists(os.path.join(wd, "report"))
  results = open(os.path.join(wd, "results.json")).read()
  # 3. The same command again finishes the remaining work (the report) only.
  p = start_main(tmp_path, fmnist_dir, wd, overrides=REPORT, name="again")
  out = p.communicate(timeout=300)[0]
  assert p.returncode == 0, out[-3000:]
  assert os.path.exists(os.path.join(wd, "report", "index.html"))
  assert open(os.path.join(wd, "results.json")).read() == results
  assert [r["step"] for r in rows(wd) if r["split"] == "eval"] == [STEPS]


# -- 8. leftovers of interrupted writes ---------------------------------------------------------

def plant(paths):
  """0-byte files for ``*.tmp<pid>`` names, else folders holding a cut-off file."""
  for p in paths:
    if ".tmp" in os.path.basename(p) and not os.path.basename(p).startswith(".report"):
      open(p, "w").close()
    else:
      os.makedirs(os.path.join(p, "state"))
      open(os.path.join(p, "state", "_METADATA"), "w").write('{"tree": ')


def test_leftovers_are_cleaned_on_the_next_start_but_not_those_in_use(data, tmp_path, capsys):
  fmnist_dir, full = data
  wd = str(tmp_path / "wd")
  shutil.copytree(full, wd)
  host, gone, live = socket.gethostname(), dead_pid(), os.getppid()
  ck = os.path.join(wd, "checkpoints")
  stale = [os.path.join(ck, f"{STEPS + EVERY}.orbax-checkpoint-tmp"),        # a killed save
           os.path.join(ck, f"{STEPS + 2 * EVERY}.orbax-checkpoint-tmp-1234"),
           os.path.join(wd, f"config.json.tmp{gone}"),                       # a full disk
           os.path.join(ck, str(STEPS), f"{checkpoints.MANIFEST}.tmp{gone}"),
           os.path.join(wd, ".report-tmp-k2j4f_x1"),                         # older naming
           os.path.join(wd, f".report-tmp-{gone}@{host}-abc123"),
           os.path.join(wd, f".report-old-{gone}@{host}-abc123")]
  in_use = [os.path.join(wd, f".report-tmp-{live}@{host}-abc123"),           # a live report
            os.path.join(wd, f".report-tmp-{gone}@another-host-abc123")]     # unknown: kept
  plant(stale + in_use)
  res = run(config(fmnist_dir), wd)             # training start, the lock held: all
  assert res["steps"] == STEPS
  assert not any(os.path.exists(p) for p in stale), [p for p in stale if os.path.exists(p)]
  assert all(os.path.exists(p) for p in in_use)
  assert "leftover(s) of interrupted writes" in capsys.readouterr().out
  # A report-only process (no lock) removes only report folders whose process is gone.
  plant(stale[2:])
  rundir.clean_leftovers(wd, locked=False)
  assert [os.path.exists(p) for p in stale[2:]] == [True] * 3 + [False] * 2
  assert all(os.path.exists(p) for p in in_use)
  assert steps_on_disk(wd) == [STEPS - EVERY, STEPS]


# -- 11. a full disk ----------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["orbax", "metrics"])
def test_full_disk_says_so_in_one_line_and_keeps_the_last_checkpoint(data, tmp_path,
                                                                     monkeypatch, where):
  """ENOSPC as Orbax reports it (TensorStore's ValueError) at the save of step 8, or as
  an OSError from the metrics writer at step 10 (after step 8 is saved)."""
  fmnist_dir, _ = data
  wd = str(tmp_path / "wd")
  real_save, real_append = checkpoints.save, rundir.append_metrics
  target = os.path.join(wd, "checkpoints", "8.orbax-checkpoint-tmp", "state", "_sharding")
  metrics = os.path.join(wd, "metrics.jsonl")

  def full_save(mngr, step, state, meta):
    if step == 8:
      raise ValueError(f'RESOURCE_EXHAUSTED: Error writing local file "{target}": Failed to '
                       "write 8640 bytes to file 15: No space left on device "
                       "[os_error_code='28']")
    real_save(mngr, step, state, meta)

  def full_append(file, row):
    if row["step"] == 10:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), file)
    real_append(file, row)
  if where == "orbax":
    monkeypatch.setattr(checkpoints, "save", full_save)
  else:
    monkeypatch.setattr(rundir, "append_metrics", full_append)
  with pytest.raises((OSError, ValueError)) as e:
    run(config(fmnist_dir), wd)
  msg, kept = str(e.value), 4 if where == "orbax" else 8
  assert isinstance(e.value, OSError) and "\n" not in msg and len(msg) < 400, msg
  assert msg.startswith("the disk is full") and (target if where == "orbax" else metrics) in msg
  assert f"last good checkpoint, step {kept} in {wd}/checkpoints, is kept" in msg
  assert steps_on_disk(wd) == [4, 8][:kept // 4]
