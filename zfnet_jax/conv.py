"""XLA on CPU: which kernels run convolutions and reductions, and how many host devices.

jaxlib 0.10 hands every convolution and matmul on the CPU to YNNPACK
("__ynn_fusion").  For this network YNNPACK's convolutions are slow: the
weight gradients run at 5-17 GFLOP/s and conv2's forward (5x5, stride 2) at
~25 GFLOP/s on a 2-core AVX-512 Xeon, where XLA's own (Eigen) convolution
kernels reach 35-90 GFLOP/s for the same ops (``benchmarks/run.py``).  YNNPACK's
matmuls, on the other hand, are as fast as Eigen's or faster (fc6's input
gradient: 90 vs 25 GFLOP/s).  So we keep YNNPACK for dots
and reductions (below) and give convolutions back to XLA:

  --xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE

Nothing else changes: the same HLO convolution, so values, VJPs and the
deconvnet's "filter" step (the convolution's VJP w.r.t. its input) are exactly
XLA's.  ``configure_xla_cpu()`` (called by the entry points before JAX starts) adds
the flag to ``XLA_FLAGS`` if the JAX backends are not initialised yet, the
user has not set the option, ``ZFNET_XLA_CPU_DEFAULTS`` is unset, and the
installed jaxlib is one where the option is known (an unknown XLA flag aborts
the process).  For a jit compiled after initialisation, pass
``compiler_options=CPU_COMPILER_OPTIONS`` to ``jax.jit``.

Reductions go to YNNPACK too (``LIBRARY_FUSION_TYPE_REDUCE``): XLA's own CPU
reduction of a bias gradient over (N, H, W) runs as a tree of ``reduce-window``
at ~0.6 G elements/s (5.9 ms of the quickstart's 64 ms step for conv1's bias).
One difference: YNNPACK's max reduction can drop NaN (a 2x2/2 ``nn.max_pool``, which
XLA turns into a reduction, gave finite maxima over windows holding NaN), where XLA's
propagates it.  Code that relies on NaN reaching a maximum compiles with
``nan_propagating_options()`` (``deconv.probe_receptive_fields`` does).

Many of XLA's CPU loop fusions (bias + ReLU, pooling, unpooling) run on one
thread.  Given the training batch, ``configure_xla_cpu(batch_size)`` also splits the
CPU into host devices (``--xla_force_host_platform_device_count``, ``cpu_devices``):
the data-parallel train step (``train.train_step`` under ``shard_map``) then runs one
shard per core and those loops in parallel.  The quickstart's step on a 2-core Intel
Xeon: 50 ms on one device, 37-43 ms on two, 43 ms on four (``benchmarks/run.py``).
"""
from __future__ import annotations

import os

FLAG = "xla_cpu_experimental_ynn_fusion_type"
DEVICES_FLAG = "xla_force_host_platform_device_count"
MIN_DEVICE_BATCH = 16   # images per host device at least
FAST_VALUE = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
# jaxlib's default (YNNPACK for convolutions and dots), for A/B comparisons.
DEFAULT_VALUE = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
CPU_COMPILER_OPTIONS = {FLAG: FAST_VALUE}
DEFAULT_CPU_COMPILER_OPTIONS = {FLAG: DEFAULT_VALUE}
# jaxlib versions (major, minor) where the option exists and was measured.
KNOWN_JAXLIB = ((0, 10),)


def nan_propagating_options() -> dict | None:
  """``jax.jit`` compiler options under which every CPU reduction is XLA's own, so a
  NaN reaches each maximum it is in (None where the default already does that)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != "cpu" or _jaxlib_version() not in KNOWN_JAXLIB:
    return None
  return {FLAG: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def _jaxlib_version() -> tuple[int, ...]:
  try:
    import jaxlib.version
    return tuple(int(p) for p in jaxlib.version.__version__.split(".")[:2])
  except Exception:  # pylint: disable=broad-except
    return ()


def cpu_devices(batch_size: int, cores: int | None = None) -> int:
  """Host devices for a data-parallel CPU step on ``batch_size`` images: the largest
  d <= ``cores`` (default: the cores this process may use) that divides the batch
  and leaves at least ``MIN_DEVICE_BATCH`` images per device; 1 if none does."""
  if cores is None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(d for d in range(1, (cores or 1) + 1)
             if d == 1 or (batch_size % d == 0 and batch_size // d >= MIN_DEVICE_BATCH))


def configure_xla_cpu(batch_size: int | None = None) -> bool:
  """Route CPU convolutions to XLA's kernels and reductions to YNNPACK; with
  ``batch_size``, also one host device per core (``cpu_devices``; see the module
  docstring).  Each option is left alone if the user set it in ``XLA_FLAGS``; nothing
  is set if ``ZFNET_XLA_CPU_DEFAULTS`` is set, the JAX backends are initialised, or
  (for the devices) ``JAX_COORDINATOR_ADDRESS`` says the run is multi-process.

  Returns True if the kernel flag is in effect for the backends created from now on
  (added now or already present), False if it was not added.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if os.environ.get("ZFNET_XLA_CPU_DEFAULTS"):
    return xla_cpu_configured()
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    return xla_cpu_configured()
  add = []
  if FLAG not in flags and _jaxlib_version() in KNOWN_JAXLIB:
    add.append(f"--{FLAG}={FAST_VALUE}")
  if batch_size and DEVICES_FLAG not in flags and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
    n = cpu_devices(batch_size)
    if n > 1:
      add.append(f"--{DEVICES_FLAG}={n}")
  if add:
    os.environ["XLA_FLAGS"] = " ".join([flags] + add).strip()
  return xla_cpu_configured()


def xla_cpu_configured() -> bool:
  """True if this process's CPU backend routes convolutions to XLA's kernels."""
  values = [f.split("=", 1)[-1] for f in os.environ.get("XLA_FLAGS", "").split()
            if f.split("=", 1)[0].lstrip("-") == FLAG]
  return bool(values) and values[-1] == FAST_VALUE
