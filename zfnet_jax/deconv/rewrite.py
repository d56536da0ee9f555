"""Any CNN: rewrite a function's jaxpr so that its VJP follows a deconvnet rule.

``deconvnet_transform(fn, rule)`` keeps ``fn``'s forward pass and gives its
ReLUs and max-pools the rule versions of ``zfnet_jax.nn.layers`` (rectify,
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

from zfnet_jax.nn import layers, rules


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


class _Facts:
  """What the ReLU patterns need to know about a jaxpr's vars while it is evaluated:
  which hold only zeros, which are a sign test of some x (var -> (x, positive): true
  where x > 0 (or >= 0) if ``positive``, where x < 0 (or <= 0) if not), and which are
  the number 0/1 of such a test (``indicator``)."""

  def __init__(self):
    self.env, self.zeros, self.sign, self.indicator = {}, set(), {}, {}

  def read(self, v):
    return v.val if isinstance(v, xcore.Literal) else self.env[v]

  def is_zero(self, v) -> bool:
    if isinstance(v, xcore.Literal):
      return _is_zero_const(v.val)
    return v in self.zeros

  def of(self, v) -> tuple:
    """(zero, sign, indicator) of ``v``, to carry into or out of an inlined sub-jaxpr."""
    if isinstance(v, xcore.Literal):
      return (self.is_zero(v), None, None)
    return (v in self.zeros, self.sign.get(v), self.indicator.get(v))

  def known(self, v, table) -> bool:
    return not isinstance(v, xcore.Literal) and v in table

  def bind(self, var, value, facts=None):
    self.env[var] = value
    zero, sgn, ind = facts if facts is not None else (_is_zero_const(value), None, None)
    if zero:
      self.zeros.add(var)
    if sgn is not None:
      self.sign[var] = sgn
    if ind is not None:
      self.indicator[var] = ind

  def track(self, eqn, invals):
    """Record the facts about ``eqn``'s output (evaluated as it is)."""
    name = eqn.primitive.name
    v0 = eqn.invars[0] if eqn.invars else None
    out = eqn.outvars[0] if eqn.outvars else None
    if name in _SHAPE_OPS and v0 is not None and self.is_zero(v0):
      self.zeros.add(out)
    elif (name in _COMPARISONS and len(invals) == 2
          and self.is_zero(eqn.invars[0]) != self.is_zero(eqn.invars[1])):
      k = 1 if self.is_zero(eqn.invars[0]) else 0        # the operand that is not zero
      if jnp.issubdtype(jnp.result_type(invals[k]), jnp.floating):
        # x > 0, x >= 0, 0 < x, 0 <= x: true where x is positive.
        self.sign[out] = (invals[k], (name in ("gt", "ge")) == (k == 0))
    elif name == "not" and self.known(v0, self.sign):
      x, positive = self.sign[v0]
      self.sign[out] = (x, not positive)
    elif name == "convert_element_type" and (self.known(v0, self.sign) or
                                             self.known(v0, self.indicator)):
      self.indicator[out] = self.sign[v0] if v0 in self.sign else self.indicator[v0]


def _as_relu(x, eqn, rule):
  """[layers.relu(x, rule)] for a floating x shaped like the output, else None."""
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return None
  if tuple(x.shape) != tuple(eqn.outvars[0].aval.shape):
    raise UnsupportedConstructError(
        f"a ReLU whose zero is larger than its input ({eqn}); broadcast the input first")
  return [layers.relu(x, rule)]


def _refuse(what, eqn):
  raise UnsupportedConstructError(
      f"{what} ({eqn}): deconvnet_transform gives the rule to ReLUs (max(x, 0), "
      f"jnp.where(x > 0, x, 0), x * (x > 0)) and max-pools, and refuses other "
      f"functions of the sign of x rather than let them keep plain gradients")


def _max(eqn, invals, facts, rule):
  """max(x, 0) or max(0, x): a ReLU."""
  if len(eqn.invars) == 2 and any(map(facts.is_zero, eqn.invars)):
    return _as_relu(invals[1] if facts.is_zero(eqn.invars[0]) else invals[0], eqn, rule)
  return None


