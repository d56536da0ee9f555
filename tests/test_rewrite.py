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

from zfnet_jax.deconv import rewrite
from zfnet_jax.nn import rules

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
  ref = {rule: reference_vjp(p, x, ct, rule) for rule in tuple(rules.RULES)}
  # backprop: the reference is the gradient.
  plain = network(p)
  np.testing.assert_allclose(ref["backprop"], jax.vjp(plain, x)[1](ct)[0], rtol=1e-5, atol=1e-6)
  # Negative signals meet positive activations (deconvnet != backprop) and positive signals
  # meet negative activations (deconvnet != guided), so the rules are told apart.
  scale = float(jnp.abs(ref["backprop"]).max())
  assert float(jnp.abs(ref["deconvnet"] - ref["backprop"]).max()) > 0.1 * scale
  assert float(jnp.abs(ref["deconvnet"] - ref["guided"]).max()) > 0.1 * scale


@pytest.mark.parametrize("rule", tuple(rules.RULES))
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
  for rule in tuple(rules.RULES):
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
    for rule in tuple(rules.RULES):
      g = jax.grad(lambda a: jnp.sum(rewrite.deconvnet_transform(f, rule)(a)))(x)
      np.testing.assert_array_equal(g, jnp.full(5, want))


# ----------------------------------------------------------------------------
# Every spelling of a ReLU, a clamp or a max-pool is rewritten or refused, never
# left with its plain gradient (issue 19, item 3).
# ----------------------------------------------------------------------------

def relu_rule_np(r, x, rule):
  """The ReLU step of each rule, in NumPy (x: the ReLU's input)."""
  return {"backprop": r * (x > 0), "deconvnet": np.maximum(r, 0),
          "guided": r * (x > 0) * (r > 0)}[rule]


RELU_SPELLINGS = {
    "jnp.where(x >= 0, x, 0)": lambda a: jnp.where(a >= 0, a, 0),
    "jnp.where(x < 0, 0, x)": lambda a: jnp.where(a < 0, 0, a),
    "jnp.where(0 > x, 0.0, x)": lambda a: jnp.where(0 > a, 0.0, a),
    "jnp.where(~(x <= 0), x, 0)": lambda a: jnp.where(~(a <= 0), a, 0),
    "jnp.where(x > 0, x, 0) under jit": jax.jit(lambda a: jnp.where(a > 0, a, 0)),
    "x * (x > 0)": lambda a: a * (a > 0),
    "(x >= 0) * x": lambda a: (a >= 0) * a,
    "x * (x > 0).astype(x.dtype)": lambda a: a * (a > 0).astype(a.dtype),
    "jnp.clip(x, 0)": lambda a: jnp.clip(a, 0),
    "jnp.clip(x, 0, None)": lambda a: jnp.clip(a, 0, None),
    "lax.max(x, 0.0)": lambda a: jax.lax.max(a, 0.0),
    "jnp.where(jit(logical_not)(x <= 0), x, 0)":     # a sign test negated inside a wrapper
        lambda a: jnp.where(jax.jit(jnp.logical_not)(a <= 0), a, 0.0),
    "jnp.maximum(x, Z), Z a captured array of zeros": lambda a: jnp.maximum(a, ZEROS),
    "x * (x > 0).astype(int32).astype(x.dtype)":     # an indicator converted twice
        lambda a: a * (a > 0).astype(jnp.int32).astype(a.dtype),
}
ZEROS = np.zeros((4, 5, 5, 3), np.float32)         # sign_data's shape
CLAMP_SPELLINGS = {
    "jnp.clip(x, 0, 6)": lambda a: jnp.clip(a, 0, 6),
    "jnp.minimum(jnp.maximum(x, 0), 6)": lambda a: jnp.minimum(jnp.maximum(a, 0), 6),
    "jnp.maximum(jnp.minimum(x, 6), 0)": lambda a: jnp.maximum(jnp.minimum(a, 6), 0),
    "jax.nn.relu6": jax.nn.relu6,
}


