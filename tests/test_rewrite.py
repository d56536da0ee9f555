"""The any-CNN rewriter inside jit/pjit, custom_vjp, custom_jvp and checkpoint/remat.

One small CNN, conv -> ReLU -> conv -> ReLU -> max-pool -> dense, whose ReLU and
ReLU+max-pool stages sit inside a wrapper, against the same network written
plainly and against a layer-by-layer reference built from plain ``jax.vjp``s of
each layer with the rule's ReLU step written out.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pjit

from zfnet_jax import layers, rewrite

WINDOW, STRIDE, PAD = (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (0, 1), (0, 1), (0, 0))


def relu(a):
  return jnp.maximum(a, 0.0)


def pool(a):  # 3x3/2, ceil mode: 10 -> 5
  return jax.lax.reduce_window(a, -jnp.inf, jax.lax.max, WINDOW, STRIDE, PAD)


def conv(a, q):
  return jax.lax.conv_general_dilated(a, q["kernel"], (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC")) + q["bias"]


def dense(a, q):
  return a.reshape(a.shape[0], -1) @ q["kernel"] + q["bias"]


def setup():
  """(params, images (2, 10, 10, 2), cotangent of the (2, 3) output).

  conv2's bias +2 keeps a positive value in every pooling window, so no window
  holds a tie (checked in the test) and JAX's own max-pool VJP is switch unpooling.
  """
  rng = np.random.default_rng(0)
  he = lambda *s: (rng.normal(size=s) * np.sqrt(2.0 / np.prod(s[:-1]))).astype(np.float32)
  p = {"c1": {"kernel": he(3, 3, 2, 4), "bias": np.full(4, 0.1, np.float32)},
       "c2": {"kernel": he(3, 3, 4, 5), "bias": np.full(5, 2.0, np.float32)},
       "d": {"kernel": he(5 * 5 * 5, 3), "bias": np.full(3, 0.1, np.float32)}}
  x = rng.normal(size=(2, 10, 10, 2)).astype(np.float32)
  ct = rng.normal(size=(2, 3)).astype(np.float32)
  return jax.tree.map(jnp.asarray, p), jnp.asarray(x), jnp.asarray(ct)


def network(p, act=relu, wrap=lambda f: f):
  """x -> dense(stage(act(conv1(x)))), stage = wrap(pool . act . conv2).

  ``act``: the ReLU; the stage closes over conv2's parameters (constants of the
  inner jaxpr when ``wrap`` makes one).  Defaults: the network written plainly.
  """
  stage = wrap(lambda a: pool(act(conv(a, p["c2"]))))
  return lambda x: dense(stage(act(conv(x, p["c1"]))), p["d"])


def relu_down(r, x, rule):
  """The ReLU step of each rule, from its definition (x: the ReLU's input)."""
  return {"backprop": r * (x > 0), "deconvnet": jnp.maximum(r, 0.0),
          "guided": r * (x > 0) * (r > 0)}[rule]


def reference_vjp(p, x, ct, rule):
  """Layer by layer: plain jax.vjp of conv, pool and dense; the rule at each ReLU."""
  a1 = conv(x, p["c1"])
  h1 = relu(a1)
  a2 = conv(h1, p["c2"])
  h2 = relu(a2)
  y = pool(h2)
  r = jax.vjp(lambda v: dense(v, p["d"]), y)[1](ct)[0]
  r = jax.vjp(pool, h2)[1](r)[0]
  r = relu_down(r, a2, rule)
  r = jax.vjp(lambda v: conv(v, p["c2"]), h1)[1](r)[0]
  r = relu_down(r, a1, rule)
  return jax.vjp(lambda v: conv(v, p["c1"]), x)[1](r)[0]


def transformed_vjp(fn, x, ct, rule):
  out, vjp = jax.vjp(rewrite.deconvnet_transform(fn, rule), x)
  return out, vjp(ct)[0]


def with_zero_vjp(f):
  """f as a jax.custom_vjp whose own backward rule returns zeros."""
  g = jax.custom_vjp(f)
  g.defvjp(lambda a: (f(a), a), lambda a, r: (jnp.zeros_like(a),))
  return g


@jax.custom_jvp
def clamp(a):
  """A hand-written ReLU with its own derivative, as jax.nn.relu is."""
  return jnp.maximum(a, 0.0)


clamp.defjvp(lambda primals, tangents: (clamp(primals[0]), tangents[0] * (primals[0] > 0)))


@jax.custom_jvp
def leaky(a):
  return jnp.maximum(a, 0.1 * a)


leaky.defjvp(lambda primals, tangents: (leaky(primals[0]),
                                        tangents[0] * jnp.where(primals[0] > 0, 1.0, 0.1)))


def wrapped_networks(p):
  """{case: network} with each ReLU, and the conv2 -> ReLU -> pool stage, inside a wrapper."""
  nothing, some = jax.checkpoint_policies.nothing_saveable, jax.checkpoint_policies.dots_saveable
  cases = {
      "jit": (jax.jit(relu), jax.jit),
      "pjit": (pjit.pjit(relu), pjit.pjit),
      "custom_vjp": (with_zero_vjp(relu), with_zero_vjp),
      "custom_jvp clamp": (clamp, lambda f: f),
      "checkpoint": (jax.checkpoint(relu), jax.checkpoint),
      "remat with policy": (jax.remat(relu, policy=nothing),
                            lambda f: jax.remat(f, policy=some)),
      "nested": (jax.jit(jax.checkpoint(with_zero_vjp(clamp))),
                 lambda f: jax.checkpoint(jax.jit(with_zero_vjp(f)))),
  }
  return {k: network(p, act, wrap) for k, (act, wrap) in cases.items()}


def count_ties(h):
  """Pooling windows of ``h`` (N, H, W, C) whose maximum occurs more than once."""
  h = np.pad(np.asarray(h), ((0, 0), (0, 1), (0, 1), (0, 0)), constant_values=-np.inf)
  n = (h.shape[1] - 3) // 2 + 1
  return sum(int((h[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3] ==
                  h[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(1, 2), keepdims=True)
                  ).sum(axis=(1, 2)).max() > 1) for i in range(n) for j in range(n))


def test_reference_is_not_degenerate():
  p, x, ct = setup()
  h2 = relu(conv(relu(conv(x, p["c1"])), p["c2"]))
  assert count_ties(h2) == 0
  ref = {rule: reference_vjp(p, x, ct, rule) for rule in layers.RULES}
  # backprop: the reference is the gradient.
  plain = network(p)
  np.testing.assert_allclose(ref["backprop"], jax.vjp(plain, x)[1](ct)[0], rtol=1e-5, atol=1e-6)
  # Negative signals meet positive activations (deconvnet != backprop) and positive signals
  # meet negative activations (deconvnet != guided), so the rules are told apart.
  scale = float(jnp.abs(ref["backprop"]).max())
  assert float(jnp.abs(ref["deconvnet"] - ref["backprop"]).max()) > 0.1 * scale
  assert float(jnp.abs(ref["deconvnet"] - ref["guided"]).max()) > 0.1 * scale


@pytest.mark.parametrize("rule", layers.RULES)
def test_plain_network_matches_reference(rule):
  p, x, ct = setup()
  plain = network(p)
  out, got = transformed_vjp(plain, x, ct, rule)
  np.testing.assert_allclose(out, plain(x), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got, reference_vjp(p, x, ct, rule), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["jit", "pjit", "custom_vjp", "custom_jvp clamp", "checkpoint",
                                  "remat with policy", "nested"])
def test_rule_reaches_inside_wrappers(case):
  p, x, ct = setup()
  plain = network(p)
  fn = wrapped_networks(p)[case]
  for rule in layers.RULES:
    out, got = transformed_vjp(fn, x, ct, rule)
    np.testing.assert_allclose(out, plain(x), rtol=1e-6, atol=1e-6, err_msg=rule)
    np.testing.assert_allclose(got, transformed_vjp(plain, x, ct, rule)[1], rtol=1e-6,
                               atol=1e-7, err_msg=rule)
    np.testing.assert_allclose(got, reference_vjp(p, x, ct, rule), rtol=1e-5, atol=1e-6,
                               err_msg=rule)


def test_custom_jvp_mixing_a_max_with_other_ops_is_refused():
  @jax.custom_jvp
  def clamp_pool(a):  # a ReLU and a max-pool under one custom derivative
    return pool(jnp.maximum(a, 0.0))

  clamp_pool.defjvp(lambda primals, tangents: (clamp_pool(primals[0]), pool(tangents[0])))
  x = jnp.ones((1, 6, 6, 2))
  for name, f in (("leaky", leaky), ("clamp_pool", clamp_pool)):
    with pytest.raises(rewrite.UnsupportedConstructError, match=f"custom_jvp function '{name}'"):
      rewrite.deconvnet_transform(lambda a, f=f: jax.jit(f)(a) * 2.0, "deconvnet")(x)


def test_wrappers_without_a_relu_keep_their_own_rules():
  """No ReLU or max-pool inside: nothing is rewritten; custom derivatives stay."""
  @jax.custom_jvp
  def triple_grad(a):
    return 2.0 * a

  triple_grad.defjvp(lambda primals, tangents: (triple_grad(primals[0]), 3.0 * tangents[0]))
  reverse = with_zero_vjp(lambda a: 2.0 * a)
  x = jnp.linspace(-1.0, 1.0, 5)
  for f, want in ((triple_grad, 3.0), (reverse, 0.0), (jax.jit(triple_grad), 3.0),
                  (jax.checkpoint(reverse), 0.0)):
    for rule in layers.RULES:
      g = jax.grad(lambda a: jnp.sum(rewrite.deconvnet_transform(f, rule)(a)))(x)
      np.testing.assert_array_equal(g, jnp.full(5, want))
