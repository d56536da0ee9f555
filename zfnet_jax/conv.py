"""Fast convolutions on CPU: which XLA CPU kernel runs them.

jaxlib 0.10 hands every convolution and matmul on the CPU to YNNPACK
("__ynn_fusion").  For this network YNNPACK's convolutions are slow: the
weight gradients run at 5-17 GFLOP/s and conv2's forward (5x5, stride 2) at
~25 GFLOP/s on a 2-core AVX-512 Xeon, where XLA's own (Eigen) convolution
kernels reach 35-90 GFLOP/s for the same ops (``benchmarks/run.py``).  YNNPACK's
matmuls, on the other hand, are as fast as Eigen's or faster (fc6's input gradient: 90 vs 25 GFLOP/s).  So we keep YNNPACK for dots
and give convolutions back to XLA:

  --xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT

Nothing else changes: the same HLO convolution, so values, VJPs and the
deconvnet's "filter" step (the convolution's VJP w.r.t. its input) are exactly
XLA's.  ``configure_xla_cpu()`` (called by the entry points before JAX starts) adds
the flag to ``XLA_FLAGS`` if the JAX backends are not initialised yet, the
user has not set the option, ``ZFNET_XLA_CPU_DEFAULTS`` is unset, and the
installed jaxlib is one where the option is known (an unknown XLA flag aborts
the process).  For a jit compiled after initialisation, pass
``compiler_options=CPU_COMPILER_OPTIONS`` to ``jax.jit``.
"""
from __future__ import annotations

import os

FLAG = "xla_cpu_experimental_ynn_fusion_type"
FAST_VALUE = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
# jaxlib's default (YNNPACK for convolutions and dots), for A/B comparisons.
DEFAULT_VALUE = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
CPU_COMPILER_OPTIONS = {FLAG: FAST_VALUE}
DEFAULT_CPU_COMPILER_OPTIONS = {FLAG: DEFAULT_VALUE}
# jaxlib versions (major, minor) where the option exists and was measured.
KNOWN_JAXLIB = ((0, 10),)


def _jaxlib_version() -> tuple[int, ...]:
  try:
    import jaxlib.version
    return tuple(int(p) for p in jaxlib.version.__version__.split(".")[:2])
  except Exception:  # pylint: disable=broad-except
    return ()


def configure_xla_cpu() -> bool:
  """Route CPU convolutions to XLA's kernels (see module docstring).

  Returns True if the flag is in effect for the backends created from now on
  (added now or already present), False if it was not added.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if FLAG in flags:
    return xla_cpu_configured()
  if os.environ.get("ZFNET_XLA_CPU_DEFAULTS") or _jaxlib_version() not in KNOWN_JAXLIB:
    return False
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    return False
  os.environ["XLA_FLAGS"] = f"{flags} --{FLAG}={FAST_VALUE}".strip()
  return True


def xla_cpu_configured() -> bool:
  """True if this process's CPU backend routes convolutions to XLA's kernels."""
  values = [f.split("=", 1)[-1] for f in os.environ.get("XLA_FLAGS", "").split()
            if f.split("=", 1)[0].lstrip("-") == FLAG]
  return bool(values) and values[-1] == FAST_VALUE