def sign_data():
  """x with negatives, zeros, values above 6 (never exactly 6), and a cotangent of both signs."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(4, 5, 5, 3)).astype(np.float32) * 4
  x[0, 0, :3, 0] = 0.0
  x[x == 6.0] = 6.5
  r = rng.normal(size=x.shape).astype(np.float32)
  return x, r


@pytest.mark.parametrize("name", list(RELU_SPELLINGS) + list(CLAMP_SPELLINGS))
def test_every_relu_and_clamp_spelling_takes_the_rule(name):
  """ReLU: the rule's step.  Clamp min(max(x, 0), 6): the rule's ReLU step, then the
  upper bound's own gradient (the signal stops where x >= 6), as documented."""
  fn = {**RELU_SPELLINGS, **CLAMP_SPELLINGS}[name]
  x, r = sign_data()
  clamp = name in CLAMP_SPELLINGS
  forward = np.minimum(np.maximum(x, 0), 6) if clamp else np.maximum(x, 0)
  results = {}
  for rule in tuple(rules.RULES):
    y, vjp = jax.vjp(rewrite.deconvnet_transform(fn, rule), jnp.asarray(x))
    np.testing.assert_array_equal(y, forward, err_msg=name)
    want = relu_rule_np(r, x, rule) * ((x < 6) if clamp else 1)
    results[rule] = got = np.asarray(vjp(jnp.asarray(r))[0])
    np.testing.assert_allclose(got, want, rtol=0, atol=0, err_msg=f"{name} {rule}")
  assert np.abs(results["deconvnet"] - results["backprop"]).max() > 0.1   # the rule matters
  _, vjp = jax.vjp(rewrite.deconvnet_transform(fn), jnp.asarray(x))       # default: deconvnet
  np.testing.assert_array_equal(vjp(jnp.asarray(r))[0], results["deconvnet"])


