"""XLA on CPU: which kernels run convolutions and reductions, and how many host devices.

jaxlib 0.10 hands every convolution and matmul on the CPU to YNNPACK
("__ynn_fusion").  For this network YNNPACK's convolutions are slow (its weight
gradients and strided convolutions run at a fraction of XLA's own Eigen kernels),
while its matmuls and reductions are as fast as XLA's or faster (a bias gradient
over (N, H, W) runs as a tree of ``reduce-window`` in XLA's own code).  So every
function this package compiles (``jit`` below: the train and eval steps, the
deconvnet's projections, the scans of the analyses) gets the compiler option

  xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE

which gives convolutions back to XLA and keeps dots and reductions on YNNPACK.
The option is per compiled function: nothing process-wide is set, so it holds
however the package is called (a script, a notebook, the command line) and leaves
the user's own ``jax.jit`` functions alone.  The maths is the same HLO, so values,
VJPs and the deconvnet's "filter" step (the convolution's VJP w.r.t. its input) are
exactly XLA's.  It is left out (jaxlib's defaults apply) when the backend is not the
CPU, the installed jaxlib is not one it was measured on (``KNOWN_JAXLIB``: an
option jaxlib does not know is an error), the user set the option in ``XLA_FLAGS``
(theirs wins), or ``ZFNET_XLA_CPU_DEFAULTS`` is set.

One difference: YNNPACK's max reduction can drop NaN (a 2x2/2 ``nn.max_pool``, which
XLA turns into a reduction, gave finite maxima over windows holding NaN), where XLA's
propagates it.  Code that relies on NaN reaching a maximum compiles with
``nan_propagating_options()`` (``deconv.probe_receptive_fields`` does).

Host devices.  By default the CPU is one JAX device.  ``set_host_devices(n)``
(``--config.cpu_host_devices=n`` on the command line) splits it into n host devices
before JAX starts, so the data-parallel train step runs one shard per core and
XLA's single-threaded loop fusions in parallel -- faster on some machines, but
**at a risk**: every step then ends in XLA's in-process all-reduce, whose
participants wait for one another inside the CPU's shared thread pool, and on a
loaded machine that wait can exceed XLA's fixed 40 s rendezvous timeout, which
aborts the process (a C++ check failure, no Python exception).  A run killed that
way resumes from its last checkpoint (rerun the same command), but use it only on
a machine you have to yourself.  ``benchmarks/soak.py`` measures both settings.
"""
from __future__ import annotations

import functools
import os
import warnings

FLAG = "xla_cpu_experimental_ynn_fusion_type"
DEVICES_FLAG = "xla_force_host_platform_device_count"
OPT_OUT = "ZFNET_XLA_CPU_DEFAULTS"
FAST_VALUE = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
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


def _applies() -> bool:
  """The backend is the CPU, the jaxlib a measured one, and the user left the option alone."""
  import jax  # pylint: disable=g-import-not-at-top
  return (jax.default_backend() == "cpu" and _jaxlib_version() in KNOWN_JAXLIB
          and not os.environ.get(OPT_OUT) and FLAG not in os.environ.get("XLA_FLAGS", ""))


def compiler_options() -> dict | None:
  """``jax.jit`` compiler options of this package's functions: ``CPU_COMPILER_OPTIONS``
  where they apply (see the module docstring), else None (jaxlib's defaults)."""
  return dict(CPU_COMPILER_OPTIONS) if _applies() else None


def nan_propagating_options() -> dict | None:
  """``jax.jit`` compiler options under which every CPU reduction is XLA's own, so a
  NaN reaches each maximum it is in (None where the default already does that)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != "cpu" or _jaxlib_version() not in KNOWN_JAXLIB:
    return None
  return {FLAG: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def _tracing() -> bool:
  """True inside a JAX trace (another jit, grad, vmap...), where a jit is inlined and
  JAX refuses compiler options."""
  try:
    from jax._src import core  # pylint: disable=g-import-not-at-top
    return not core.trace_state_clean()
  except (ImportError, AttributeError):   # a JAX without it: no options, never an error
    return True


class _Jit:
  """``jax.jit(fun, compiler_options=compiler_options(), **kwargs)``, made on the first
  call (when the backend is known, so importing a module initialises nothing); called
  inside another trace, the same jit without options (it is inlined there)."""

  def __init__(self, fun, kwargs):
    functools.update_wrapper(self, fun)
    self._fun, self._kwargs, self._jitted, self._plain = fun, kwargs, None, None

  def _get(self):
    if self._jitted is None:
      import jax  # pylint: disable=g-import-not-at-top
      self._jitted = jax.jit(self._fun, compiler_options=compiler_options(), **self._kwargs)
    return self._jitted

  def __call__(self, *args, **kwargs):
    if _tracing():
      if self._plain is None:
        import jax  # pylint: disable=g-import-not-at-top
        self._plain = jax.jit(self._fun, **self._kwargs)
      return self._plain(*args, **kwargs)
    return self._get()(*args, **kwargs)

  def __getattr__(self, name):   # lower, trace, eval_shape, clear_cache, ...
    if name.startswith("__") or name in ("_fun", "_kwargs", "_jitted", "_plain"):
      raise AttributeError(name)
    return getattr(self._get(), name)


def jit(fun=None, **kwargs):
  """``jax.jit`` with this package's CPU kernel options (``compiler_options()``);
  the same arguments, usable as ``@jit`` or ``@functools.partial(jit, ...)``."""
  if fun is None:
    return functools.partial(jit, **kwargs)
  return _Jit(fun, kwargs)


def set_host_devices(n: int) -> int:
  """Split the CPU into ``n`` host devices (opt-in, with the risk the module docstring
  states); call before JAX starts.  Returns the count in effect for the CPU backend
  created from now on: ``n``, or the user's own ``--xla_force_host_platform_device_count``
  in ``XLA_FLAGS`` (which wins).  ValueError for n < 1 or once JAX's backends exist.
  """
  if not isinstance(n, int) or isinstance(n, bool) or n < 1:
    raise ValueError(f"cpu_host_devices={n!r}; allowed: a positive int (1 = one device, "
                     "the safe default)")
  flags = os.environ.get("XLA_FLAGS", "")
  mine = [f.split("=", 1)[-1] for f in flags.split() if f.lstrip("-").startswith(DEVICES_FLAG)]
  current = int(mine[-1]) if mine else 1
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized() and n != current:
    raise ValueError(f"cpu_host_devices={n}: JAX has started already with {current}; set it "
                     "before the first JAX computation")
  if mine:
    return current
  if n > 1:
    os.environ["XLA_FLAGS"] = f"{flags} --{DEVICES_FLAG}={n}".strip()
  return n


def configure_xla_cpu(batch_size: int | None = None) -> bool:
  """Deprecated: the CPU kernel options are now per function (``jit``) and need no
  set-up; host devices are ``set_host_devices`` (opt-in).  Does nothing."""
  del batch_size
  warnings.warn("conv.configure_xla_cpu() is no longer needed (the package's functions "
                "carry their CPU options); for host devices see conv.set_host_devices",
                DeprecationWarning, stacklevel=2)
  return True
