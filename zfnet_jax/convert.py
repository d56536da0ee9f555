"""Deprecated alias of ``zfnet_jax.nn.convert`` (the module moved there); removed in the next release."""
import importlib
import warnings


def __getattr__(name: str):
  warnings.warn(f"zfnet_jax.convert.{name} is deprecated: use zfnet_jax.nn.convert.{name}",
                DeprecationWarning, stacklevel=2)
  return getattr(importlib.import_module("zfnet_jax.nn.convert"), name)
