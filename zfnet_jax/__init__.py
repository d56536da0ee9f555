"""zfnet_jax: ZFNet and the deconvnet of Zeiler & Fergus (ECCV 2014) in JAX/Flax.

Importing the package changes nothing in JAX; entry points (``main``, the
benchmarks, the notebook, the tests) call ``zfnet_jax.conv.configure_xla_cpu()``
before JAX starts, to run CPU convolutions on XLA's own kernels.
"""
__version__ = "0.2.0"
