"""Deconvnet projections/s for conv5 units of full-size ZFNet at 224x224 (run by hand).

  python benchmarks/bench_deconv.py [--requests 16] [--chunk_size 16] [--single 4]

Prints (and writes to --json) the rate one request at a time (``project`` on one
image), batched (``project_many``), and the cost per projection relative to a
plain ``jax.vjp`` of the same slice (features up to conv5 written with standard
JAX ops: jax.nn.relu, lax.reduce_window max, LRN; cotangent one-hot at the unit),
both for one image per call and for a batch of ``chunk_size`` images per call,
and to ``jax.vjp`` of the model's own conv5 slice (``model.apply(..., method=
"features")["conv5"]``, backprop rule: the same switch-unpooling max-pool).
Compilation is excluded (each function is called once first).  Figures on a
shared machine are noisy: take the median of --repeats runs.
"""
import argparse
import json
import platform
import time

from zfnet_jax import conv  # pylint: disable=g-bad-import-order

conv.configure_xla_cpu()   # before JAX initialises: CPU convolutions on XLA's kernels

import jax  # pylint: disable=g-import-not-at-top,g-bad-import-order
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from zfnet_jax import deconv, layers, models, rundir  # pylint: disable=g-import-not-at-top


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
  a = layers._lrn(a, 2.0, 5, 1e-4, 0.75)
  a = pool(jax.nn.relu(conv(a, params["conv2"], 2, ((0, 0), (0, 0)))))
  a = layers._lrn(a, 2.0, 5, 1e-4, 0.75)
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


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--requests", type=int, default=16)
  ap.add_argument("--chunk_size", type=int, default=16)
  ap.add_argument("--single", type=int, default=4, help="requests timed one at a time")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--json", default="")
  args = ap.parse_args()

  model = models.ZFNet()
  key = jax.random.PRNGKey(0)
  images = 50.0 * jax.random.normal(key, (args.requests, 224, 224, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), images[:1])
  channels = np.arange(args.requests) % 256
  params = variables["params"]
  # A plain VJP of the same slice (conv5 at the strongest unit), for comparison.
  plain = jax.jit(lambda p, x, ch: _plain_vjp(p, x, ch))
  want = jax.jit(lambda v, x: model.apply(v, x, method="features")["conv5"])(variables, images[:1])
  np.testing.assert_allclose(jax.jit(plain_conv5)(params, images[:1]), want, rtol=1e-3,
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
  ours = jax.jit(lambda v, x, ch: _plain_vjp(
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


def _plain_vjp(params, x, channels, fn=None):
  act, vjp = jax.vjp(fn or (lambda img: plain_conv5(params, img)), x)
  maps = jnp.take_along_axis(act, channels[:, None, None, None], axis=3)[..., 0]
  flat = maps.reshape(maps.shape[0], -1)
  k = jnp.argmax(flat, axis=1)
  ct = (jax.nn.one_hot(k, flat.shape[1]).reshape(maps.shape)[..., None]
        * jax.nn.one_hot(channels, act.shape[3])[:, None, None, :] * act)
  return vjp(ct)[0]


if __name__ == "__main__":
  main()
