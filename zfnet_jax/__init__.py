"""zfnet_jax: ZFNet and the deconvnet of Zeiler & Fergus (ECCV 2014) in JAX/Flax.

Importing the package changes nothing in JAX: its compiled functions carry their own
CPU options (``zfnet_jax.xla``), so no set-up call is needed before using it.
"""
__version__ = "0.2.0"
