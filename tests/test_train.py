"""Training: clipping, schedules, data parallelism, exact resume, evaluation, errors."""
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from zfnet_jax import configs, rundir
from zfnet_jax.data import iterators, sources
from zfnet_jax.nn import models
from zfnet_jax.training import checkpoints, loop, train_state, weights
from zfnet_jax.training import steps as steps_lib

import helpers
from helpers import make_fmnist, saved_state, small_config


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("fm")
  make_fmnist(d, n_train=64, n_test=23)
  sources._fashion_mnist.cache_clear()
  return str(d)


def params_of(workdir):
  return jax.tree.map(np.asarray, weights.load_trained(workdir)[1]["params"])


def test_clip_conv_filters_matches_numpy():
  rng = np.random.default_rng(0)
  params = {"conv1": {"kernel": rng.normal(0, 0.3, (3, 3, 2, 5)).astype(np.float32),
                      "bias": np.ones(5, np.float32)},
            "fc6": {"kernel": rng.normal(0, 1, (4, 3)).astype(np.float32)}}
  params["conv1"]["kernel"][..., 0] *= 0.01  # one filter inside the radius
  out = train_state.clip_conv_filters(params, 0.1)
  ref = params["conv1"]["kernel"].copy()
  for o in range(ref.shape[-1]):
    rms = np.sqrt(np.mean(ref[..., o].astype(np.float64) ** 2))
    if rms > 0.1:
      ref[..., o] *= 0.1 / rms
  np.testing.assert_allclose(out["conv1"]["kernel"], ref, rtol=1e-6)
  np.testing.assert_array_equal(out["conv1"]["kernel"][..., 0], params["conv1"]["kernel"][..., 0])
  np.testing.assert_array_equal(out["conv1"]["bias"], params["conv1"]["bias"])
  np.testing.assert_array_equal(out["fc6"]["kernel"], params["fc6"]["kernel"])


def test_reduce_on_plateau_lowers_rate_when_it_should():
  vals = {"lr_scale": 1.0, "best_error": np.inf, "bad_evals": 0}
  scales = []
  for err in (0.5, 0.4, 0.41, 0.40, 0.39, 0.395, 0.42, 0.45, 0.44):
    vals = train_state.plateau_update(vals, err, patience=2, factor=0.1)
    scales.append(vals["lr_scale"])
  # improvements at 0.5, 0.4, 0.39; two bad evals after 0.4 (0.41, 0.40) -> x0.1;
  # after 0.39: 0.395, 0.42 -> x0.1; then 0.45, 0.44 -> x0.1.
  np.testing.assert_allclose(scales, [1, 1, 1, .1, .1, .1, .01, .01, .001])


def test_reduce_on_plateau_with_the_values_the_state_keeps():
  """As training calls it: float32/int32 values fetched from the device (read-only 0-d
  arrays), and a float64 error that float32 rounds up (21/23): an unchanged error is
  no improvement."""
  def as_kept(v):
    return jax.device_get({"lr_scale": jnp.float32(v["lr_scale"]),
                           "best_error": jnp.float32(v["best_error"]),
                           "bad_evals": jnp.int32(v["bad_evals"])})
  vals = as_kept({"lr_scale": 1.0, "best_error": np.inf, "bad_evals": 0})
  scales = []
  for _ in range(5):
    vals = as_kept(train_state.plateau_update(vals, 21 / 23, patience=2, factor=0.1))
    scales.append(float(vals["lr_scale"]))
  np.testing.assert_allclose(scales, [1, 1, .1, .1, .01], rtol=1e-6)


def test_step_schedule():
  c = configs.default_config()
  c.schedule, c.step_epochs, c.learning_rate = "step", (2, 3), 0.5
  fn = train_state.learning_rate_fn(c, steps_per_epoch=10, total_steps=40)
  np.testing.assert_allclose([fn(s) for s in (0, 19, 20, 29, 30, 39)],
                             [.5, .5, .05, .05, .005, .005], rtol=1e-6)
  c.schedule = "cosine"
  fn = train_state.learning_rate_fn(c, 10, 40)
  np.testing.assert_allclose([fn(0), fn(20), fn(40)], [.5, .25, 0.], atol=1e-6)


@pytest.mark.slow
def test_one_device_equals_four_devices(fmnist_dir, tmp_path):
  assert len(jax.devices()) == 4
  c = small_config(fmnist_dir)
  c.learning_rate = 1e-2
  loop.train_and_evaluate(c, str(tmp_path / "one"), devices=jax.devices()[:1])
  loop.train_and_evaluate(c, str(tmp_path / "four"))
  one, four = params_of(str(tmp_path / "one")), params_of(str(tmp_path / "four"))
  init = models.from_config(c.model, 10).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)))
  moved = jax.tree.map(lambda a, b: np.abs(a - np.asarray(b)).max(), one, init["params"])
  assert max(jax.tree.leaves(moved)) > 1e-4   # it trained
  # Float32 sums in another order: equal up to rounding at the parameters' scale (~0.05).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), one, four)


