"""Any CNN: rewrite a function's jaxpr so that its VJP follows a deconvnet rule.

``deconvnet_transform(fn, rule)`` keeps ``fn``'s forward pass and gives its
ReLUs and max-pools the rule versions of ``zfnet_jax.layers`` (rectify,
switch unpooling); convolutions keep their own VJP (the paper's transposed
filters).  ``zfnet_jax.deconv.project_fn`` projects through it.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as xcore

from zfnet_jax import layers

class UnsupportedConstructError(NotImplementedError):
  """``deconvnet_transform`` met a construct it cannot give the rule to."""


_INLINE = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
           "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
           "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr",
           "remat2": "jaxpr", "checkpoint": "jaxpr"}
# custom_jvp functions made only of these are clamps (jax.nn.relu, relu6): rewritten.
_CLAMP_PRIMS = {"max", "min", "jit", "pjit", "convert_element_type", "broadcast_in_dim"}
_NOT_RELU = ("logaddexp",)  # custom_jvp functions with a max that are no ReLU (softplus)
_SHAPE_OPS = ("broadcast_in_dim", "convert_element_type", "reshape", "squeeze",
              "expand_dims", "copy", "copy_p")


def _is_max_pool_jaxpr(jaxpr) -> bool:
  return any(e.primitive is jax.lax.max_p for e in jaxpr.eqns)


def _prims(jaxpr, acc=None) -> set:
  """Names of all primitives in ``jaxpr`` and the jaxprs inside it."""
  acc = set() if acc is None else acc
  for eqn in jaxpr.eqns:
    acc.add(eqn.primitive.name)
    for sub in xcore.jaxprs_in_params(eqn.params):
      _prims(sub, acc)
  return acc


_COMPARISONS = ("gt", "ge", "lt", "le")
_TARGETS = {"max", "min", "reduce_window_max", "reduce_max"}
# A ReLU or max-pool inside these (scan, while, cond, shard_map, ...) cannot be reached.
_UNREACHABLE = {"max", "reduce_window_max", "reduce_max"}


def _has_target(jaxpr, incoming_facts=False) -> bool:
  """Could ``jaxpr`` hold a ReLU, a max-pool or a sign test (so it must be rewritten)?

  max / min / reduce_window_max / reduce_max and comparisons always count;
  select_n, mul, not, convert_element_type only with a sign test coming in.
  """
  names = _prims(_sub_jaxpr(jaxpr))
  if names & _TARGETS or names & set(_COMPARISONS):
    return True
  return incoming_facts and bool(names & {"select_n", "mul", "not", "convert_element_type"})


def _jvp_name(eqn) -> str | None:
  """Name of the Python function behind a custom_jvp_call (from its debug info)."""
  info = getattr(_sub_jaxpr(eqn.params["call_jaxpr"]), "debug_info", None)
  src = getattr(info, "func_src_info", None) or ""
  return src.split(" ")[0] or None


def _is_zero_const(value) -> bool:
  try:
    return bool(np.all(np.asarray(value) == 0))
  except Exception:  # a tracer: not a known constant
    return False


def _eval_with_rule(jaxpr, consts, args, rule, in_facts=None):
  """Evaluate ``jaxpr`` with ReLUs and max-pools replaced by the rule versions.

  ReLU patterns: max(x, 0) / max(0, x) (jax.nn.relu, jnp.maximum, jnp.clip(x, 0)),
  select_n on a sign test of x that keeps x where it is positive and 0 elsewhere
  (jnp.where(x > 0, x, 0), jnp.where(x >= 0, x, 0), jnp.where(x < 0, 0, x),
  jnp.where(~(x < 0), x, 0), ...) and x * (x > 0) (or x >= 0).  A select or product
  on x's own sign test that is no ReLU (leaky ReLU, ELU, x * (x < 0)) and min(x, 0)
  raise ``UnsupportedConstructError``.  Facts about vars (holds zeros; is a sign
  test of x; is the number 0/1 of a sign test of x) follow values into inlined
  sub-jaxprs.  ``in_facts``: one (zero, sign, indicator) per invar, where sign and
  indicator are None or (x, positive): the test is true where x > 0 (or >= 0) if
  ``positive``, where x < 0 (or <= 0) if not.
  """
  env = {}
  zeros = set()      # vars known to hold only zeros
  sign = {}          # var -> (x, positive) for var = a sign test of x
  indicator = {}     # var -> (x, positive) for var = convert(sign test of x)

  def read(v):
    return v.val if isinstance(v, xcore.Literal) else env[v]

  def is_zero(v):
    if isinstance(v, xcore.Literal):
      return _is_zero_const(v.val)
    return v in zeros

  def facts(v):
    if isinstance(v, xcore.Literal):
      return (is_zero(v), None, None)
    return (v in zeros, sign.get(v), indicator.get(v))

  def as_relu(x, eqn):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return None
    if tuple(x.shape) != tuple(eqn.outvars[0].aval.shape):
      raise UnsupportedConstructError(
          f"a ReLU whose zero is larger than its input ({eqn}); broadcast the input first")
    return [layers.relu(x, rule)]

  def refuse(what, eqn):
    raise UnsupportedConstructError(
        f"{what} ({eqn}): deconvnet_transform gives the rule to ReLUs (max(x, 0), "
        f"jnp.where(x > 0, x, 0), x * (x > 0)) and max-pools, and refuses other "
        f"functions of the sign of x rather than let them keep plain gradients")

  for v, c in zip(jaxpr.constvars, consts):
    env[v] = c
    if _is_zero_const(c):
      zeros.add(v)
  for i, (v, a) in enumerate(zip(jaxpr.invars, args)):
    env[v] = a
    if in_facts is not None:
      z, sgn, ind = in_facts[i]
      if z:
        zeros.add(v)
      if sgn is not None:
        sign[v] = sgn
      if ind is not None:
        indicator[v] = ind

  for eqn in jaxpr.eqns:
    prim, name = eqn.primitive, eqn.primitive.name
    invals = [read(v) for v in eqn.invars]
    out = None
    if name == "max" and len(eqn.invars) == 2 and any(map(is_zero, eqn.invars)):
      out = as_relu(invals[1] if is_zero(eqn.invars[0]) else invals[0], eqn)
    elif (name == "min" and len(eqn.invars) == 2 and any(map(is_zero, eqn.invars))
          and not all(map(is_zero, eqn.invars))
          and jnp.issubdtype(jnp.result_type(*invals), jnp.floating)):
      refuse("min(x, 0), the negative part of x (e.g. x - jnp.minimum(x, 0), an ELU)", eqn)
    elif (name == "select_n" and len(eqn.invars) == 3
          and not isinstance(eqn.invars[0], xcore.Literal) and eqn.invars[0] in sign):
      x, positive = sign[eqn.invars[0]]
      (a, b), (va, vb) = eqn.invars[1:], invals[1:]   # a where the test is false, b where true
      if (positive and is_zero(a) and vb is x) or (not positive and va is x and is_zero(b)):
        out = as_relu(x, eqn)
      elif va is x or vb is x:
        refuse("a select on the sign of x that passes x and is not a ReLU (a leaky ReLU, "
               "an ELU, jnp.where(x > 0, 0, x), ...)", eqn)
    elif name == "mul" and len(eqn.invars) == 2:
      for k in (0, 1):
        v, other = eqn.invars[k], invals[1 - k]
        if isinstance(v, xcore.Literal) or v not in indicator or indicator[v][0] is not other:
          continue
        if not indicator[v][1]:
          refuse("x * (x < 0), the negative part of x", eqn)
        out = as_relu(other, eqn)
        break
    elif name == "reduce_max" and jnp.issubdtype(invals[0].dtype, jnp.floating):
      out = [layers.reduce_max(invals[0], tuple(int(a) for a in eqn.params["axes"]))]
    elif name == "reduce_window_max":
      p = eqn.params
      if any(d != 1 for d in tuple(p["base_dilation"]) + tuple(p["window_dilation"])):
        raise UnsupportedConstructError(
            f"reduce_window_max with base_dilation={p['base_dilation']} "
            f"window_dilation={p['window_dilation']} (only undilated max-pools are supported)")
      if jnp.issubdtype(invals[0].dtype, jnp.floating):
        try:
          out = [layers.general_max_pool(invals[0], tuple(p["window_dimensions"]),
                                         tuple(p["window_strides"]),
                                         layers._tuple_padding(p["padding"]))]
        except ValueError as e:
          raise UnsupportedConstructError(f"reduce_window_max: {e}") from None
    elif name == "reduce_window" and _is_max_pool_jaxpr(eqn.params["jaxpr"]):
      raise UnsupportedConstructError(
          "reduce_window with a max computation and an init value other than -inf "
          "(e.g. lax.reduce_window(x, 0., lax.max, ...)); use -inf as the init value "
          "(flax.linen.max_pool does)")
    elif name == "custom_jvp_call" and _jvp_name(eqn) in _NOT_RELU:
      pass  # e.g. softplus's logaddexp(x, 0): a max with zero that is no ReLU
    elif (name == "custom_jvp_call"
          and not _prims(_sub_jaxpr(eqn.params["call_jaxpr"])) <= _CLAMP_PRIMS
          and _prims(_sub_jaxpr(eqn.params["call_jaxpr"])) & {"max", "reduce_window_max"}):
      raise UnsupportedConstructError(
          f"custom_jvp function {_jvp_name(eqn)!r} contains a max among other ops; "
          f"deconvnet_transform cannot tell whether it is a ReLU (it rewrites custom_jvp "
          f"functions made of max/min only, e.g. jax.nn.relu, relu6; and keeps "
          f"{', '.join(_NOT_RELU)})")
    elif name in _INLINE and _has_target(
        eqn.params[_INLINE[name]],
        any(f[1] is not None or f[2] is not None for f in map(facts, eqn.invars))):
      sub = eqn.params[_INLINE[name]]
      sub_consts = sub.consts if isinstance(sub, xcore.ClosedJaxpr) else ()
      out = _eval_with_rule(_sub_jaxpr(sub), sub_consts, invals, rule,
                            [facts(v) for v in eqn.invars])
    elif any(_prims(s) & _UNREACHABLE for s in xcore.jaxprs_in_params(eqn.params)):
      raise UnsupportedConstructError(
          f"primitive {name!r} contains a ReLU or max-pool, and deconvnet_transform "
          f"cannot rewrite inside it (supported: {', '.join(sorted(_INLINE))}); "
          f"move the ReLU/max-pool out of the {name}")

    if out is None:
      bind_params = prim.get_bind_params(eqn.params)
      with eqn.ctx.manager:
        ans = prim.bind(*invals, **bind_params)
      out = ans if prim.multiple_results else [ans]
      _track(eqn, name, invals, is_zero, zeros, sign, indicator)
    for v, val in zip(eqn.outvars, out):
      env[v] = val
  return [read(v) for v in jaxpr.outvars]


def _track(eqn, name, invals, is_zero, zeros, sign, indicator):
  """Record the facts the ReLU patterns need about ``eqn``'s output."""
  v0 = eqn.invars[0] if eqn.invars else None
  known = lambda v, table: not isinstance(v, xcore.Literal) and v in table
  if name in _SHAPE_OPS and v0 is not None and is_zero(v0):
    zeros.add(eqn.outvars[0])
  elif name in _COMPARISONS and len(invals) == 2 and is_zero(eqn.invars[0]) != is_zero(
      eqn.invars[1]):
    k = 1 if is_zero(eqn.invars[0]) else 0        # the operand that is not zero
    if jnp.issubdtype(jnp.result_type(invals[k]), jnp.floating):
      # x > 0, x >= 0, 0 < x, 0 <= x: true where x is positive.
      sign[eqn.outvars[0]] = (invals[k], (name in ("gt", "ge")) == (k == 0))
  elif name == "not" and known(v0, sign):
    x, positive = sign[v0]
    sign[eqn.outvars[0]] = (x, not positive)
  elif name == "convert_element_type" and (known(v0, sign) or known(v0, indicator)):
    indicator[eqn.outvars[0]] = sign[v0] if v0 in sign else indicator[v0]