def _min(eqn, invals, facts, rule):
  """min(x, 0), the negative part of x: refused."""
  del rule
  if (len(eqn.invars) == 2 and any(map(facts.is_zero, eqn.invars))
      and not all(map(facts.is_zero, eqn.invars))
      and jnp.issubdtype(jnp.result_type(*invals), jnp.floating)):
    _refuse("min(x, 0), the negative part of x (e.g. x - jnp.minimum(x, 0), an ELU)", eqn)
  return None


def _select_n(eqn, invals, facts, rule):
  """jnp.where on x's own sign test: a ReLU when it keeps x where x is positive."""
  test = eqn.invars[0] if len(eqn.invars) == 3 else None
  if test is None or isinstance(test, xcore.Literal) or test not in facts.sign:
    return None
  x, positive = facts.sign[test]
  (a, b), (va, vb) = eqn.invars[1:], invals[1:]   # a where the test is false, b where true
  if (positive and facts.is_zero(a) and vb is x) or (not positive and va is x and
                                                     facts.is_zero(b)):
    return _as_relu(x, eqn, rule)
  if va is x or vb is x:
    _refuse("a select on the sign of x that passes x and is not a ReLU (a leaky ReLU, "
            "an ELU, jnp.where(x > 0, 0, x), ...)", eqn)
  return None


def _mul(eqn, invals, facts, rule):
  """x * (x > 0): a ReLU; x * (x < 0): refused."""
  if len(eqn.invars) != 2:
    return None
  for k in (0, 1):
    v, other = eqn.invars[k], invals[1 - k]
    if not facts.known(v, facts.indicator) or facts.indicator[v][0] is not other:
      continue
    if not facts.indicator[v][1]:
      _refuse("x * (x < 0), the negative part of x", eqn)
    return _as_relu(other, eqn, rule)
  return None


def _reduce_max(eqn, invals, facts, rule):
  """A max-pool written as reshape + max: the first maximum takes the signal."""
  del facts, rule
  if jnp.issubdtype(invals[0].dtype, jnp.floating):
    return [layers.reduce_max(invals[0], tuple(int(a) for a in eqn.params["axes"]))]
  return None


def _reduce_window_max(eqn, invals, facts, rule):
  """A max-pool: unpooled through its switches."""
  del facts, rule
  p = eqn.params
  if any(d != 1 for d in tuple(p["base_dilation"]) + tuple(p["window_dilation"])):
    raise UnsupportedConstructError(
        f"reduce_window_max with base_dilation={p['base_dilation']} "
        f"window_dilation={p['window_dilation']} (only undilated max-pools are supported)")
  if not jnp.issubdtype(invals[0].dtype, jnp.floating):
    return None
  try:
    return [layers.general_max_pool(invals[0], tuple(p["window_dimensions"]),
                                    tuple(p["window_strides"]),
                                    layers.tuple_padding(p["padding"]))]
  except ValueError as e:
    raise UnsupportedConstructError(f"reduce_window_max: {e}") from None


def _reduce_window(eqn, invals, facts, rule):
  """A max-pool with an init value other than -inf: refused."""
  del invals, facts, rule
  if _is_max_pool_jaxpr(eqn.params["jaxpr"]):
    raise UnsupportedConstructError(
        "reduce_window with a max computation and an init value other than -inf "
        "(e.g. lax.reduce_window(x, 0., lax.max, ...)); use -inf as the init value "
        "(flax.linen.max_pool does)")
  return _unreachable(eqn)


def _custom_jvp_call(eqn, invals, facts, rule):
  """A clamp made of max/min only (jax.nn.relu, relu6) is inlined; one that mixes a
  max with other ops is refused; softplus keeps its own rule."""
  if _jvp_name(eqn) in _NOT_RELU:
    return None  # e.g. softplus's logaddexp(x, 0): a max with zero that is no ReLU
  names = _prims(_sub_jaxpr(eqn.params["call_jaxpr"]))
  if not names <= _CLAMP_PRIMS and names & {"max", "reduce_window_max"}:
    raise UnsupportedConstructError(
        f"custom_jvp function {_jvp_name(eqn)!r} contains a max among other ops; "
        f"deconvnet_transform cannot tell whether it is a ReLU (it rewrites custom_jvp "
        f"functions made of max/min only, e.g. jax.nn.relu, relu6; and keeps "
        f"{', '.join(_NOT_RELU)})")
  return _inline(eqn, invals, facts, rule)


