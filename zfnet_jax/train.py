"""Deprecated alias of ``zfnet_jax.training.loop`` (the module moved there); removed in the next release."""
import importlib
import warnings


def __getattr__(name: str):
  warnings.warn(f"zfnet_jax.train.{name} is deprecated: use zfnet_jax.training.loop.{name}",
                DeprecationWarning, stacklevel=2)
  return getattr(importlib.import_module("zfnet_jax.training.loop"), name)
