"""The benchmarks' own code: the PyTorch twin computes our model's function, the GPU
script's smoke path runs end to end on CPU, and it imports without TensorFlow."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zfnet_jax.nn import models

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))


@pytest.mark.slow
def test_torch_twin_computes_the_same_function():
  torch = pytest.importorskip("torch")
  import torch_ref  # pylint: disable=g-import-not-at-top
  model = models.ZFNetLowRes(num_classes=7, conv_features=(8, 16, 24, 24, 16), fc_features=32,
                             dropout_rate=0.0)
  x = np.random.default_rng(0).normal(0, 50, (2, 64, 64, 3)).astype(np.float32)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  net = torch_ref.TorchPaperNet(model, 64).load_params(jax.device_get(variables["params"])).eval()
  with torch.no_grad():
    got = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  want = np.asarray(model.apply(variables, x))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.slow
def test_gpu_script_smoke_runs_on_cpu(tmp_path):
  import gpu  # pylint: disable=g-import-not-at-top
  out = tmp_path / "gpu.json"
  gpu.main(["--smoke", "--only", "matmul,train,deconv,scan", "--json", str(out)])
  rec = json.loads(out.read_text())
  assert rec["meta"]["smoke"] and rec["meta"]["model"] == "ZFNetLowRes"
  rows = {r["name"]: r for r in rec["rows"]}
  for start in ("train step", "deconvnet conv5 projections, project_many", "top-9 scan",
                "matmul peak"):
    hit = [r for name, r in rows.items() if name.startswith(start)]
    assert hit and all(isinstance(r["value"], float) and r["value"] > 0 for r in hit), start


def test_gpu_script_stand_ins_without_tensorflow(monkeypatch):
  import gpu  # pylint: disable=g-import-not-at-top
  for name in ("ml_collections", "clu", "clu.metric_writers"):
    monkeypatch.setitem(sys.modules, name, None)      # import raises ImportError
  made = gpu._stand_ins()  # pylint: disable=protected-access
  assert made == ["ml_collections", "clu.metric_writers"]
  assert sys.modules["clu"].metric_writers is sys.modules["clu.metric_writers"]
  assert hasattr(sys.modules["ml_collections"], "ConfigDict")
  assert hasattr(sys.modules["clu.metric_writers"], "MetricWriter")   # train.py reads it


def test_mutation_record_counts_and_samples_by_module():
  """The sample: ceil(fraction x n) of each module, the same for a seed; the score:
  killed (and timed out) over the mutants that are not listed as equivalent."""
  import mutation  # pylint: disable=import-outside-toplevel
  names = ([f"zfnet_jax.nn.rules.x_get__mutmut_{i}" for i in range(1, 11)]
           + [f"zfnet_jax.nn.layers.xǁMaxPoolǁ__call____mutmut_{i}" for i in range(1, 4)])
  assert mutation.module_of(names[-1]) == "zfnet_jax.nn.layers"
  picked = mutation.sample(names, 0.25, seed=3)
  assert picked == mutation.sample(names, 0.25, seed=3)
  assert sum(n.startswith("zfnet_jax.nn.rules.") for n in picked) == 3      # ceil(2.5)
  assert sum(n.startswith("zfnet_jax.nn.layers.") for n in picked) == 1     # ceil(0.75)
  status = {names[0]: "killed", names[1]: "timeout", names[2]: "survived",
            names[3]: "no tests", names[10]: "survived"}
  rec = mutation.record(status, {names[2]: "why", names[5]: "not run"},
                        [{"seconds": 1.5}, {"seconds": 2.0}], 13, 0.25, 3)
  assert rec["seconds"] == 3.5
  assert (rec["mutants"], rec["killed"], rec["equivalent"]) == (5, 2, 1)
  assert rec["score"] == 0.5                                       # 2 of 4
  assert rec["unexplained_survivors"] == sorted([names[3], names[10]])
  assert rec["by_module"]["zfnet_jax.nn.layers"] == {"survived": 1}
  assert rec["equivalent_mutants"] == {names[2]: "why"}
