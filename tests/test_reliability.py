"""Reliability: SIGKILL / SIGTERM mid-run then resume, damaged checkpoints, non-finite loss.

Training runs in a subprocess through ``zfnet_jax.main`` (a tiny ZFNetLowRes on
a random Fashion-MNIST-format subset, one CPU device; each batch slowed down by
a sleep so the kill lands mid-run) and is killed from outside; the reruns must
end with exactly the parameters of an uninterrupted run.
"""
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import time

import jax
import numpy as np
import pytest

from zfnet_jax.data import iterators, sources
from zfnet_jax.training import checkpoints, loop, runtime, weights

import helpers
from helpers import make_fmnist

STEPS, EVERY = helpers.RELIABILITY_STEPS, helpers.RELIABILITY_EVERY
tiny_config = helpers.reliability_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """(fmnist dir, workdir of an uninterrupted run, its final params)."""
  d = str(tmp_path_factory.mktemp("fm"))
  make_fmnist(d, n_train=64, n_test=8)
  sources._fashion_mnist.cache_clear()
  full = str(tmp_path_factory.mktemp("full"))
  run(tiny_config(d), full)
  return d, full, params_of(full)


def run(config, workdir):
  """In-process training on one device (as the subprocesses)."""
  return loop.train_and_evaluate(config, workdir, devices=jax.devices()[:1])


def params_of(workdir):
  return jax.tree.map(np.asarray, weights.load_trained(workdir)[1]["params"])


def assert_same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def steps_on_disk(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def start_main(tmp_path, fmnist_dir, workdir, delay):
  """``python -m zfnet_jax.main`` on the tiny config, each training batch delayed."""
  return helpers.start_main(tmp_path, fmnist_dir, workdir,
                            setup=f"helpers.slow_down_training({delay})")


def wait_for_step(proc, workdir, step, timeout=120):
  t0 = time.time()
  while step not in steps_on_disk(workdir):
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    assert time.time() - t0 < timeout, "no checkpoint appeared"
    time.sleep(0.02)


@pytest.mark.slow  # trains (or uses the session's tiny trained run)
def test_sigterm_then_sigkill_then_rerun_resumes_exactly(data, tmp_path, capsys):
  fmnist_dir, _, full = data
  wd = str(tmp_path / "wd")
  # 1. SIGTERM: finishes the step, saves it, exits with EXIT_PREEMPTED, no traceback.
  proc = start_main(tmp_path, fmnist_dir, wd, delay=0.15)
  wait_for_step(proc, wd, EVERY)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == runtime.EXIT_PREEMPTED, out[-3000:]
  saved = max(steps_on_disk(wd))
  assert f"SIGTERM: stopped after step {saved} and saved checkpoint step {saved}" in out
  assert EVERY <= saved < STEPS - 2 * EVERY and "Traceback" not in out
  assert not os.path.exists(os.path.join(wd, "results.json"))
  # 2. The same command again: resumes from it; SIGKILL mid-run.
  proc = start_main(tmp_path, fmnist_dir, wd, delay=0.15)
  target = (saved // EVERY + 1) * EVERY
  wait_for_step(proc, wd, target)
  proc.send_signal(signal.SIGKILL)
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == -signal.SIGKILL
  assert f"Resuming from checkpoint step {saved}" in out
  assert not os.path.exists(os.path.join(wd, "results.json"))   # it really was mid-run
  latest = max(steps_on_disk(wd))
  assert target <= latest < STEPS
  # 3. Again: loses only the steps after the last checkpoint, ends exactly as uninterrupted.
  res = run(tiny_config(fmnist_dir), wd)
  assert f"Resuming from checkpoint step {latest}" in capsys.readouterr().out
  assert res["steps"] == STEPS
  assert_same(params_of(wd), full)
  rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, STEPS + 1))


def test_damaged_latest_checkpoint_falls_back_and_says_so(data, tmp_path, capsys):
  fmnist_dir, full_wd, full = data
  wd = str(tmp_path / "wd")
  shutil.copytree(full_wd, wd)
  assert steps_on_disk(wd) == [STEPS - EVERY, STEPS]
  # Truncate the newest checkpoint's array files (as a disk-full or torn copy would).
  for f in glob.glob(os.path.join(wd, "checkpoints", str(STEPS), "state", "**", "*"),
                     recursive=True):
    if os.path.isfile(f) and os.path.getsize(f) > 1000:
      with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
  # A step killed while being written: Orbax's temporary directory, never a step.
  partial = os.path.join(wd, "checkpoints", f"{STEPS + EVERY}.orbax-checkpoint-tmp-123")
  os.makedirs(os.path.join(partial, "state"))
  open(os.path.join(partial, "state", "_METADATA"), "w").write('{"tree": ')
  res = run(tiny_config(fmnist_dir), wd)
  out = capsys.readouterr().err
  assert f"checkpoint step {STEPS} in {wd}/checkpoints is damaged" in out
  assert f"falling back to checkpoint step {STEPS - EVERY}" in out
  assert os.listdir(os.path.join(wd, "checkpoints_damaged"))
  assert res["steps"] == STEPS and steps_on_disk(wd) == [STEPS - EVERY, STEPS]
  assert_same(params_of(wd), full)