def np_reshape_max_pool(h, r, k):
  """k x k / k max-pool of h (N, H, W, C) and its switch unpooling of r, by loops:
  each window's signal goes to its first maximum in row-major order."""
  n, hh, ww, c = h.shape
  out = np.zeros((n, hh // k, ww // k, c), h.dtype)
  down = np.zeros_like(h)
  for b in range(n):
    for i in range(hh // k):
      for j in range(ww // k):
        for ch in range(c):
          win = h[b, i * k:(i + 1) * k, j * k:(j + 1) * k, ch]
          out[b, i, j, ch] = win.max()
          di, dj = divmod(int(np.argmax(win)), k)
          down[b, i * k + di, j * k + dj, ch] += r[b, i, j, ch]
  return out, down


@pytest.mark.parametrize("rule", tuple(rules.RULES))
def test_max_pool_as_reshape_and_max_unpools_through_switches(rule):
  """relu -> 2x2/2 max-pool written as reshape + max (reduce_max): every rule unpools
  through the switch (first maximum), also where ReLU zeros tie in a window; the
  plain gradient would split the signal among ties."""
  x, _ = sign_data()
  x = x[:, :4, :4]
  x[1, :2, :2, :] = -1.0   # whole windows of zeros after the ReLU: ties
  r = np.random.default_rng(4).normal(size=(4, 2, 2, 3)).astype(np.float32)

  def pool2(h):
    n, hh, ww, c = h.shape
    return h.reshape(n, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))

  fn = lambda a: pool2(jnp.maximum(a, 0))

  h = np.maximum(x, 0)
  pooled, unpooled = np_reshape_max_pool(h, r, 2)
  y, vjp = jax.vjp(rewrite.deconvnet_transform(fn, rule), jnp.asarray(x))
  np.testing.assert_array_equal(y, pooled)
  want = relu_rule_np(unpooled, x, rule)
  np.testing.assert_allclose(vjp(jnp.asarray(r))[0], want, rtol=1e-6, atol=1e-7)
  # Ties: the plain max's VJP splits the signal among them, the switch does not.
  plain = jax.vjp(pool2, jnp.asarray(h))[1](jnp.asarray(r))[0]
  assert np.abs(np.asarray(plain) - unpooled).max() > 0.01


def test_global_and_channel_max_take_the_switch():
  """reduce_max over (H, W) (global max-pool) and over channels (maxout): the first
  maximum in row-major order over the reduced axes takes the whole signal."""
  x = np.zeros((2, 3, 3, 4), np.float32)
  x[0, 1, 2, 0] = x[0, 2, 0, 0] = 5.0      # a tie: (1, 2) comes first
  x[1, :, :, 1] = 2.0                      # all tied: (0, 0) comes first
  r = np.array([[1.5, -2.0, 3.0, 0.5], [4.0, 1.0, -1.0, 2.0]], np.float32)
  _, vjp = jax.vjp(rewrite.deconvnet_transform(lambda a: a.max(axis=(1, 2)), "deconvnet"),
                   jnp.asarray(x))
  got = np.asarray(vjp(jnp.asarray(r))[0])
  want = np.zeros_like(x)
  for b in range(2):
    for c in range(4):
      i, j = divmod(int(np.argmax(x[b, :, :, c])), 3)
      want[b, i, j, c] = r[b, c]
  np.testing.assert_array_equal(got, want)
  assert got[0, 1, 2, 0] == 1.5 and got[0, 2, 0, 0] == 0.0
  r2 = np.ones((2, 3, 3), np.float32)
  _, vjp = jax.vjp(rewrite.deconvnet_transform(lambda a: jnp.max(a, axis=-1), "guided"),
                   jnp.asarray(x))
  got = np.asarray(vjp(jnp.asarray(r2))[0])
  want = np.zeros_like(x)
  for idx in np.ndindex(2, 3, 3):
    want[idx + (int(np.argmax(x[idx])),)] = 1.0
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name,fn,match", [
    ("leaky relu", jax.nn.leaky_relu, "select on the sign of x .* not a ReLU"),
    ("jnp.where(x >= 0, x, 0.1 * x)", lambda a: jnp.where(a >= 0, a, 0.1 * a),
     "select on the sign of x .* not a ReLU"),
    ("elu", jax.nn.elu, "select on the sign of x .* not a ReLU"),
    ("jnp.where(x > 0, 0, x)", lambda a: jnp.where(a > 0, 0.0, a),
     "select on the sign of x .* not a ReLU"),
    ("x * (x < 0)", lambda a: a * (a < 0), r"x \* \(x < 0\), the negative part"),
    ("x - jnp.minimum(x, 0)", lambda a: a - jnp.minimum(a, 0), r"min\(x, 0\), the negative part"),
])
def test_sign_functions_that_are_no_relu_are_refused(name, fn, match):
  x, _ = sign_data()
  with pytest.raises(rewrite.UnsupportedConstructError, match=match):
    rewrite.deconvnet_transform(fn, "deconvnet")(jnp.asarray(x))


def test_masks_and_stabilised_softmax_keep_their_gradients():
  """A sign test of one array gating another (a mask), and the stop-gradient max
  of softmax/logsumexp, are no ReLU and no max-pool: plain gradients."""
  x, _ = sign_data()
  m = jnp.asarray(x[::-1].copy())
  fns = (lambda a: jnp.where(m > 0, a, 0.0), lambda a: a * (m > 0),
         lambda a: jax.nn.softmax(a, axis=-1), lambda a: jax.nn.logsumexp(a, axis=(1, 2)))
  for fn in fns:
    g = jax.grad(lambda a: jnp.sum(jnp.sin(rewrite.deconvnet_transform(fn, "deconvnet")(a))))
    want = jax.grad(lambda a: jnp.sum(jnp.sin(fn(a))))
    np.testing.assert_allclose(g(jnp.asarray(x)), want(jnp.asarray(x)), rtol=1e-6, atol=1e-7)


def test_with_probes_adds_each_probe_where_the_layer_is_read():
  """a = x W1, b = relu(a) W2, c = relu(b): ``probed(x, eps)`` computes them with eps added
  to a and b (in what is read on and returned), in the forward order a, b, c; the
  probes' cotangents are the signals arriving at a and b."""
  rng = np.random.default_rng(0)
  w1, w2 = rng.normal(size=(3, 4)), rng.normal(size=(4, 2))
  x, ea, eb = rng.normal(size=(5, 3)), rng.normal(size=(5, 4)), rng.normal(size=(5, 2))

  def fn(z):
    a = z @ w1
    b = relu(a) @ w2
    return {"c": relu(b), "a": a, "b": b}
  probed, order, shapes = rewrite.with_probes(fn, x)
  assert order == ["a", "b", "c"]
  assert {n: s.shape for n, s in shapes.items()} == {"a": (5, 4), "b": (5, 2), "c": (5, 2)}
  got = probed(x, {"a": ea, "b": eb})
  a = x @ w1
  b = np.maximum(a + ea, 0) @ w2
  np.testing.assert_allclose(got["a"], a + ea, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got["b"], b + eb, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got["c"], np.maximum(b + eb, 0), rtol=1e-5, atol=1e-5)
  zeros = {"a": np.zeros((5, 4)), "b": np.zeros((5, 2))}
  _, vjp = jax.vjp(lambda e: probed(x, e)["c"], zeros)
  r = rng.normal(size=(5, 2))
  down = vjp(r)[0]
  at_b = r * (np.maximum(a, 0) @ w2 > 0)                       # through c's ReLU
  np.testing.assert_allclose(down["b"], at_b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(down["a"], (at_b @ w2.T) * (a > 0), rtol=1e-5, atol=1e-5)


def test_a_custom_jvp_without_source_info_has_no_name():
  from types import SimpleNamespace  # pylint: disable=import-outside-toplevel
  eqn = SimpleNamespace(params={"call_jaxpr": SimpleNamespace(debug_info=None)})
  assert rewrite._jvp_name(eqn) is None   # pylint: disable=protected-access

