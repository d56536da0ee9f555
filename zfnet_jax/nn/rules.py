"""The deconvnet's ReLU rules (paper Sec. 2.1) as objects, in one registry.

A rule says what a ReLU passes down: from its forward input X and the signal R coming
down, the signal below.  Every other layer goes down alike in every rule (max-pools
through their switches, convolutions with their transposed filters).  Our layers
(``layers.relu``) and the rewriter for any JAX function (``deconv.rewrite``) both take
a rule by name from ``RULES``.  A new rule is one subclass of ``Rule`` with a ``name``
(it registers itself) and its tests.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

RULES: dict[str, Rule] = {}   # name -> rule, in the order they are defined


class Rule:
  """A ReLU's way down: ``backward(x, r)`` -> the signal below, shaped like ``x``.

  ``exact_gradient``: the rule is the ReLU's own gradient (JAX's ``jax.nn.relu`` is
  used then, which also keeps forward-mode differentiation working)."""
  name: str = ""
  exact_gradient: bool = False

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    RULES[cls.name] = cls()

  def backward(self, x: jax.Array, r: jax.Array) -> jax.Array:
    raise NotImplementedError


def rectify(r: jax.Array) -> jax.Array:
  """The deconvnet's rectification of the reconstructed signal: relu(R)."""
  return jnp.maximum(r, 0)


class Backprop(Rule):
  """The gradient: R * 1[X > 0]."""
  name = "backprop"
  exact_gradient = True

  def backward(self, x, r):
    return jnp.where(x > 0, r, 0)


class Deconvnet(Rule):
  """Zeiler & Fergus: rectify(R) = relu(R), whatever X was."""
  name = "deconvnet"

  def backward(self, x, r):
    return rectify(r)


class Guided(Rule):
  """Guided backpropagation (Springenberg et al.): R * 1[X > 0] * 1[R > 0]."""
  name = "guided"

  def backward(self, x, r):
    return jnp.where(x > 0, rectify(r), 0)


def get(rule: str, what: str = "rule") -> Rule:
  """The rule named ``rule``; ValueError naming ``what`` and the allowed names otherwise."""
  try:
    return RULES[rule]
  except (KeyError, TypeError):
    raise ValueError(f"unknown {what} {rule!r}; allowed: {', '.join(RULES)}") from None