def flip_a_parameter_byte(step_dir):
  """Flip one byte in the middle of the step's largest array file (the parameters' data,
  compressed: Orbax alone may load such a file without an error but with other values);
  returns that file."""
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
           if os.path.isfile(f)]
  big = max(files, key=os.path.getsize)
  data = bytearray(open(big, "rb").read())
  data[len(data) // 2] ^= 0xFF
  open(big, "wb").write(bytes(data))
  return big


def test_flipped_byte_in_latest_checkpoint_falls_back_and_trains_identically(data, tmp_path,
                                                                             capsys):
  fmnist_dir, full_wd, full = data
  wd = str(tmp_path / "wd")
  shutil.copytree(full_wd, wd)
  bad = flip_a_parameter_byte(os.path.join(wd, "checkpoints", str(STEPS)))
  with pytest.raises(ValueError, match=re.escape(bad)):
    weights.load_trained(wd, STEPS)     # that step: named, no fallback
  res = run(tiny_config(fmnist_dir), wd)
  out = capsys.readouterr().err
  warning = [line for line in out.splitlines() if "damaged" in line]
  assert len(warning) == 2, out[-3000:]           # the damage, then the fallback
  assert warning[0].startswith(f"warning: checkpoint step {STEPS} in {wd}/checkpoints is "
                               "damaged") and bad in warning[0]
  assert warning[1].startswith(f"warning: falling back to checkpoint step {STEPS - EVERY}")
  assert [d.split(".")[0] for d in os.listdir(os.path.join(wd, "checkpoints_damaged"))] == \
      [str(STEPS)]
  assert res["steps"] == STEPS and steps_on_disk(wd) == [STEPS - EVERY, STEPS]
  assert_same(params_of(wd), full)          # steps 21-24 again: exactly the uninterrupted run


def test_checksum_manifests_and_checkpoints_without_them(data, tmp_path, capsys):
  fmnist_dir, full_wd, full = data
  wd = str(tmp_path / "wd")
  shutil.copytree(full_wd, wd)
  for step in steps_on_disk(wd):            # each kept step: sha256 of every other file
    step_dir = os.path.join(wd, "checkpoints", str(step))
    manifest = os.path.join(step_dir, checkpoints.MANIFEST)
    want = {os.path.relpath(f, step_dir): hashlib.sha256(open(f, "rb").read()).hexdigest()
            for f in glob.glob(os.path.join(step_dir, "**", "*"), recursive=True)
            if os.path.isfile(f) and f != manifest}
    assert json.load(open(manifest))["sha256"] == want and len(want) > 10
    os.remove(manifest)                     # as a checkpoint written before manifests
  assert_same(params_of(wd), full)
  res = run(tiny_config(fmnist_dir), wd)
  out = capsys.readouterr()
  assert f"Resuming from checkpoint step {STEPS}" in out.out and "damaged" not in out.err
  assert res["steps"] == STEPS


def test_non_finite_loss_stops_naming_step_and_keeps_last_good(data, tmp_path, monkeypatch):
  fmnist_dir = data[0]
  make = iterators.create_train_iterator

  def poisoned(*args, **kwargs):
    for i, b in enumerate(make(*args, **kwargs), start=args[2] + 1):  # i = the step
      if i == 7:
        b = dict(b, image=np.full_like(b["image"], np.nan))
      yield b
  monkeypatch.setattr(iterators, "create_train_iterator", poisoned)
  c = tiny_config(fmnist_dir, steps=12)
  c.checkpoint_every_steps = 2
  wd = str(tmp_path / "nan")
  with pytest.raises(FloatingPointError, match=r"at step 7 \(loss nan.*last good checkpoint "
                                               r"is step 6"):
    run(c, wd)
  assert max(steps_on_disk(wd)) == 6
  p = params_of(wd)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(p))


@pytest.mark.slow  # trains in a subprocess, then again to the end
def test_sigabrt_mid_step_then_rerun_resumes_exactly(data, tmp_path):
  """A fatal signal from outside Python (as XLA's check failures raise) mid-run: the
  same command again says it resumes, from which step, and ends as uninterrupted."""
  fmnist_dir, _, full = data
  wd = str(tmp_path / "wd")
  proc = start_main(tmp_path, fmnist_dir, wd, delay=0.15)
  wait_for_step(proc, wd, 2 * EVERY)
  proc.send_signal(signal.SIGABRT)
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == -signal.SIGABRT, out[-3000:]
  assert not os.path.exists(os.path.join(wd, "results.json"))
  latest = max(steps_on_disk(wd))
  proc = start_main(tmp_path, fmnist_dir, wd, delay=0)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out[-3000:]
  assert len([l for l in out.splitlines() if "Resuming from checkpoint step" in l]) == 1
  assert f"Resuming from checkpoint step {latest} in {wd}" in out
  assert_same(params_of(wd), full)