def _sub_jaxpr(sub):
  return sub.jaxpr if isinstance(sub, xcore.ClosedJaxpr) else sub


def deconvnet_transform(fn: Callable, rule: str = "deconvnet") -> Callable:
  """``fn`` with the same forward pass and a VJP that follows ``rule``.

  Works on any JAX function (a Flax Linen ``apply``, an NNX module, pure JAX):
  traces ``fn`` to a jaxpr and evaluates it with
    * ReLUs -- ``max(x, 0)`` (``jax.nn.relu``, ``flax.linen.relu``,
      ``nnx.relu``, ``jnp.maximum(x, 0)``, ``jnp.clip(x, 0)``,
      ``jnp.clip(x, 0, None)``), ``jnp.where`` on a sign test of x that keeps x
      where it is positive and 0 elsewhere (``jnp.where(x > 0, x, 0)``,
      ``jnp.where(x >= 0, x, 0)``, ``jnp.where(x < 0, 0, x)``, ``~(x <= 0)``, ...)
      and ``x * (x > 0)`` / ``x * (x >= 0)`` -- replaced by ``layers.relu(x, rule)``;
    * clamps ``min(max(x, 0), c)`` (``jax.nn.relu6``, ``jnp.clip(x, 0, 6)``, in
      either order): the ReLU takes the rule, the upper bound keeps its gradient
      (the signal stops where x >= c);
    * ``reduce_window_max`` (``nn.max_pool``, ``lax.reduce_window(x, -inf,
      lax.max, ...)``, any padding, no dilation) replaced by a max-pool that
      unpools through its switches (ties: first maximum in row-major order);
    * ``reduce_max`` (a max-pool written as reshape + ``max``, a global max-pool,
      maxout) replaced by ``layers.reduce_max``: the first maximum takes the whole
      signal (the plain gradient splits it among ties);
  recursing into jit, closed_call, custom_jvp_call, custom_vjp_call and
  checkpoint.  Convolutions, dense layers and everything else keep their own
  VJP (a convolution's is the paper's transposed filters).  A ``custom_vjp``
  function with a ReLU or max-pool inside is differentiated through its forward
  pass (its own backward rule is dropped); one without keeps its rule.  ``max(x, y)`` with
  no zero operand is an ordinary op (not a ReLU) and keeps its gradient, as
  do softplus (``logaddexp(x, 0)``), a sign test of one array that masks
  another (``jnp.where(m > 0, x, 0)``) and a max under ``stop_gradient``
  (softmax).  What the rewriter cannot give the rule to raises
  ``UnsupportedConstructError`` naming the construct: a max inside scan, while,
  cond, shard_map, ...; a dilated max-pool or one with an init value other than
  -inf; a ``custom_jvp`` function that mixes a max with other ops; a select or
  product on x's own sign that is no ReLU (``jax.nn.leaky_relu``, ``jax.nn.elu``,
  ``jnp.where(x > 0, 0, x)``, ``x * (x < 0)``) and ``min(x, 0)``.  Nothing
  silently falls back to plain gradients.

  Array arguments (and pytrees of them) are traced; every other argument (bools,
  strings, modules, Python numbers) is static.  Wrap the result in ``jax.jit``.
  """
  layers.check_rule(rule)

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    dynamic = [isinstance(l, (jax.Array, np.ndarray)) for l in leaves]

    def flat_fn(*values):
      it = iter(values)
      full = [next(it) if d else l for l, d in zip(leaves, dynamic)]
      a, k = jax.tree_util.tree_unflatten(treedef, full)
      return fn(*a, **k)

    values = [l for l, d in zip(leaves, dynamic) if d]
    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*values)
    outs = _eval_with_rule(closed.jaxpr, closed.consts, values, rule)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

  return wrapped