@pytest.mark.slow
def test_resume_is_exact_and_outputs(fmnist_dir, tmp_path):
  c = small_config(fmnist_dir, steps=6)
  c.model.dropout_rate = 0.5      # the dropout key must be restored too
  c.checkpoint_every_steps = 3
  c.learning_rate = 1e-2
  full = str(tmp_path / "full")
  res = loop.train_and_evaluate(c, full)
  part = str(tmp_path / "part")
  c3 = small_config(fmnist_dir, steps=3)
  c3.model.dropout_rate, c3.learning_rate = 0.5, 1e-2
  loop.train_and_evaluate(c3, part)
  res2 = loop.train_and_evaluate(c, part)   # resumes from step 3
  jax.tree.map(np.testing.assert_array_equal, params_of(full), params_of(part))
  assert res["steps"] == res2["steps"] == 6
  # Outputs.
  for key in ("top1_error", "top5_error", "top1_error_10crop", "top5_error_10crop",
              "num_eval_examples", "train_seconds", "steps"):
    assert key in json.load(open(os.path.join(full, "results.json")))
  assert res["num_eval_examples"] == 23
  rows = [json.loads(l) for l in open(os.path.join(full, "metrics.jsonl"))]
  assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
  assert {"loss", "top1_error", "top5_error", "learning_rate", "epoch"} <= set(rows[0])
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(full))
  assert json.load(open(os.path.join(full, "config.json")))["batch_size"] == 8


def test_eval_matches_per_example_reference(fmnist_dir, tmp_path):
  c = small_config(fmnist_dir, steps=2)
  c.eval_batch_size = 12        # 23 examples: batches of 12 and 11 (+1 padding)
  c.ten_crop_eval = True
  wd = str(tmp_path / "wd")
  res = loop.train_and_evaluate(c, wd)
  assert res["num_eval_examples"] == 23
  model, variables, _ = weights.load_trained(wd)
  images, labels = sources._fashion_mnist(fmnist_dir, "test")
  mean = iterators.full_pixel_mean(c, wd)
  wrong1 = wrong1_10 = 0
  for x, y in zip(images.astype(np.float32), labels):
    full = np.asarray(jax.image.resize(x, (36, 36, 1), "linear")) - mean
    crops = [full[t:t + 32, l:l + 32] for t, l in ((0, 0), (0, 4), (4, 0), (4, 4), (2, 2))]
    crops += [cr[:, ::-1] for cr in crops]
    logits = np.asarray(model.apply(variables, np.stack(crops)))
    wrong1 += int(np.argmax(logits[4]) != y)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    wrong1_10 += int(np.argmax(probs.mean(0)) != y)
  assert res["top1_error"] == pytest.approx(wrong1 / 23)
  assert res["top1_error_10crop"] == pytest.approx(wrong1_10 / 23)


def test_nan_guard_names_the_step(fmnist_dir, tmp_path):
  c = small_config(fmnist_dir, steps=5)
  c.learning_rate = 1e12
  c.clip_filters = False
  c.checkpoint_every_steps = 1
  with pytest.raises(FloatingPointError, match=r"at step \d"):
    loop.train_and_evaluate(c, str(tmp_path / "nan"))
  for step in checkpoints.manager(str(tmp_path / "nan" / "checkpoints"), 1,
                                        read_only=True).all_steps():
    p = weights.load_trained(str(tmp_path / "nan"), step)[1]["params"]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(p))


def test_bad_batch_and_restore_path_are_errors(fmnist_dir, tmp_path):
  c = small_config(fmnist_dir, batch=6)
  with pytest.raises(ValueError, match="batch_size=6"):
    loop.train_and_evaluate(c, str(tmp_path / "a"))
  c = small_config(fmnist_dir)
  c.restore_path = str(tmp_path / "does_not_exist")
  with pytest.raises(FileNotFoundError, match="does_not_exist"):
    loop.train_and_evaluate(c, str(tmp_path / "b"))


