"""The GPU run of zfnet_jax, one table and one JSON (``benchmarks/gpu.sh`` runs it).

  python benchmarks/gpu.py [--json FILE] [--only matmul,train,pipeline,deconv,scan]
                           [--smoke]

Made for the lent GPU machine (no network, a preinstalled CUDA JAX, no
TensorFlow; see README "Performance", "On a GPU").  Full-size ZFNet at 224x224,
compute dtype bfloat16 (parameters float32), synthetic data:

* matmul: an 8192^3 bf16 ``jnp.dot`` timed in this run (the measured peak), and
  the chip's datasheet bf16 dense peak when the device kind is known.
* train: ``zfnet_jax.training.steps.train_step`` (momentum SGD 0.9, weight decay 5e-4 on
  kernels, feature scale clipping 0.1, dropout 0.5 -- the default recipe) jitted
  under ``shard_map`` as ``train_and_evaluate`` does, batch 128 and 256: images/s,
  model FLOP utilisation against the measured matmul and the datasheet peak.
* pipeline: ``iterators.create_train_iterator`` on a folder of 256x256 JPEGs
  generated here, images/s against the step rate; skipped with a note when
  TensorFlow is not importable (the lent machine has none).
* deconv: conv5 deconvnet projections/s, ``deconv.project_many`` (chunks of 256)
  and ``deconv.project`` on 16 images per call.
* scan: top-9 scan images/s over conv1..conv5 (``atlas.scan``), steady rate.

``--smoke``: the same code paths at toy sizes (ZFNetLowRes at 64 px, batches of
4 and 8, float32 on CPU), for a test on any machine; its figures mean nothing.
On the lent machine the TensorBoard writer's import (clu, TensorFlow) and
ml_collections are missing: ``zfnet_jax.train`` is imported with stand-ins for
them (the step uses neither).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import sys
import tempfile
import time
import types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Dense bf16 peak FLOP/s by the vendors' datasheets (SXM parts), by device kind.
DATASHEET_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12,
                  "TPU v5 lite": 197e12, "TPU v4": 275e12}
PARTS = ("matmul", "train", "pipeline", "deconv", "scan")


def _stand_ins() -> list[str]:
  """Import stand-ins for ml_collections and clu.metric_writers where they cannot be
  imported (the lent GPU machine has neither TensorFlow nor these); returns their names."""
  made = []
  try:
    import ml_collections  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    m = types.ModuleType("ml_collections")
    m.ConfigDict = m.FrozenConfigDict = type("ConfigDict", (dict,), {})
    m.config_dict = types.SimpleNamespace(placeholder=lambda *a, **k: None)
    sys.modules["ml_collections"] = m
    made.append("ml_collections")
  try:
    import clu.metric_writers  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    clu = types.ModuleType("clu")
    clu.metric_writers = types.ModuleType("clu.metric_writers")
    clu.metric_writers.MetricWriter = type("MetricWriter", (), {})   # loop.Hook's annotation
    sys.modules["clu"], sys.modules["clu.metric_writers"] = clu, clu.metric_writers
    made.append("clu.metric_writers")
  return made


STAND_INS = _stand_ins()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top
import optax  # noqa: E402  pylint: disable=g-import-not-at-top
import run  # noqa: E402  pylint: disable=g-import-not-at-top  (configures XLA's CPU flag first)
from jax.sharding import Mesh  # noqa: E402  pylint: disable=g-import-not-at-top
from jax.sharding import PartitionSpec as P

from zfnet_jax import deconv, rundir
from zfnet_jax.data import iterators
from zfnet_jax.nn import geometry, models
from zfnet_jax.training import steps, train_state

report = run.report


def datasheet_peak(kind: str) -> float | None:
  for name, peak in DATASHEET_BF16.items():
    if name.lower() in kind.lower():
      return peak
  return None


def make_step(model, batch: int, size: int):
  """(jitted step, state, batch) of steps.train_step with the default recipe."""
  mesh = Mesh(np.array(jax.devices()), (steps.AXIS,))
  tx = train_state.make_optimizer("sgd", momentum=0.9, weight_decay=5e-4)
  step = jax.jit(jax.shard_map(
      lambda s, b: steps.train_step(s, b, model=model, tx=tx,
                                    lr_fn=optax.constant_schedule(0.01), clip_radius=0.1),
      mesh=mesh, in_specs=(P(), P(steps.AXIS)), out_specs=(P(), P()), check_vma=False),
      donate_argnums=(0,))
  init = train_state.init_fn(model, (1, size, size, 3), tx, seed=0, clip_radius=0.1)
  state = jax.jit(init, out_shardings=jax.sharding.NamedSharding(mesh, P()))()
  rng = np.random.default_rng(0)
  data = {"image": jnp.asarray(rng.normal(0, 50, (batch, size, size, 3)), jnp.float32),
          "label": jnp.asarray(rng.integers(0, model.num_classes, batch), jnp.int32)}
  return step, state, data


def bench_train(args, model, flops, peaks):
  rates = {}
  for b in args.batches:
    step, state, data = make_step(model, b, args.size)
    holder = {"s": state}

    def one(step=step, holder=holder, data=data):
      for _ in range(args.steps_per_call):
        holder["s"], m = step(holder["s"], data)
      return m["loss"]
    t0 = time.perf_counter()
    run.block(one())
    compile_s = time.perf_counter() - t0
    t = run.interleaved({"step": one}, args.repeats)["step"] / args.steps_per_call
    rate = b / t
    rates[b] = rate
    achieved = rate * flops["train"]
    note = f"{achieved / 1e12:.1f} TFLOP/s; {achieved / peaks['measured']:.1%} of the measured matmul"
    if peaks.get("datasheet"):
      note += f", {achieved / peaks['datasheet']:.1%} of the datasheet bf16 dense peak"
    report(f"train step {args.dtype} (batch {b})", rate, "images/s",
           f"{t * 1e3:.2f} ms/step; {note}; first call {compile_s:.0f} s")
    report(f"  model FLOP utilisation, batch {b} (vs measured matmul)",
           achieved / peaks["measured"], "")
    if peaks.get("datasheet"):
      report(f"  model FLOP utilisation, batch {b} (vs datasheet)", achieved / peaks["datasheet"],
             "")
    del holder, state
  return rates


def bench_pipeline(args, train_rate):
  if importlib.util.find_spec("tensorflow") is None or "ml_collections" in STAND_INS:
    report("input pipeline, JPEG folder", "skipped", "",
           "TensorFlow is not importable here (the lent GPU machine has none): tf.data "
           "cannot run; measure it on the CPU machine (benchmarks/run.py --only pipeline)")
    return
  from zfnet_jax import configs
  b, nb = args.pipeline_batch, args.pipeline_batches
  with tempfile.TemporaryDirectory() as tmp:
    c = configs.default_config()
    c.batch_size = b
    c.dataset.name = "folder"
    c.dataset.folder = os.path.join(tmp, "jpegs")
    c.dataset.mean_max_examples = min(64, b)
    c.dataset.shuffle_buffer = 4 * b
    c.dataset.resize_size, c.dataset.crop_size = args.jpeg_size, args.size
    run.make_jpeg_folder(c.dataset.folder, (nb + 3) * b, args.jpeg_size)
    it = iterators.create_train_iterator(c, os.path.join(tmp, "work"))
    next(it)
    t = time.perf_counter()
    for _ in range(nb):
      next(it)
    rate = nb * b / (time.perf_counter() - t)
    it.close()
    del it
  report(f"input pipeline, JPEG folder ({args.jpeg_size}px, crop {args.size}, batch {b})", rate,
         "images/s", f"{rate / train_rate:.2f}x the train step rate (>= 1: the step is fed)"
         if train_rate else "")


def bench_deconv(args, model, variables):
  r = args.requests
  images = jnp.clip(50.0 * jax.random.normal(jax.random.PRNGKey(2), (r, args.size, args.size, 3)),
                    -deconv.MAX_ABS_PIXEL, deconv.MAX_ABS_PIXEL)
  channels = np.arange(r) % model.conv_features[4]
  small = images[:args.per_call]
  t = run.interleaved({
      "many": lambda: deconv.project_many(model, variables, images, layer="conv5",
                                          channels=channels, chunk_size=args.chunk),
      "one_call": lambda: deconv.project(model, variables, small, layer="conv5", channel=3),
  }, args.repeats)
  report(f"deconvnet conv5 projections, project_many ({r} requests, chunks of {args.chunk})",
         r / t["many"], "proj/s")
  report(f"deconvnet conv5 projections, project on {args.per_call} images per call",
         args.per_call / t["one_call"], "proj/s")


def bench_scan(args, model, variables, fwd_rate):
  try:
    from zfnet_jax.analyses import atlas
  except ImportError as e:
    report("top-9 scan", "n/a", "", f"zfnet_jax.analyses.atlas not importable: {e}")
    return
  b, nb = args.scan_batch, args.scan_batches
  rng = np.random.default_rng(4)
  batches = [{"image": rng.normal(0, 50, (b, args.size, args.size, 3)).astype(np.float32),
              "id": np.arange(i * b, (i + 1) * b), "label": np.zeros(b, np.int32)}
             for i in range(nb)]
  scan = lambda bs: atlas.scan(model, variables, bs, layers=list(geometry.CONV_NAMES), k=9,
                               progress=False).topk["conv5"].values
  t1 = min(run.timed(scan, batches[:1]) for _ in range(2))
  tn = run.timed(scan, batches)
  rate = (nb - 1) * b / max(tn - t1, 1e-9)
  report(f"top-9 scan conv1..conv5 (steady, {nb} batches of {b}, host float32 images)", rate,
         "images/s", f"{rate / fwd_rate:.2f}x the forward rate" if fwd_rate else "")


def forward_rate(args, model, variables):
  x = jnp.asarray(np.random.default_rng(1).normal(0, 50, (args.scan_batch, args.size,
                                                           args.size, 3)), jnp.float32)
  fwd = jax.jit(lambda v, x: model.apply(v, x))
  t = run.interleaved({"f": lambda: fwd(variables, x)}, args.repeats)["f"]
  rate = args.scan_batch / t
  report(f"forward (inference, batch {args.scan_batch})", rate, "images/s")
  return rate


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--smoke", action="store_true", help="toy sizes (any machine; a test)")
  ap.add_argument("--json", default="")
  ap.add_argument("--only", default=",".join(PARTS))
  args = ap.parse_args(argv)
  args.only = set(args.only.split(","))
  if not args.only <= set(PARTS):
    ap.error(f"--only has {sorted(args.only - set(PARTS))}; allowed: {', '.join(PARTS)}")
  on_cpu = jax.default_backend() == "cpu"
  if args.smoke:
    args.model, args.size, args.jpeg_size, args.batches = "ZFNetLowRes", 64, 72, (4,)
    args.dtype = "float32" if on_cpu else "bfloat16"
    args.matmul, args.repeats, args.steps_per_call = 256, 2, 1
    args.requests, args.chunk, args.per_call = 8, 4, 2
    args.scan_batch, args.scan_batches = 4, 3
    args.pipeline_batch, args.pipeline_batches = 4, 2
  else:
    args.model, args.size, args.jpeg_size, args.batches = "ZFNet", 224, 256, (128, 256)
    args.dtype = "bfloat16"
    args.matmul, args.repeats, args.steps_per_call = 8192, 5, 10
    args.requests, args.chunk, args.per_call = 1024, 256, 16
    args.scan_batch, args.scan_batches = 256, 12
    args.pipeline_batch, args.pipeline_batches = 256, 8
  model = models.create_model(args.model, dtype=jnp.dtype(args.dtype))
  flops = run.model_flops(model, args.size)
  dev = jax.devices()[0]
  meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
          "device": f"{jax.device_count()} x {dev.device_kind}", "backend": jax.default_backend(),
          "platform": platform.platform(), "processor": rundir.machine()["cpu"],
          "cpu_count": os.cpu_count(), "versions": rundir.versions(), "model": args.model,
          "input_size": args.size, "compute_dtype": args.dtype, "smoke": args.smoke,
          "stand_ins": STAND_INS}
  print("zfnet_jax GPU benchmarks" + (" (smoke: toy sizes, figures mean nothing)"
                                      if args.smoke else ""))
  for k, v in meta.items():
    print(f"  {k:<14} {v}")
  report("model FLOPs per image, train step", flops["train"] / 1e9, "GFLOP")
  report("model FLOPs per image, forward", flops["forward"] / 1e9, "GFLOP")
  peaks = {"datasheet": datasheet_peak(dev.device_kind), "measured": 0.0}
  if "matmul" in args.only or "train" in args.only:
    rate = run.bench_matmul(args.matmul, jnp.dtype(args.dtype), args.repeats)
    peaks["measured"] = rate
    report(f"matmul peak ({args.matmul}^3 {args.dtype} jnp.dot, measured here)", rate / 1e12,
           "TFLOP/s", f"datasheet bf16 dense: {peaks['datasheet'] / 1e12:.0f} TFLOP/s"
           if peaks["datasheet"] else "datasheet peak of this device kind not known")
  rates = bench_train(args, model, flops, peaks) if "train" in args.only else {}
  train_rate = rates.get(max(args.batches)) if rates else None
  if "pipeline" in args.only:
    bench_pipeline(args, train_rate)
  if {"deconv", "scan"} & args.only:
    variables = jax.jit(model.init)(jax.random.PRNGKey(1),
                                    jnp.zeros((1, args.size, args.size, 3)))
    fwd = forward_rate(args, model, variables)
    if "deconv" in args.only:
      bench_deconv(args, model, variables)
    if "scan" in args.only:
      bench_scan(args, model, variables, fwd)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      import json  # pylint: disable=g-import-not-at-top
      json.dump({"meta": meta, "flops_per_image": flops, "peak_flops": peaks,
                 "rows": [{"name": n, "value": v, "unit": u, "note": no}
                          for n, v, u, no in run.ROWS]}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
