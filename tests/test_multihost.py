"""Two processes on 127.0.0.1 (2 CPU devices each) train exactly as one process with 4,
on every data path: in-memory Fashion-MNIST, a folder of images, a TFDS dataset."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from zfnet_jax.data import iterators, sources
from zfnet_jax.training import loop, weights

import helpers

WORKER = r"""
import sys
sys.path.insert(0, {tests!r})
import helpers
from zfnet_jax.training import loop
c = helpers.multihost_config({path!r}, {data!r})
c.distributed = True
with helpers.multihost_data({path!r}):
  loop.train_and_evaluate(c, {wd!r})
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_pair(code, signal_to=None, when=None, timeout=300):
  """Two worker processes; optionally SIGTERM ``signal_to`` once ``when()`` is true."""
  port = _free_port()
  procs = []
  for pid in range(2):
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(pid), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs.append(subprocess.Popen([sys.executable, "-c", code], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  if signal_to is not None:
    t0 = time.time()
    while not when() and time.time() - t0 < timeout:
      time.sleep(0.1)
    procs[signal_to].send_signal(signal.SIGTERM)
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  return [p.returncode for p in procs], outs


@pytest.mark.slow
@pytest.mark.parametrize("path", ["memory", "folder", "tfds"])
def test_two_processes_equal_one(tmp_path, path):
  data = helpers.make_multihost_data(path, str(tmp_path / "data"))
  sources._fashion_mnist.cache_clear()
  multi = str(tmp_path / "multi")
  code = WORKER.format(tests=os.path.dirname(__file__), path=path, data=data, wd=multi)
  codes, outs = _run_pair(code)
  assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]

  # The same run in this process on 4 devices.
  single = str(tmp_path / "single")
  with helpers.multihost_data(path):
    res = loop.train_and_evaluate(helpers.multihost_config(path, data), single)
  multi_res = json.load(open(os.path.join(multi, "results.json")))
  assert multi_res["num_eval_examples"] == res["num_eval_examples"] > 0
  assert multi_res["top1_error"] == pytest.approx(res["top1_error"])
  # Batches, crops and per-device work are bit-identical (test_input_pipeline); the mean of
  # the 4 devices' gradients goes through gloo's all-reduce across processes, which may sum
  # in another order than one process's all-reduce: parameters agree to 1e-5, on purpose.
  # Different examples or augmentations per step would differ by far more (dropout 0.5,
  # learning rate 1e-2: a test of this claim is test_input_pipeline's split-by-process).
  a = weights.load_trained(multi)[1]["params"]
  b = weights.load_trained(single)[1]["params"]
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                       rtol=1e-5, atol=1e-7), a, b)


@pytest.mark.parametrize("path", ["folder", "tfds"])
def test_tf_data_paths_split_one_global_order(tmp_path, path):
  """Each process's batch is its contiguous slice of the one-process global batch."""
  data = helpers.make_multihost_data(path, str(tmp_path / "data"))
  c = helpers.multihost_config(path, data)
  wd = str(tmp_path / "wd")
  with helpers.multihost_data(path):
    one = iterators.create_train_iterator(c, wd, 3, 0, 1)
    full = [next(one) for _ in range(3)]
    halves = [iterators.create_train_iterator(c, wd, 3, p, 2) for p in range(2)]
    for step in range(3):
      parts = [next(h) for h in halves]
      for key in ("image", "label"):
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]),
                                      full[step][key], err_msg=f"{path} step {step} {key}")


PREEMPT_WORKER = r"""
import sys
sys.path.insert(0, {tests!r})
import helpers
from zfnet_jax.training import loop
helpers.slow_down_training({delay})
c = helpers.multihost_config("memory", {data!r}, steps={steps})
c.distributed = True
res = loop.train_and_evaluate(c, {wd!r})
print("RESULT", res, flush=True)
sys.exit(75 if res.get("preempted") else 0)
"""


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  """Preemption on several hosts: SIGTERM reaches process 1 only; both save the same step
  and exit 75; rerun, they finish exactly as an uninterrupted one-process run."""
  data = helpers.make_multihost_data("memory", str(tmp_path / "data"))
  sources._fashion_mnist.cache_clear()
  steps, wd = 16, str(tmp_path / "multi")
  code = PREEMPT_WORKER.format(tests=os.path.dirname(__file__), data=data, wd=wd, steps=steps,
                               delay=0.3)
  ckpt = os.path.join(wd, "checkpoints")
  codes, outs = _run_pair(code, signal_to=1,
                          when=lambda: os.path.isdir(os.path.join(ckpt, "2")))
  assert codes == [75, 75], outs[0][-2000:] + outs[1][-2000:]
  saved = [int(s) for s in os.listdir(ckpt) if s.isdigit()]
  stopped = max(saved)
  assert 2 <= stopped < steps, saved
  assert f"SIGTERM: stopped after step {stopped}" in outs[0], outs[0][-2000:]
  assert "'preempted': True" in outs[1] and f"'steps': {stopped}" in outs[1], outs[1][-2000:]
  codes, outs = _run_pair(PREEMPT_WORKER.format(tests=os.path.dirname(__file__), data=data,
                                                wd=wd, steps=steps, delay=0.0))
  assert codes == [0, 0], outs[0][-2000:] + outs[1][-2000:]
  single = str(tmp_path / "single")
  loop.train_and_evaluate(helpers.multihost_config("memory", data, steps=steps), single)
  a = weights.load_trained(wd)[1]["params"]
  b = weights.load_trained(single)[1]["params"]
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                       rtol=1e-5, atol=1e-7), a, b)
