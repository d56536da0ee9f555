"""Every hot path of zfnet_jax, one table (run by hand, never in the test suite).

  python benchmarks/run.py [--quick] [--json benchmarks/results/latest.json]
                           [--batch 64] [--no_torch] [--only train,forward,...]
                           [--dtype float32|bfloat16]

Full-size ZFNet at 224x224 in the compute dtype ``--dtype`` (default float32 on
CPU, bfloat16 on GPU/TPU; parameters stay float32), synthetic data unless stated:

* train: ``zfnet_jax.training.steps.train_step`` (momentum SGD, weight decay, feature
  scale clipping, dropout) jitted under ``shard_map`` exactly as
  ``train_and_evaluate`` does; images/s; and forward (inference) images/s.
  On CPU both also run compiled with jaxlib's default CPU options
  (``xla.DEFAULT_CPU_COMPILER_OPTIONS``: YNNPACK convolutions) -- the "before".
* matmul peak: a large ``jnp.dot`` in the compute dtype, measured in this run;
  the model's FLOPs per image counted from ``layer_table`` (multiply-adds x 2;
  training = forward + weight gradients + input gradients of all but conv1);
  model FLOP utilisation = images/s x FLOPs / peak.
* quickstart: experiments/quickstart.py's own training step (ZFNetLowRes with its
  widths, its input size, batch 128, Adam + weight decay, cosine schedule, feature scale
  clipping) in JAX on one CPU device, as the quickstart runs by default (every train row
  here runs on the devices JAX has: one CPU device unless ``XLA_FLAGS`` says otherwise) and,
  interleaved, the same model and optimiser in PyTorch (``torch_ref``, one process,
  a thread per core); ratio JAX / PyTorch (target >= 1.25).
* deconvnet: conv5 projections/s, batched (``deconv.project_many``), and the
  cost per projection relative to a plain ``jax.vjp`` of the same slice on the
  same batch (``benchmarks/bench_deconv.py``'s reference).
* captum: ``deconv.project`` as a user calls it against Captum's
  NeuronDeconvolution / NeuronGuidedBackprop on the PyTorch twin with the same
  weights and images, and against ``jax.vjp`` of the model's own slice (conv2
  and conv5, batch 1 and 16; ``bench_deconv.captum_table``).
* occlusion positions/s (``analyses.occlusion.scan``); top-9 scan images/s
  (``atlas.scan`` over conv1..conv5, distinct images and per unit) beside a
  forward pass to conv5 on the same batches, interleaved, and their ratio.
* input pipeline images/s (``iterators.create_train_iterator``): offline
  Fashion-MNIST, and a folder of 256x256 JPEGs generated here (decode, resize,
  random crop, flip).
* PyTorch (when importable, on CPU in float32): the same model and train step
  (``torch_ref``: the config's optimiser), interleaved with the JAX runs; ratios
  JAX / PyTorch.

Times are medians over repeats after a warm-up call (compilation excluded).
On a shared machine, look at the reported load average.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # tf.data start-up chatter

from zfnet_jax import configs, xla
from zfnet_jax.data import iterators
from zfnet_jax.nn import geometry, models
from zfnet_jax.training import steps


def quickstart_config():
  """experiments/quickstart.py's config (the quickstart's model, batch and optimiser)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return configs.load_file(os.path.join(root, "experiments", "quickstart.py")).get_config()


import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from zfnet_jax import deconv, rundir
from zfnet_jax.training import train_state

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_deconv  # pylint: disable=g-import-not-at-top

ROWS: list[tuple[str, float | str, str, str]] = []  # (name, value, unit, note)
PARTS = ("matmul", "train", "forward", "quickstart", "deconv", "captum", "occlusion", "scan",
         "pipeline")


def report(name, value, unit="", note=""):
  ROWS.append((name, value, unit, note))
  v = f"{value:,.3f}" if isinstance(value, float) else str(value)
  print(f"  {name:<56} {v:>12} {unit:<12} {note}", flush=True)


def block(x):
  return jax.block_until_ready(x)


