"""zfnet_jax: ZFNet and the deconvnet of Zeiler & Fergus (ECCV 2014) in JAX/Flax."""
__version__ = "0.1.0"
