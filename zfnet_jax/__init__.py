"""zfnet_jax: ZFNet and the deconvnet of Zeiler & Fergus (ECCV 2014) in JAX/Flax."""
__version__ = "0.1.0"

# CPU: convolutions on XLA's kernels, not YNNPACK's (3x faster here; zfnet_jax/conv.py).
from zfnet_jax import conv as _conv  # pylint: disable=g-import-not-at-top
_conv.configure_xla_cpu()