def interleaved(fns: dict, repeats: int) -> dict:
  """Median time of each fn, the fns called in turn (A B C A B C ...) after warm-ups."""
  for f in fns.values():
    block(f())
  ts = {k: [] for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():
      t = time.perf_counter()
      block(f())
      ts[k].append(time.perf_counter() - t)
  return {k: statistics.median(v) for k, v in ts.items()}


# ----------------------------------------------------------------------------
# FLOPs from the layer table.
# ----------------------------------------------------------------------------

def model_flops(model, input_size: int, channels: int = 3) -> dict[str, int]:
  """FLOPs per image (2 x multiply-adds) of convs and dense layers.

  forward: sum over layers; train: forward + weight gradients (same count)
  + input gradients (same count, except the first layer, which needs none).
  Pooling, LRN, ReLU and the optimiser are not counted.
  """
  per_layer, c, n, first = {}, channels, input_size, None
  for spec in model.layer_table(input_size):
    if spec.kind == "conv":
      per_layer[spec.name] = 2 * spec.out ** 2 * spec.kernel ** 2 * c * spec.features
      c, n = spec.features, spec.out
    elif spec.kind == "pool":
      n = spec.out
    elif spec.kind == "fc":
      per_layer[spec.name] = 2 * c * n * n * spec.features
      c, n = spec.features, 1
    if first is None and spec.name in per_layer:
      first = spec.name
  fwd = sum(per_layer.values())
  return {"forward": fwd, "train": 3 * fwd - per_layer[first], **per_layer}


# ----------------------------------------------------------------------------
# The parts.
# ----------------------------------------------------------------------------

def setup_train(config, model, batch, compiler_options, input_size=224, channels=3):
  """(step fn, state, batch) for zfnet_jax.training.steps.train_step on all local devices."""
  devices = np.array(jax.devices())
  mesh = Mesh(devices, (steps.AXIS,))
  tx = train_state.optimizer_from_config(config)
  lr_fn = train_state.learning_rate_fn(config, 100, 100)
  step = jax.jit(jax.shard_map(
      lambda s, b: steps.train_step(s, b, model=model, tx=tx, lr_fn=lr_fn,
                                    clip_radius=train_state.clip_radius(config)),
      mesh=mesh, in_specs=(P(), P(steps.AXIS)), out_specs=(P(), P()), check_vma=False),
      donate_argnums=(0,), compiler_options=compiler_options)
  init = train_state.init_fn(model, (1, input_size, input_size, channels), tx, seed=config.seed,
                             clip_radius=train_state.clip_radius(config))
  state = xla.jit(init, out_shardings=jax.sharding.NamedSharding(mesh, P()))()
  rng = np.random.default_rng(0)
  data = {"image": jnp.asarray(rng.normal(0, 50, (batch, input_size, input_size, channels)),
                               jnp.float32),
          "label": jnp.asarray(rng.integers(0, model.num_classes, batch), jnp.int32)}
  return step, state, data


def bench_model(args, model, config, flops, peak, torch_fns):
  """Train step and forward images/s (JAX now, JAX with jaxlib's default CPU
  options, PyTorch), interleaved."""
  b = args.batch
  on_cpu = jax.default_backend() == "cpu"
  variants = {"jax": xla.compiler_options()}
  if on_cpu and xla.compiler_options():
    variants["jax_default_xla"] = xla.DEFAULT_CPU_COMPILER_OPTIONS
  fns_train, fns_fwd = {}, {}
  for name, opts in variants.items():
    step, state, data = setup_train(config, model, b, opts)
    holder = {"s": state}

    def run_step(step=step, holder=holder, data=data):
      holder["s"], m = step(holder["s"], data)
      return m["loss"]
    fns_train[name] = run_step
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x), compiler_options=opts)
    fns_fwd[name] = (lambda fwd=fwd, holder=holder, data=data:
                     fwd(holder["s"].params, data["image"]))
  if torch_fns:
    fns_train["torch"], fns_fwd["torch"] = torch_fns
  # The matmul peak again, interleaved with the model runs (same load).
  n, reps = (2048, 8) if on_cpu else (8192, 20)
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.dtype(config.model.dtype))
  mm = xla.jit(lambda a: jnp.dot(a, a, preferred_element_type=a.dtype))
  matmul = lambda: [mm(a) for _ in range(reps)]
  out, peaks = {}, {}
  for kind, fns in (("train", fns_train), ("forward", fns_fwd)):
    if kind not in args.only:
      continue
    t = interleaved({**fns, "matmul": matmul}, args.repeats)
    peaks[kind] = reps * 2 * n ** 3 / t.pop("matmul")
    report(f"matmul {n}^3, interleaved with the {kind} runs", peaks[kind] / 1e9, "GFLOP/s")
    for k, v in t.items():
      out[f"{kind}_{k}"] = b / v
  for k, v in list(out.items()):
    kind = k.split("_")[0]
    p = peaks[kind]
    note = (f"{v * flops[kind] / 1e9:.0f} GFLOP/s = {v * flops[kind] / p:.0%} of the "
            f"interleaved matmul, {v * flops[kind] / max(peak, p):.0%} of the peak")
    report(f"{k} (batch {b})", v, "images/s", note)
    out[f"{k}_mfu"] = v * flops[kind] / p
  for kind in ("train", "forward"):
    if f"{kind}_jax" in out and f"{kind}_torch" in out:
      report(f"{kind}: JAX / PyTorch", out[f"{kind}_jax"] / out[f"{kind}_torch"], "x")
    if f"{kind}_jax" in out and f"{kind}_jax_default_xla" in out:
      report(f"{kind}: JAX / JAX with jaxlib default CPU options",
             out[f"{kind}_jax"] / out[f"{kind}_jax_default_xla"], "x")
  return out


