"""Two processes on 127.0.0.1 (2 CPU devices each) train exactly as one process with 4."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from zfnet_jax import checkpoints, input_pipeline as ip, train

from helpers import make_fmnist, small_config

WORKER = r"""
import json, sys
sys.path.insert(0, {tests!r})
from helpers import small_config
from zfnet_jax import train
c = small_config({fm!r}, steps=3)
c.distributed = True
c.model.dropout_rate = 0.5
c.checkpoint_every_steps = 2
train.train_and_evaluate(c, {wd!r})
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
  fm = str(tmp_path / "fm")
  make_fmnist(fm, n_train=64, n_test=23)
  ip._fashion_mnist.cache_clear()
  multi = str(tmp_path / "multi")
  port = _free_port()
  code = WORKER.format(tests=os.path.dirname(__file__), fm=fm, wd=multi)
  procs = []
  for pid in range(2):
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(pid), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs.append(subprocess.Popen([sys.executable, "-c", code], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]

  # The same run in this process on 4 devices.
  c = small_config(fm, steps=3)
  c.model.dropout_rate = 0.5
  c.checkpoint_every_steps = 2
  single = str(tmp_path / "single")
  res = train.train_and_evaluate(c, single)
  multi_res = json.load(open(os.path.join(multi, "results.json")))
  assert multi_res["num_eval_examples"] == res["num_eval_examples"] == 23
  assert multi_res["top1_error"] == pytest.approx(res["top1_error"])
  # Batches, crops and per-device work are bit-identical (test_input_pipeline); the mean of
  # the 4 devices' gradients goes through gloo's all-reduce across processes, which may sum
  # in another order than one process's all-reduce: parameters agree to 1e-5, on purpose.
  a = checkpoints.load_trained(multi)[1]["params"]
  b = checkpoints.load_trained(single)[1]["params"]
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                       rtol=1e-5, atol=1e-7), a, b)