def _inline(eqn, invals, facts, rule):
  """A call (jit, checkpoint, custom_vjp, ...) that may hold a target: evaluated inside,
  with the facts of its arguments."""
  name = eqn.primitive.name
  incoming = any(f[1] is not None or f[2] is not None for f in map(facts.of, eqn.invars))
  if name not in _INLINE or not _has_target(eqn.params[_INLINE[name]], incoming):
    return _unreachable(eqn)
  sub = eqn.params[_INLINE[name]]
  sub_consts = sub.consts if isinstance(sub, xcore.ClosedJaxpr) else ()
  found = []
  out = _eval_with_rule(_sub_jaxpr(sub), sub_consts, invals, rule,
                        [facts.of(v) for v in eqn.invars], found)
  for v, val, f in zip(eqn.outvars, out, found):   # a sign test made inside counts outside
    facts.bind(v, val, f)
  return out


def _unreachable(eqn):
  """A primitive with a ReLU or max-pool inside that cannot be rewritten: refused."""
  name = eqn.primitive.name
  if any(_prims(s) & _UNREACHABLE for s in xcore.jaxprs_in_params(eqn.params)):
    raise UnsupportedConstructError(
        f"primitive {name!r} contains a ReLU or max-pool, and deconvnet_transform "
        f"cannot rewrite inside it (supported: {', '.join(sorted(_INLINE))}); "
        f"move the ReLU/max-pool out of the {name}")
  return None


# primitive name -> handler (eqn, input values, facts, rule) -> outputs, or None to
# evaluate the primitive as it is.
_HANDLERS = {"max": _max, "min": _min, "select_n": _select_n, "mul": _mul,
             "reduce_max": _reduce_max, "reduce_window_max": _reduce_window_max,
             "reduce_window": _reduce_window, "custom_jvp_call": _custom_jvp_call}


def _eval_with_rule(jaxpr, consts, args, rule, in_facts=None, out_facts=None):
  """Evaluate ``jaxpr`` with ReLUs and max-pools replaced by the rule versions.

  ReLU patterns: max(x, 0) / max(0, x) (jax.nn.relu, jnp.maximum, jnp.clip(x, 0)),
  select_n on a sign test of x that keeps x where it is positive and 0 elsewhere
  (jnp.where(x > 0, x, 0), jnp.where(x >= 0, x, 0), jnp.where(x < 0, 0, x),
  jnp.where(~(x < 0), x, 0), ...) and x * (x > 0) (or x >= 0).  A select or product
  on x's own sign test that is no ReLU (leaky ReLU, ELU, x * (x < 0)) and min(x, 0)
  raise ``UnsupportedConstructError``.  Facts about vars (``_Facts``) follow values
  into inlined sub-jaxprs and back out.  ``in_facts``: one (zero, sign, indicator) per
  invar; ``out_facts``, a list, receives those of the outvars.
  """
  facts = _Facts()
  for v, c in zip(jaxpr.constvars, consts):
    facts.bind(v, c)
  for i, (v, a) in enumerate(zip(jaxpr.invars, args)):
    facts.bind(v, a, in_facts[i] if in_facts is not None else (False, None, None))
  for eqn in jaxpr.eqns:
    prim = eqn.primitive
    invals = [facts.read(v) for v in eqn.invars]
    out = _HANDLERS.get(prim.name, _inline)(eqn, invals, facts, rule)
    if out is None:
      with eqn.ctx.manager:
        ans = prim.bind(*invals, **prim.get_bind_params(eqn.params))
      out = ans if prim.multiple_results else [ans]
      facts.track(eqn, invals)
    for v, val in zip(eqn.outvars, out):
      facts.env[v] = val
  if out_facts is not None:
    out_facts.extend(map(facts.of, jaxpr.outvars))
  return [facts.read(v) for v in jaxpr.outvars]


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
  rules.get(rule)

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
