"""Latency of one click in the deconvnet explorer, measured through its HTTP endpoint.

  python benchmarks/explore_latency.py [--requests 10] [--json benchmarks/results/explore_latency.json]

Starts ``python -m zfnet_jax.main --mode=explore`` twice: on the shipped quickstart
weights (32 px grey) and on torchvision's AlexNet layout at 224 px (random weights
written as a .safetensors file: the speed does not depend on the values).  For every
layer: the first request of each rule (each compiles the layer's projection for that
rule; the slowest is recorded) and then ``--requests`` requests for other maps of that
layer, cycling through the three rules and giving the unit's row and column on every
second one; each is a GET of /api/projection, timed from
the request to the last byte of the ``.npy`` body.  The record: per model and layer the
first request's seconds and the median, 90th percentile and maximum of the others
(milliseconds), with the CPU, the versions and the command.  Run it on a quiet machine.
"""
import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from zfnet_jax import rundir  # noqa: E402  pylint: disable=wrong-import-position

MODELS = {
    "quickstart": {"config": "quickstart", "pretrained": "quickstart", "size": 32,
                   "layers": {"conv1": 32, "pool1": 32, "conv2": 64, "pool2": 64, "conv3": 128,
                              "conv4": 128, "conv5": 128, "fc6": 256, "fc7": 256}},
    "torchvision_alexnet_224": {"config": "torchvision_alexnet", "size": 224,
                                "layers": {"conv1": 64, "pool1": 64, "conv2": 192,
                                           "pool2": 192, "conv3": 384, "conv4": 256,
                                           "conv5": 256, "pool5": 256, "fc6": 4096,
                                           "fc7": 4096}},
}
SIDES = {"quickstart": {"conv1": 30, "pool1": 15, "conv2": 6, "pool2": 3, "conv3": 3,
                        "conv4": 3, "conv5": 3},
         "torchvision_alexnet_224": {"conv1": 55, "pool1": 27, "conv2": 27, "pool2": 13,
                                     "conv3": 13, "conv4": 13, "conv5": 13, "pool5": 6}}
RULES = ("deconvnet", "guided", "backprop")


def random_alexnet(path: str) -> None:
  """torchvision's AlexNet keys and shapes with He-normal random values, as .safetensors."""
  from safetensors.numpy import save_file
  rng = np.random.default_rng(0)
  shapes = {"features.0": (64, 3, 11, 11), "features.3": (192, 64, 5, 5),
            "features.6": (384, 192, 3, 3), "features.8": (256, 384, 3, 3),
            "features.10": (256, 256, 3, 3), "classifier.1": (4096, 9216),
            "classifier.4": (4096, 4096), "classifier.6": (1000, 4096)}
  state = {}
  for key, shape in shapes.items():
    w = rng.standard_normal(shape, np.float32) * np.float32(np.sqrt(2 / np.prod(shape[1:])))
    state[key + ".weight"] = w
    state[key + ".bias"] = np.zeros(shape[0], np.float32)
  save_file(state, path)


def _port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _get(url: str) -> float:
  t = time.perf_counter()
  with urllib.request.urlopen(url, timeout=600) as r:
    body = r.read()
    assert r.status == 200 and body[:6] == b"\x93NUMPY", body[:200]
  return time.perf_counter() - t


def measure(name: str, spec: dict, tmp: str, requests: int) -> dict:
  port = _port()
  pretrained = spec.get("pretrained") or os.path.join(tmp, "alexnet.safetensors")
  if not spec.get("pretrained"):
    random_alexnet(pretrained)
  cmd = [sys.executable, "-m", "zfnet_jax.main", f"--config={spec['config']}",
         f"--workdir={os.path.join(tmp, name)}", "--mode=explore",
         f"--config.pretrained={pretrained}", f"--port={port}"]
  proc = subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env=dict(os.environ, PYTHONPATH=REPO))
  base = f"http://127.0.0.1:{port}/api/projection?image=china"
  try:
    for _ in range(300):
      try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read()
        break
      except OSError:
        time.sleep(1)
    out = {}
    for layer, maps in spec["layers"].items():
      first = max(_get(f"{base}&layer={layer}&channel=0&rule={rule}") for rule in RULES)
      if layer in SIDES[name]:
        _get(f"{base}&layer={layer}&channel=0&row=0&col=0")
      times = []
      for i in range(requests):
        q = f"{base}&layer={layer}&channel={(7 * i + 1) % maps}&rule={RULES[i % 3]}"
        if i % 2 and layer in SIDES[name]:
          side = SIDES[name][layer]
          q += f"&row={(3 * i) % side}&col={(5 * i) % side}"
        times.append(_get(q))
      ms = sorted(1000 * t for t in times)
      out[layer] = {"first_request_s": round(first, 2),
                    "median_ms": round(statistics.median(ms), 1),
                    "p90_ms": round(ms[min(len(ms) - 1, int(0.9 * len(ms)))], 1),
                    "max_ms": round(ms[-1], 1)}
      print(f"{name} {layer}: first {first:.2f} s, median {out[layer]['median_ms']} ms, "
            f"max {out[layer]['max_ms']} ms", flush=True)
    return {"input": f"{spec['size']}x{spec['size']}", "requests_per_layer": requests,
            "layers": out,
            "max_first_request_s": max(v["first_request_s"] for v in out.values()),
            "max_median_ms": max(v["median_ms"] for v in out.values()),
            "max_ms": max(v["max_ms"] for v in out.values())}
  finally:
    proc.terminate()
    proc.wait(timeout=60)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--requests", type=int, default=10)
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  record = {"what": "one explorer click through GET /api/projection "
                    "(benchmarks/explore_latency.py)",
            "command": " ".join(["benchmarks/explore_latency.py"] + sys.argv[1:]),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": rundir.machine(), "versions": rundir.versions(), "models": {}}
  with tempfile.TemporaryDirectory() as tmp:
    for name, spec in MODELS.items():
      record["models"][name] = measure(name, spec, tmp, args.requests)
  text = json.dumps(record, indent=1)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  main()