def test_plateau_without_evaluation_during_training_is_a_config_error(fmnist_dir, tmp_path):
  # 64 training images in batches of 8: 8 steps per epoch.
  c = small_config(fmnist_dir, steps=4)
  c.schedule = "plateau"
  with pytest.raises(ValueError, match=r"eval_every_epochs=0\.0 and num_train_steps=4 never "
                                       r"evaluates.*allowed: 0 < eval_every_epochs"):
    loop.train_and_evaluate(c, str(tmp_path / "wd"))
  assert not os.path.exists(tmp_path / "wd")          # raised before any work
  c.eval_every_epochs = 0.5                  # every 4 steps: the last one, never evaluated
  with pytest.raises(ValueError, match="eval_every_epochs=0.5 and num_train_steps=4"):
    loop.validate(c, 4)
  c.num_train_steps = 5                      # an evaluation after step 4
  loop.validate(c, 4)
  c = configs.default_config()               # epochs: needs no dataset
  c.eval_every_epochs = c.num_epochs
  with pytest.raises(ValueError, match="eval_every_epochs=70.0 and num_epochs=70.0"):
    loop.validate(c, 4)
  c.eval_every_epochs = 69.0
  loop.validate(c, 4)


@pytest.mark.slow
def test_plateau_drops_rate_after_patience_and_survives_resume(fmnist_dir, tmp_path):
  """A rate too small to move a float32 weight: the validation error cannot improve, so
  after the first evaluation every one is bad and the rate drops x factor every
  ``patience`` evaluations.  The run stops after step 9 and resumes (a second process would
  do the same): the rows, from both, must follow the definition for one uninterrupted run."""
  steps, base, patience, factor = 13, 1e-20, 2, 0.1
  every = 2                                  # 0.25 epochs of 8 steps
  c = small_config(fmnist_dir, steps=steps)
  c.schedule, c.learning_rate = "plateau", base
  c.eval_every_epochs, c.plateau_patience, c.plateau_factor = 0.25, patience, factor
  # By the definition: evaluations after steps 2, 4, ..., 12; the 1st improves on +inf,
  # then every `patience`-th bad one (the 3rd, the 5th) lowers the rate of the next steps.
  evals = list(range(every, steps, every))
  drops = [s for i, s in enumerate(evals) if i > 0 and i % patience == 0]
  assert drops == [6, 10]
  expected = [base * factor ** sum(d < t for d in drops) for t in range(1, steps + 1)]
  one, wd = jax.devices()[:1], str(tmp_path / "wd")
  c9 = c.copy_and_resolve_references()
  c9.num_train_steps = 9                     # after the 4th evaluation: one bad one pending
  loop.train_and_evaluate(c9, wd, devices=one)
  res = loop.train_and_evaluate(c, wd, devices=one)   # resumes from step 9
  rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
  (error,) = {r["top1_error"] for r in rows if r["split"] == "eval"}   # it never improved
  train_rows = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train_rows] == list(range(1, steps + 1))
  np.testing.assert_allclose([r["learning_rate"] for r in train_rows], expected, rtol=1e-6)
  # The bookkeeping saved at step 9 and at the end, as the definition has it: after the
  # drop at 6 one bad evaluation (8), after the drop at 10 one (12).
  for step, scale in ((9, factor), (steps, factor ** 2)):
    saved = saved_state(os.path.join(wd, "checkpoints", str(step)))
    assert float(saved["lr_scale"]) == pytest.approx(scale, rel=1e-6), step
    assert float(saved["best_error"]) == pytest.approx(error, rel=1e-6), step
    assert int(saved["bad_evals"]) == 1, step
  assert res["lr_scale"] == pytest.approx(factor ** 2, rel=1e-6)


@pytest.mark.slow  # trains (or uses the session's tiny trained run)
def test_tiny_workdir_fixture(tiny_workdir):
  assert rundir.evolution_checkpoints(tiny_workdir) == [(1.0, 16), (2.0, 32), (3.0, 48)]
  model, variables, config = weights.load_trained(tiny_workdir)
  assert isinstance(model, models.ZFNetLowRes) and config.report.enabled is False
  early = weights.load_trained(tiny_workdir, step=16)[1]
  assert not np.allclose(early["params"]["conv1"]["kernel"], variables["params"]["conv1"]["kernel"])
  assert iterators.pixel_mean(config, tiny_workdir).shape == (64, 64, 1)


@pytest.mark.slow
def test_mock_imagenet_full_zfnet_train_and_eval_step(tmp_path):
  import tensorflow_datasets as tfds
  c = configs.default_config()
  c.model.name = "ZFNet"
  c.dataset.name = "imagenet2012"
  c.dataset.data_dir = str(tmp_path / "tfds")
  c.dataset.max_eval_examples = 5
  c.dataset.prefetch = 0
  c.dataset.shuffle_buffer = 8
  c.batch_size = 4
  c.num_train_steps = 1
  c.eval_batch_size = 4
  c.eval_every_epochs = 0.0
  c.schedule = "constant"        # plateau would need evaluations during the run
  c.ten_crop_eval = False
  c.evolution_epochs = ()
  c.report.enabled = False
  with tfds.testing.mock_data(num_examples=8):
    res = loop.train_and_evaluate(c, str(tmp_path / "wd"))
  assert res["steps"] == 1 and res["num_eval_examples"] == 5
  assert np.isfinite(res["loss"])
  p = params_of(str(tmp_path / "wd"))
  assert p["conv1"]["kernel"].shape == (7, 7, 3, 96) and p["fc8"]["kernel"].shape == (4096, 1000)