def torch_model_fns(model, config, batch, threads, input_size=224, num_classes=1000,
                    channels=3):
  """(train step fn, forward fn) of the PyTorch twin of ``model`` with ``config``'s
  optimiser (``torch_ref``), or None without torch."""
  try:
    import torch
    import torch_ref  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  net = torch_ref.TorchPaperNet(model, input_size, channels)
  return (torch_ref.train_step_fn(net, config, batch, input_size, num_classes,
                                  channels=channels),
          torch_ref.forward_fn(net, batch, input_size))


QUICKSTART_CHANNELS = 1   # Fashion-MNIST is grey: the quickstart's conv1 sees one channel


def bench_quickstart(args):
  """The quickstart's own training step (its model, batch, input size, Adam + weight
  decay, cosine schedule, feature scale clipping) in JAX and PyTorch, interleaved."""
  config = quickstart_config()
  size, b, c = config.dataset.crop_size, config.batch_size, QUICKSTART_CHANNELS
  model = models.from_config(config.model, 10)
  step, state, data = setup_train(config, model, b, xla.compiler_options(), input_size=size,
                                  channels=c)
  holder = {"s": state}

  def run_step():
    holder["s"], m = step(holder["s"], data)
    return m["loss"]
  fns = {"jax": run_step}
  if not args.no_torch and jax.default_backend() == "cpu":
    torch_fns = torch_model_fns(model, config, b, os.cpu_count(), size, 10, c)
    if torch_fns:
      fns["torch"] = torch_fns[0]
  t = interleaved(fns, max(args.repeats, 2) * 4)   # ~0.1 s steps: more repeats
  for k, v in t.items():
    where = {"jax": f"{jax.device_count()} {jax.default_backend().upper()} devices",
             "torch": f"{os.cpu_count()} threads"}[k]
    report(f"quickstart train step {k} ({config.model.name} {size} px x {c}, batch {b})",
           b / v, "images/s", f"{v * 1e3:.1f} ms/step on {where}")
  if "torch" in t:
    report("quickstart train step: JAX / PyTorch", t["torch"] / t["jax"], "x", "target >= 1.25")