def with_probes(fn: Callable, x) -> tuple[Callable, list[str], dict]:
  """For ``fn(x) -> {name: array}`` (a CNN's named layers): ``(probed, order, shapes)``.

  ``probed(x, eps)`` is ``fn(x)`` with each ``eps[name]`` (zeros, the layer's shape) added
  to that layer wherever the forward pass reads it on, so the VJP's cotangent of
  ``eps[name]`` is the signal that arrives at that layer on the way down.  ``order``: the
  names in the order the forward pass makes them; ``shapes``: {name: ShapeDtypeStruct}
  from the same trace.  ``probed`` is traceable and
  ``deconvnet_transform`` takes it.
  """
  closed, shapes = jax.make_jaxpr(fn, return_shape=True)(x)
  if not isinstance(shapes, dict):
    raise ValueError(f"features must return {{layer: array}}, got {type(shapes).__name__}")
  jaxpr, names = closed.jaxpr, sorted(shapes)   # a dict's leaves: in sorted key order
  var_of = dict(zip(names, jaxpr.outvars))
  made = {v: i for i, e in enumerate(jaxpr.eqns) for v in e.outvars}
  order = sorted((n for n in names if var_of[n] in made), key=lambda n: made[var_of[n]])

  def probed(x, eps):
    env = dict(zip(jaxpr.constvars, closed.consts))
    env[jaxpr.invars[0]] = x
    read = lambda v: v.val if isinstance(v, xcore.Literal) else env[v]
    added = {var_of[n]: e for n, e in eps.items()}
    for eqn in jaxpr.eqns:
      with eqn.ctx.manager:
        ans = eqn.primitive.bind(*map(read, eqn.invars),
                                 **eqn.primitive.get_bind_params(eqn.params))
      for v, val in zip(eqn.outvars, ans if eqn.primitive.multiple_results else [ans]):
        env[v] = val + added[v] if v in added else val
    return {n: read(var_of[n]) for n in names}
  return probed, order, shapes