def test_a_stuck_step_is_said_once_naming_it(tmp_path, monkeypatch, capsys):
  """No step finishing for stall_warning_seconds: one warning line naming the step
  waited on and the last one finished; the run then goes on to the end."""
  d = str(tmp_path / "fm")
  helpers.make_fmnist(d, n_train=64, n_test=8)
  sources._fashion_mnist.cache_clear()  # pylint: disable=protected-access
  config = helpers.small_config(d, steps=6)
  config.stall_warning_seconds = 0.5
  real = loop.build_train_step

  def blocking(run):
    step, calls = real(run), []

    def stuck_at_4(state, batch):
      calls.append(1)
      if len(calls) == 4:
        time.sleep(3.0)       # step 4 blocks: nothing finishes for 3 s
      return step(state, batch)
    return stuck_at_4
  monkeypatch.setattr(loop, "build_train_step", blocking)
  res = loop.train_and_evaluate(config, str(tmp_path / "wd"), devices=jax.devices()[:1])
  err = capsys.readouterr().err
  lines = [l for l in err.splitlines() if "has not finished" in l]
  assert len(lines) == 1, err[-2000:]
  assert re.match(r"warning: training: step 4 has not finished after \d+ s \(the last "
                  r"finished step is 3\)", lines[0]), lines
  assert res["steps"] == 6


def test_default_cpu_train_step_has_no_collective(tmp_path):
  """On one device (the default) the compiled train step holds no all-reduce or other
  cross-device collective: nothing in it can wait for another device."""
  d = str(tmp_path / "fm")
  helpers.make_fmnist(d, n_train=64, n_test=8)
  sources._fashion_mnist.cache_clear()  # pylint: disable=protected-access
  config = helpers.small_config(d)
  texts = {}
  for n in (1, 2):
    run = loop.prepare_run(config, str(tmp_path / f"wd{n}"), np.array(jax.devices()[:n]))
    state = loop.restore_or_initialise(
        run, checkpoints.manager(str(tmp_path / f"ck{n}"), 1))[0]
    batch = next(iterators.create_train_iterator(config, run.workdir, 0))
    sharded = steps_lib._global(batch, NamedSharding(run.mesh, P(steps_lib.AXIS)))  # pylint: disable=protected-access
    texts[n] = loop.build_train_step(run).lower(state, sharded).compile().as_text()
  collective = re.compile(r"all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all")
  assert collective.search(texts[2])       # the split step does reduce across devices
  assert not collective.search(texts[1])


@pytest.mark.parametrize("form", ["paper", "pytorch"])
def test_momentum_forms_follow_their_formulas_on_a_quadratic(form):
  """f(w) = sum(a w^2) / 2 on a 2x2 kernel (decayed), rate 0.1 for 5 steps then x0.1.
  cuda-convnet (both papers): v <- 0.9 v - lr (g + wd w), w <- w + v; PyTorch's form:
  v <- 0.9 v + g + wd w, w <- w - lr v."""
  a, wd, mu = np.array([[1.0, 2.0], [0.5, 3.0]]), 0.01, 0.9
  rates = [0.1] * 5 + [0.01] * 10
  tx = train_state.make_optimizer("sgd", momentum=mu, weight_decay=wd, momentum_form=form)
  w = {"kernel": jnp.ones((2, 2), jnp.float32)}
  state = tx.init(w)
  got = []
  for lr in rates:
    w, state = train_state.step_update(tx, {"kernel": jnp.asarray(a, jnp.float32) * w["kernel"]},
                                       state, w, jnp.float32(lr))
    got.append(np.asarray(w["kernel"], np.float64))
  want, ref_w, v = {}, np.ones((2, 2)), np.zeros((2, 2))
  for name in ("paper", "pytorch"):
    ref_w, v, want[name] = np.ones((2, 2)), np.zeros((2, 2)), []
    for lr in rates:
      g = a * ref_w + wd * ref_w
      if name == "paper":
        v = mu * v - lr * g
        ref_w = ref_w + v
      else:
        v = mu * v + g
        ref_w = ref_w - lr * v
      want[name].append(ref_w)
  np.testing.assert_allclose(got, want[form], rtol=1e-5, atol=1e-6)
  # The same at a constant rate; after the drop the paper's keeps more of its velocity.
  np.testing.assert_allclose(want["paper"][:5], want["pytorch"][:5], rtol=1e-12)
  assert np.abs(np.array(want["paper"][5]) - want["pytorch"][5]).max() > 1e-3
