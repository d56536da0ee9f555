"""Deconvnet projections/s for conv5 units of full-size ZFNet at 224x224 (run by hand).

  python benchmarks/bench_deconv.py [--requests 16] [--chunk_size 16] [--single 4]
  python benchmarks/bench_deconv.py --captum [--json FILE]   (the Captum table only)

Prints (and writes to --json) the rate one request at a time (``project`` on one
image), batched (``project_many``), and the cost per projection relative to a
plain ``jax.vjp`` of the same slice (features up to conv5 written with standard
JAX ops: jax.nn.relu, lax.reduce_window max, LRN; cotangent one-hot at the unit),
both for one image per call and for a batch of ``chunk_size`` images per call,
and to ``jax.vjp`` of the model's own conv5 slice (``model.apply(..., method=
"features")["conv5"]``, backprop rule: the same switch-unpooling max-pool).
With ``--captum`` (torch and captum importable): ``deconv.project`` as a user
calls it (one call per batch, ``position=None``: the strongest unit of the map in
each image) against Captum's ``NeuronDeconvolution`` / ``NeuronGuidedBackprop``
on the PyTorch twin of the same model with the same weights and images
(``torch_ref.TorchPaperNet``; the neuron selector takes each image's strongest
unit of the map), and against ``jax.vjp`` of the model's own forward to that
layer, interleaved, for conv2 and conv5, batch 1 and 16, both rules; the
projections are checked to agree with Captum's (up to the starting value) first.
Compilation is excluded (each function is called once first).  Figures on a
shared machine are noisy: take the median of --repeats runs.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax  # pylint: disable=g-import-not-at-top,g-bad-import-order
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from zfnet_jax import deconv, rundir, xla
from zfnet_jax.nn import layers, models


def plain_conv5(params, x):
  """ZFNet up to conv5 with standard JAX ops (native max-pool gradient)."""
  def conv(a, p, s, pad):
    return jax.lax.conv_general_dilated(a, p["kernel"], (s, s), pad,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["bias"]

  def pool(a):
    ph = layers.ceil_pool_padding(a.shape[1], 3, 2)
    return jax.lax.reduce_window(a, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                 ((0, 0), (0, ph), (0, ph), (0, 0)))

  a = pool(jax.nn.relu(conv(x, params["conv1"], 2, ((0, 1), (0, 1)))))
  a = layers.contrast_norm(a, 2.0, 5, 1e-4, 0.75)
  a = pool(jax.nn.relu(conv(a, params["conv2"], 2, ((0, 0), (0, 0)))))
  a = layers.contrast_norm(a, 2.0, 5, 1e-4, 0.75)
  for name in ("conv3", "conv4", "conv5"):
    a = jax.nn.relu(conv(a, params[name], 1, ((1, 1), (1, 1))))
  return a


def timeit(fn, repeats):
  """Median wall time of fn() over ``repeats`` calls after one warm-up call."""
  jax.block_until_ready(fn())  # compile / warm up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def interleaved(fns: dict, repeats: int) -> dict:
  """Median time of each fn, called in turn (A B C A B C ...) after one warm-up each."""
  for f in fns.values():
    jax.block_until_ready(f())
  ts = {k: [] for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(f())
      ts[k].append(time.perf_counter() - t)
  return {k: statistics.median(v) for k, v in ts.items()}


def captum_table(model, variables, images, *, repeats=5, layers=("conv2", "conv5"),
                 batches=(1, 16), rules=("deconvnet", "guided"), channel=3):
  """[{layer, batch, rule, project_per_s, captum_per_s, model_vjp_per_s, ...}], or
  None when torch or captum is missing.  ``images``: (N, S, S, 3) mean-subtracted."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from captum import attr as captum_attr  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import torch_ref  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  net = torch_ref.TorchPaperNet(model, images.shape[1]).load_params(
      jax.device_get(variables["params"])).eval()
  xt = torch.from_numpy(np.ascontiguousarray(np.asarray(images, np.float32).transpose(0, 3, 1, 2)))
  classes = {"deconvnet": captum_attr.NeuronDeconvolution,
             "guided": captum_attr.NeuronGuidedBackprop}
  select = lambda out: out[:, channel].flatten(1).max(dim=1).values   # strongest unit
  rows = []
  for layer in layers:
    vjp = xla.jit(lambda v, x, ch, layer=layer: plain_vjp(
        None, x, ch, lambda img: model.apply(v, img, method="features")[layer]))
    for b in batches:
      x, xb = images[:b], xt[:b].clone().requires_grad_()
      ch = jnp.full((b,), channel, jnp.int32)
      for rule in rules:
        cap = classes[rule](net, net.relu_of(layer))
        fns = {
            "project": lambda: deconv.project(model, variables, x, layer=layer,
                                              channel=channel, rule=rule),
            "captum": lambda: cap.attribute(xb, neuron_selector=select),
            "model_vjp": lambda: vjp(variables, x, ch),
        }
        ours = np.asarray(fns["project"]()).transpose(0, 3, 1, 2).reshape(b, -1)
        theirs = fns["captum"]().detach().numpy().reshape(b, -1)
        cos = min(float(o @ t / (np.linalg.norm(o) * np.linalg.norm(t) + 1e-30))
                  for o, t in zip(ours, theirs))
        t = interleaved(fns, repeats)
        rows.append({"layer": layer, "batch": b, "rule": rule,
                     **{f"{k}_per_s": b / v for k, v in t.items()},
                     "vs_captum": t["captum"] / t["project"],
                     "vs_model_vjp": t["model_vjp"] / t["project"],
                     "min_cosine_with_captum": cos})
        r = rows[-1]
        print(f"  {layer} batch {b:>2} {rule:<9}  project {r['project_per_s']:7.2f}/s  "
              f"captum {r['captum_per_s']:7.2f}/s  model vjp {r['model_vjp_per_s']:7.2f}/s  "
              f"-> {r['vs_captum']:.2f}x Captum (target >= 2), {r['vs_model_vjp']:.2f}x "
              f"the model's vjp (target >= 1); cosine with Captum >= {cos:.4f}", flush=True)
  return rows


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--captum", action="store_true",
                  help="only the table against Captum (conv2/conv5, batch 1/16, both rules)")
  ap.add_argument("--requests", type=int, default=16)
  ap.add_argument("--chunk_size", type=int, default=16)
  ap.add_argument("--single", type=int, default=4, help="requests timed one at a time")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--json", default="")
  ap.add_argument("--no_lrn", action="store_true", help="ZFNet without contrast normalisation")
  ap.add_argument("--layers", default="conv2,conv5", help="--captum: layers (comma-separated)")
  ap.add_argument("--batches", default="1,16", help="--captum: batch sizes")
  ap.add_argument("--rules", default="deconvnet,guided", help="--captum: rules")
  args = ap.parse_args()

  model = models.ZFNet(contrast_norm=not args.no_lrn)
  key = jax.random.PRNGKey(0)
  images = jnp.clip(50.0 * jax.random.normal(key, (max(args.requests, 16), 224, 224, 3)),
                    -deconv.MAX_ABS_PIXEL, deconv.MAX_ABS_PIXEL)
  variables = xla.jit(model.init)(jax.random.PRNGKey(1), images[:1])
  if args.captum:
    meta = {"device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
            "command": " ".join(["benchmarks/bench_deconv.py"] + sys.argv[1:]),
            "model": "ZFNet" + (" without contrast normalisation" if args.no_lrn else ""),
            "process_set_up": "none (a plain script: no XLA_FLAGS, no set-up call)",
            "platform": platform.platform(), "processor": rundir.machine()["cpu"],
            "versions": rundir.versions(), "load_average": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    rows = captum_table(model, variables, images, repeats=args.repeats,
                        layers=tuple(args.layers.split(",")),
                        batches=tuple(int(b) for b in args.batches.split(",")),
                        rules=tuple(args.rules.split(",")))
    if rows is None:
      raise SystemExit("torch and captum are needed for --captum")
    if args.json:
      with open(args.json, "w") as f:
        json.dump({"meta": {**meta, "load_average_end": os.getloadavg()}, "rows": rows}, f,
                  indent=1)
    return
  images = images[:args.requests]
  channels = np.arange(args.requests) % 256
  params = variables["params"]
  # A plain VJP of the same slice (conv5 at the strongest unit), for comparison.
  plain = xla.jit(lambda p, x, ch: plain_vjp(p, x, ch))
  want = xla.jit(lambda v, x: model.apply(v, x, method="features")["conv5"])(variables, images[:1])
  np.testing.assert_allclose(xla.jit(plain_conv5)(params, images[:1]), want, rtol=1e-3,
                             atol=1e-3 * float(jnp.abs(want).max()))

  res = {"device": jax.devices()[0].device_kind, "cpu_count": __import__("os").cpu_count(),
         "platform": platform.platform(), "versions": rundir.versions(),
         "requests": args.requests,
         "chunk_size": args.chunk_size}
  t_single = timeit(lambda: [deconv.project(model, variables, images[i:i + 1], layer="conv5",
                                            channel=int(channels[i]))
                             for i in range(args.single)], args.repeats) / args.single
  t_batch = timeit(lambda: deconv.project_many(model, variables, images, layer="conv5",
                                               channels=channels, chunk_size=args.chunk_size),
                   args.repeats) / args.requests
  t_plain1 = timeit(lambda: [plain(params, images[i:i + 1], channels[i:i + 1])
                             for i in range(args.single)], args.repeats) / args.single
  n = min(args.chunk_size, args.requests)
  t_plainb = timeit(lambda: plain(params, images[:n], channels[:n]), args.repeats) / n
  ours = xla.jit(lambda v, x, ch: plain_vjp(
      None, x, ch, lambda img: model.apply(v, img, method="features")["conv5"]))
  t_oursb = timeit(lambda: ours(variables, images[:n], channels[:n]), args.repeats) / n
  res.update({
      "one_at_a_time_per_s": 1 / t_single, "batched_per_s": 1 / t_batch,
      "plain_vjp_one_image_per_s": 1 / t_plain1, "plain_vjp_batched_per_s": 1 / t_plainb,
      "batched_cost_vs_plain_vjp_one_image": t_batch / t_plain1,
      "batched_cost_vs_plain_vjp_same_batch": t_batch / t_plainb,
      "model_vjp_batched_per_s": 1 / t_oursb,
      "batched_cost_vs_model_vjp_same_batch": t_batch / t_oursb,
  })
  width = max(map(len, res))
  for k, v in res.items():
    print(f"{k:<{width}}  {v:.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(res, f, indent=1)


def plain_vjp(params, x, channels, fn=None):
  act, vjp = jax.vjp(fn or (lambda img: plain_conv5(params, img)), x)
  maps = jnp.take_along_axis(act, channels[:, None, None, None], axis=3)[..., 0]
  flat = maps.reshape(maps.shape[0], -1)
  k = jnp.argmax(flat, axis=1)
  ct = (jax.nn.one_hot(k, flat.shape[1]).reshape(maps.shape)[..., None]
        * jax.nn.one_hot(channels, act.shape[3])[:, None, None, :] * act)
  return vjp(ct)[0]


if __name__ == "__main__":
  main()