def bench_matmul(n: int, dtype, repeats: int) -> float:
  """Peak FLOP/s of an (n, n) @ (n, n) jnp.dot: the best of ``repeats`` calls."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  f = xla.jit(lambda a: jnp.dot(a, a, preferred_element_type=dtype))
  block(f(a))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    block(f(a))
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def bench_deconvnet(args, model, variables):
  r = args.requests
  images = jnp.clip(50.0 * jax.random.normal(jax.random.PRNGKey(2), (r, 224, 224, 3)),
                    -deconv.MAX_ABS_PIXEL, deconv.MAX_ABS_PIXEL)
  channels = np.arange(r) % 256
  params = variables["params"]
  plain = xla.jit(bench_deconv.plain_vjp)
  ours = xla.jit(lambda v, x, ch: bench_deconv.plain_vjp(
      None, x, ch, lambda img: model.apply(v, img, method="features")["conv5"]))
  t = interleaved({
      "project_many": lambda: deconv.project_many(model, variables, images, layer="conv5",
                                                  channels=channels, chunk_size=r),
      "plain_vjp": lambda: plain(params, images, jnp.asarray(channels)),
      "model_vjp": lambda: ours(variables, images, jnp.asarray(channels)),
  }, args.repeats)
  report(f"deconvnet conv5 projections (batch {r})", r / t["project_many"], "proj/s")
  report("  cost vs plain jax.vjp of the slice", t["project_many"] / t["plain_vjp"], "x",
         "target <= 1.3")
  report("  cost vs jax.vjp of the model's slice", t["project_many"] / t["model_vjp"], "x",
         "same switch max-pool, backprop rule")


def bench_captum(args, model, variables):
  """deconv.project as a user calls it against Captum (``bench_deconv.captum_table``)."""
  images = jnp.clip(50.0 * jax.random.normal(jax.random.PRNGKey(2), (16, 224, 224, 3)),
                    -deconv.MAX_ABS_PIXEL, deconv.MAX_ABS_PIXEL)
  rows = bench_deconv.captum_table(model, variables, images, repeats=args.repeats)
  if rows is None:
    report("projections vs Captum", "n/a", "", "torch or captum not importable")
    return
  for r in rows:
    name = f"project {r['layer']} {r['rule']} (batch {r['batch']})"
    report(name, r["project_per_s"], "proj/s",
           f"Captum {r['captum_per_s']:.2f}/s, model vjp {r['model_vjp_per_s']:.2f}/s")
    report(f"  {name} / Captum", r["vs_captum"], "x", "target >= 2")
    report(f"  {name} / jax.vjp of the model's slice", r["vs_model_vjp"], "x", "target >= 1")


def bench_occlusion(args, model, variables):
  """Occlusion positions/s (``analyses.occlusion.scan``: the occluded copies go through one
  jitted forward in chunks of --batch) against the forward pass's images/s at that batch,
  interleaved (A B A B ...), and their ratio."""
  from zfnet_jax.analyses import occlusion
  settings = occlusion.Settings(size=56, stride=args.occlusion_stride, fill=-1.0,
                                layer="conv5", chunk_size=args.batch)
  image = np.asarray(50.0 * jax.random.normal(jax.random.PRNGKey(3), (224, 224, 3)))
  n = len(occlusion.squares(224, settings.size, settings.stride)) ** 2
  x = jnp.asarray(np.repeat(image[None], args.batch, 0))
  fwd = xla.jit(lambda v, x: model.apply(v, x))
  t = interleaved({"forward": lambda: fwd(variables, x),
                   "occlusion": lambda: occlusion.scan(model, variables, image, 0,
                                                       settings)["activation"]},
                  max(1, args.repeats // 2))
  fwd_rate, occ_rate = args.batch / t["forward"], n / t["occlusion"]
  report(f"forward, interleaved with occlusion (batch {args.batch})", fwd_rate, "images/s")
  report(f"occlusion positions (stride {settings.stride}, {n} positions)", occ_rate,
         "positions/s", f"{occ_rate / fwd_rate:.2f}x the interleaved forward rate")


def bench_scan(args, model, variables):
  """Top-9 scan over conv1..conv5 (``atlas.scan``, both modes) against a jitted forward
  pass to conv5 on the same host batches, interleaved (fwd, scan of 1 batch, scan of
  nb batches, per mode; repeated); the steady scan rate is (nb - 1) batches over
  the difference of the two scans (each call's set-up cancels)."""
  from zfnet_jax.analyses import atlas
  b, nb = args.batch, args.scan_batches
  rng = np.random.default_rng(4)
  batches = [{"image": rng.normal(0, 50, (b, 224, 224, 3)).astype(np.float32),
              "id": np.arange(i * b, (i + 1) * b), "label": np.zeros(b, np.int32)}
             for i in range(nb)]
  layers = list(geometry.CONV_NAMES)
  net = deconv.as_network(model)
  fwd = xla.jit(lambda v, x: net.features(v, x)[layers[-1]])   # conv1..conv5, nothing after

  def forward():
    return [fwd(variables, jnp.asarray(x["image"])) for x in batches]
  scans = {mode: (lambda bs, d=d: atlas.scan(model, variables, bs, layers=layers, k=9,
                                             progress=False, distinct_images=d
                                             ).topk["conv5"].values)
           for mode, d in (("distinct images", True), ("per unit", False))}
  timed(forward)
  for run in scans.values():
    timed(run, batches[:1])
  times = {"forward": []} | {m: [] for m in scans}
  for _ in range(args.repeats):
    times["forward"].append(timed(forward))
    for mode, run in scans.items():
      t1 = timed(run, batches[:1])
      times[mode].append((timed(run, batches) - t1) * nb / (nb - 1))
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  fwd_rates = [nb * b / t for t in times["forward"]]
  report(f"forward to conv5, same host batches ({nb} of {b})", statistics.median(fwd_rates),
         "images/s", f"interleaved with the scans; load average {load:.1f}")
  for mode in scans:
    rates = [nb * b / t for t in times[mode]]
    ratios = [r / f for r, f in zip(rates, fwd_rates)]
    report(f"top-9 scan conv1..conv5, {mode} (steady)", statistics.median(rates), "images/s",
           f"{statistics.median(ratios):.2f}x the forward rate (median of {len(ratios)} "
           f"interleaved pairs, {min(ratios):.2f}-{max(ratios):.2f}; target >= 0.9 for "
           "distinct images)")


def timed(fn, *a):
  t = time.perf_counter()
  block(fn(*a))
  return time.perf_counter() - t


def make_jpeg_folder(root: str, n: int, size: int = 256):
  """n random 256x256 RGB JPEGs in two class folders (smooth noise + gradient)."""
  from PIL import Image
  rng = np.random.default_rng(5)
  yy, xx = np.mgrid[:size, :size]
  for i in range(n):
    d = os.path.join(root, f"class{i % 2}")
    os.makedirs(d, exist_ok=True)
    small = rng.integers(0, 256, (size // 8, size // 8, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(small).resize((size, size), Image.BILINEAR), np.float32)
    img = 0.7 * img + 0.3 * ((xx + yy * (i % 5))[..., None] % 256)
    Image.fromarray(img.astype(np.uint8)).save(os.path.join(d, f"{i:05d}.jpg"), quality=90)


def bench_pipeline(args, train_rate):
  b = args.batch
  nb = args.pipeline_batches
  with tempfile.TemporaryDirectory() as tmp:
    cases = {}
    c = configs.default_config()
    c.batch_size = b
    c.dataset.name = "fashion_mnist_idx"
    c.dataset.mean_max_examples = 1000
    c.dataset.eval_split = "test"
    cases["Fashion-MNIST (28 -> 256, crop 224)"] = c
    c = configs.default_config()
    c.batch_size = b
    c.dataset.name = "folder"
    c.dataset.folder = os.path.join(tmp, "jpegs")
    c.dataset.mean_max_examples = 64
    c.dataset.shuffle_buffer = 256
    make_jpeg_folder(c.dataset.folder, (nb + 2) * b + b)
    cases[f"JPEG folder (256x256, crop 224, {(nb + 3) * b} files)"] = c
    for name, c in cases.items():
      if not os.path.isdir(c.dataset.fashion_mnist_dir) and c.dataset.name == "fashion_mnist_idx":
        report(f"input pipeline {name}", "n/a", "", f"{c.dataset.fashion_mnist_dir} missing")
        continue
      work = os.path.join(tmp, name.split()[0])
      it = iterators.create_train_iterator(c, work)
      next(it)  # start-up: mean, file listing, tf.data graph
      t = time.perf_counter()
      for _ in range(nb):
        next(it)
      rate = nb * b / (time.perf_counter() - t)
      it.close()  # stop the prefetching before the folder goes
      del it
      gc.collect()
      report(f"input pipeline {name}", rate, "images/s",
             f"{rate / train_rate:.1f}x train step rate (target >= 1)" if train_rate else "")


# ----------------------------------------------------------------------------

def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="fewer repeats, smaller scans")
  ap.add_argument("--json", default="", help="also write the results here")
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=0, help="0: 5 (3 with --quick)")
  ap.add_argument("--no_torch", action="store_true")
  ap.add_argument("--only", default=",".join(PARTS))
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                  help="compute dtype (default: float32 on CPU, bfloat16 elsewhere)")
  args = ap.parse_args(argv)
  args.only = set(args.only.split(","))
  if not args.only <= set(PARTS):
    ap.error(f"--only has {sorted(args.only - set(PARTS))}; allowed: {', '.join(PARTS)}")
  args.repeats = args.repeats or (3 if args.quick else 5)
  args.requests = 8 if args.quick else 32
  args.occlusion_stride = 28 if args.quick else 8
  args.scan_batches = 2 if args.quick else 4
  args.pipeline_batches = 3 if args.quick else 8

  backend = jax.default_backend()
  on_cpu = backend == "cpu"
  dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
  config = configs.default_config()
  config.batch_size = args.batch
  config.model.dtype = dtype
  model = models.from_config(config.model, 1000)
  flops = model_flops(model, 224)
  load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
  meta = {
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "command": "python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])),
      "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      "backend": backend, "cpu_count": os.cpu_count(), "platform": platform.platform(),
      "processor": rundir.machine()["cpu"], "load_average": [round(x, 2) for x in load],
      "versions": rundir.versions(), "compute_dtype": dtype, "batch": args.batch,
      "cpu_compiler_options": xla.compiler_options(),
      "devices": len(jax.devices()), "quick": args.quick,
  }
  print("zfnet_jax benchmarks")
  for k, v in meta.items():
    print(f"  {k:<18} {v}")
  print(f"  FLOPs per image (2 x MACs, from layer_table): forward {flops['forward'] / 1e9:.3f} G, "
        f"train step {flops['train'] / 1e9:.3f} G")
  print("  per layer (forward, G): " + ", ".join(
      f"{k} {v / 1e9:.3f}" for k, v in flops.items() if k not in ("forward", "train")))
  report("model FLOPs per image, forward", flops["forward"] / 1e9, "GFLOP")
  report("model FLOPs per image, train step", flops["train"] / 1e9, "GFLOP")

  peak = 0.0
  if "matmul" in args.only:
    for n in ((2048, 4096) if on_cpu else (4096, 8192)):
      rate = bench_matmul(n, jnp.dtype(dtype), args.repeats)
      report(f"matmul ({n}^3 {dtype} jnp.dot, best of {args.repeats})", rate / 1e9, "GFLOP/s")
      peak = max(peak, rate)
    report("matmul peak (the larger)", peak / 1e9, "GFLOP/s")

  torch_fns = None
  if not args.no_torch and on_cpu and dtype == "float32" and ({"train", "forward"} & args.only):
    torch_fns = torch_model_fns(model, config, args.batch, os.cpu_count())
    if torch_fns is None:
      print("  (torch not importable: no PyTorch comparison)")
  rates = {}
  if {"train", "forward"} & args.only:
    rates = bench_model(args, model, config, flops, peak, torch_fns)
  train_rate = rates.get("train_jax")
  if "quickstart" in args.only:
    bench_quickstart(args)

  variables = None
  if {"deconv", "captum", "occlusion", "scan"} & args.only:
    variables = xla.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((1, 224, 224, 3)))
  if "deconv" in args.only:
    bench_deconvnet(args, model, variables)
  if "captum" in args.only and on_cpu and dtype == "float32" and not args.no_torch:
    bench_captum(args, model, variables)
  if "occlusion" in args.only:
    bench_occlusion(args, model, variables)
  if "scan" in args.only:
    bench_scan(args, model, variables)
  if "pipeline" in args.only:
    bench_pipeline(args, train_rate)

  meta["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
  print(f"  load average at the end: {meta['load_average_end']}")
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump({"meta": meta, "flops_per_image": flops, "peak_flops": peak,
                 "rows": [{"name": n, "value": v, "unit": u, "note": no}
                          for n, v, u, no in ROWS]}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
