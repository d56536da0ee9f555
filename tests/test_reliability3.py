"""Reliability II (issue 21, items 2, 3, 5, 9, 10): bad flags, a shortened quickstart,
the report's checkpoint fallback, non-finite checkpoints, a changed config on resume,
checkpoint format versions, truncated JPEGs and empty class folders.

Training runs in-process on one CPU device (a tiny ZFNetLowRes on random
Fashion-MNIST-format files, 8 steps); the CLI runs as a subprocess.
"""
import datetime
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from zfnet_jax import console, rundir
from zfnet_jax.data import iterators, sources
from zfnet_jax.nn import models
from zfnet_jax.training import checkpoints, loop, steps, train_state, weights

import helpers

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


def cli(*args, timeout=300):
  """``python -m zfnet_jax.main *args`` -> (exit code, stdout + stderr)."""
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  p = subprocess.run([sys.executable, "-m", "zfnet_jax.main", *args], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=timeout)
  return p.returncode, p.stdout + p.stderr


def error_lines(out):
  return [line for line in out.splitlines() if line.startswith("error:")]


# -- item 9: bad flags ----------------------------------------------------------------

@pytest.mark.parametrize("flags,want", [
    (["--config.nosuchkey=1"], "--config.nosuchkey: unknown config key 'nosuchkey'"),
    (["--config.model.nosuch=1"], "--config.model.nosuch: unknown config key 'nosuch'"),
    (["--config.batch_size=abc"], "--config.batch_size=abc: expected int"),
    (["--config.num_epochs=ten"], "--config.num_epochs=ten: expected float"),
    (["--config.model.conv_features=(4,8,8,8,8)", "--config.model.conv_features=(8,8)"],
     "--config.model.conv_features is given 2 times"),
    (["--config.model.conv_features=(4,8,8,8,8,8,8)"],     # the usual check, in summary too
     "model.conv_features=(4, 8, 8, 8, 8, 8, 8); allowed: 5 positive ints"),
])
def test_bad_flags_exit_2_with_one_line_naming_the_key(flags, want, tmp_path):
  rc, out = cli("--config=experiments/quickstart.py", "--mode=summary", *flags)
  assert rc == 2, out[-3000:]
  assert len(error_lines(out)) == 1 and want in error_lines(out)[0], out[-3000:]
  assert "Traceback" not in out and "FATAL" not in out


def test_missing_config_file_is_named(tmp_path):
  missing = str(tmp_path / "no_such_config.py")
  rc, out = cli(f"--config={missing}", f"--workdir={tmp_path / 'wd'}")
  assert rc == 2, out[-3000:]
  assert error_lines(out) == [f"error: config file {missing!r} does not exist"]
  assert not os.path.exists(tmp_path / "wd")


@pytest.mark.parametrize("num_epochs,kept,dropped", [
    (3.0, (0.25, 0.5, 1, 2), (5, 10)),
    (0.3, (0.25,), (0.5, 1, 2, 5, 10)),
])
def test_shortened_quickstart_drops_evolution_epochs_beyond_the_run(num_epochs, kept, dropped,
                                                                    capsys):
  sys.path.insert(0, os.path.join(REPO, "experiments"))
  try:
    import quickstart  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  c = quickstart.get_config()
  c.num_epochs = num_epochs
  per_epoch = 469                                     # 60000 / 128, rounded up
  num_steps = steps.total_steps(c, per_epoch)
  out = steps.evolution_steps(c, per_epoch, num_steps)
  # Each kept epoch e at step round(e * 469) (by hand: 117, 234, 469, 938).
  assert sorted(out) == [round(e * per_epoch) for e in kept]
  notice = [l for l in "".join(capsys.readouterr()).splitlines() if "evolution epochs" in l]
  assert len(notice) == 1 and str(list(dropped)) in notice[0]


# -- item 10: data that is not what it seems --------------------------------------------

def _jpeg_folder(root, classes=("cat", "dog"), n=5):
  """A folder dataset of random JPEGs; returns the path of one truncated file that PIL's
  verify() accepts (the first 60% of a good JPEG)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for cls in classes:
    os.makedirs(root / cls)
    for i in range(n):
      Image.fromarray(rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)).save(
          root / cls / f"{i}.jpg", quality=90)
  bad = root / classes[-1] / "truncated.jpg"
  data = (root / classes[-1] / "0.jpg").read_bytes()
  bad.write_bytes(data[:len(data) * 6 // 10])
  with Image.open(bad) as im:
    im.verify()                      # the trap: PIL's check passes
  return str(bad)


def _folder_config(root):
  c = helpers.small_config("", steps=2, batch=4)
  c.dataset.name, c.dataset.folder = "folder", str(root)
  c.dataset.eval_split, c.dataset.folder_eval_fraction = "validation", 0.2
  c.dataset.resize_size, c.dataset.crop_size = 16, 12
  return c


def test_truncated_jpeg_is_skipped_and_counted_or_named(tmp_path):
  bad = _jpeg_folder(tmp_path / "imgs")
  c = _folder_config(tmp_path / "imgs")
  info = sources.dataset_info(c)
  # 6 dog files (every 5th to eval): train 4 cats + 4 good dogs; the truncated one skipped.
  assert (info.num_train, info.num_eval) == (8, 2)
  assert sources._folder_split(c, "train")[3] == 1 and bad not in sources._folder_split(c, "train")[0]
  mean = iterators.full_pixel_mean(c, str(tmp_path / "wd"))    # decoded every training image
  assert mean.shape == (16, 16, 3) and np.isfinite(mean).all()
  c.dataset.on_corrupt = "stop"
  with pytest.raises(ValueError, match=re.escape(bad) + ".*truncated"):
    sources.dataset_info(c)


def test_empty_class_folder_is_left_out_with_a_warning_or_an_error(tmp_path, capsys):
  _jpeg_folder(tmp_path / "imgs", classes=("cat", "dog", "emu"))
  os.makedirs(tmp_path / "imgs" / "bird")      # empty: not a class
  c = _folder_config(tmp_path / "imgs")
  info = sources.dataset_info(c)
  assert info.class_names == ("cat", "dog", "emu") and info.num_classes == 3
  warning = [l for l in capsys.readouterr().err.splitlines() if "bird" in l]
  assert len(warning) == 1 and warning[0].startswith("warning: ") and "empty" in warning[0]
  c.dataset.on_corrupt = "stop"
  with pytest.raises(ValueError, match=r"\['bird'\] hold no images"):
    sources.dataset_info(c)


# -- items 2, 3, 5: the checkpoints behind reports and resumes ---------------------------

STEPS, EVERY = 8, 4
CONFIG = """
import sys
sys.path.insert(0, {tests!r})
import helpers
def get_config():
  c = helpers.small_config({fm!r}, steps={steps})
  c.checkpoint_every_steps = {every}
  c.keep_checkpoints = 3
  c.analyses.enabled = False           # the report: results, curves and a small conv1 atlas
  c.report.layers, c.report.num_maps, c.report.top_k, c.report.max_examples = ("conv1",), 2, 2, 8
  return c
"""


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """A persistent compilation cache for this module: its trainings compile the same steps
  once (about 30 s -> 3 s each on a busy 2-core machine); the previous setting after."""
  from jax.experimental.compilation_cache import compilation_cache as cc  # pylint: disable=g-import-not-at-top
  old = (jax.config.jax_compilation_cache_dir,
         jax.config.jax_persistent_cache_min_compile_time_secs)
  cc.reset_cache()
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  yield
  jax.config.update("jax_compilation_cache_dir", old[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
  cc.reset_cache()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(config file, workdir of a finished 8-step run with checkpoints 4 and 8, its params)."""
  root = tmp_path_factory.mktemp("r3")
  fm = str(root / "fm")
  helpers.make_fmnist(fm, n_train=64, n_test=8)
  sources._fashion_mnist.cache_clear()
  cfg = root / "cfg.py"
  cfg.write_text(CONFIG.format(tests=TESTS, fm=fm, steps=STEPS, every=EVERY))
  wd = str(root / "wd")
  loop.train_and_evaluate(config_of(cfg), wd, devices=jax.devices()[:1])
  return cfg, wd, params_of(wd)


def config_of(cfg):
  namespace = {}
  exec(cfg.read_text(), namespace)  # pylint: disable=exec-used
  return namespace["get_config"]()


def params_of(workdir, step=None):
  return jax.tree.map(np.asarray, weights.load_trained(workdir, step)[1]["params"])


def copy_run(trained, tmp_path):
  wd = str(tmp_path / "wd")
  shutil.copytree(trained[1], wd)
  return wd


def step_dir(wd, step):
  return os.path.join(wd, "checkpoints", str(step))


def array_files(wd, step):
  return [f for f in glob.glob(os.path.join(step_dir(wd, step), "state", "**", "d", "*"),
                               recursive=True) if os.path.isfile(f)]


def rewrite_step(wd, step, change, meta_change=None, manifest=True):
  """Replace a step by ``change(state)`` saved with Orbax directly (a consistent step with
  the damage inside the arrays), with the checksum manifest as the code writes it
  (``manifest=False``: none, as before manifests)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  config = checkpoints.load_config(wd)
  info = checkpoints.load_dataset_info(wd)
  mngr = checkpoints.manager(os.path.join(wd, "checkpoints"), 10)
  model = models.from_config(config.model, info.num_classes)
  init = train_state.init_fn(model, (1, info.input_size, info.input_size, info.channels),
                             train_state.optimizer_from_config(config), seed=config.seed)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev),
                          jax.eval_shape(init))
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                   meta=ocp.args.JsonRestore()))
  state, meta = change(out["state"]), dict(out["meta"])
  if meta_change:
    meta = meta_change(meta)
  shutil.rmtree(step_dir(wd, step))
  mngr.reload()
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)), force=True)
  mngr.wait_until_finished()
  mngr.close()
  if manifest:
    rundir.write_json(os.path.join(step_dir(wd, step), checkpoints.MANIFEST),
                      {"sha256": checkpoints.checksums(step_dir(wd, step))})
  else:
    os.remove(os.path.join(step_dir(wd, step), checkpoints.MANIFEST)) if os.path.exists(
        os.path.join(step_dir(wd, step), checkpoints.MANIFEST)) else None


def nan_params(state):
  k = state.params["conv1"]["kernel"]
  return state.replace(params={**state.params, "conv1": {**state.params["conv1"],
                                                          "kernel": k.at[0, 0, 0, 0].set(np.nan)}})


def inf_opt_state(state):
  return state.replace(opt_state=jax.tree.map(
      lambda x: x.at[(0,) * x.ndim].set(np.inf) if x.dtype == np.float32 and x.size else x,
      state.opt_state))


@pytest.mark.parametrize("damage", ["truncated", "deleted", "nan_params", "inf_opt_state",
                                    "nan_params_no_manifest"])
def test_load_latest_falls_back_from_a_damaged_step(damage, trained, tmp_path, capsys):
  wd = copy_run(trained, tmp_path)
  want = params_of(trained[1], EVERY)
  if damage in ("truncated", "deleted"):
    os.remove(os.path.join(step_dir(wd, STEPS), checkpoints.MANIFEST))   # Orbax's own errors
    for f in array_files(wd, STEPS):
      if damage == "deleted":
        os.remove(f)
      else:
        with open(f, "r+b") as fh:
          fh.truncate(os.path.getsize(f) // 2)
  else:
    rewrite_step(wd, STEPS, inf_opt_state if damage == "inf_opt_state" else nan_params,
                 manifest=not damage.endswith("no_manifest"))
  _, variables, _, step, note = weights.load_latest(wd)
  assert step == EVERY and note.startswith(f"the newest good checkpoint; damaged: step {STEPS}")
  if damage not in ("truncated", "deleted"):
    assert "non-finite" in note
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, variables["params"]),
               want)
  with pytest.raises(ValueError, match=f"checkpoint step {STEPS} .* damaged"):
    weights.load_trained(wd, STEPS)                # asked for that step: no fallback
  assert "Traceback" not in "".join(capsys.readouterr())


def test_non_finite_checkpoint_is_not_resumed_from(trained, tmp_path, capsys):
  cfg, _, params = trained
  wd = copy_run(trained, tmp_path)
  rewrite_step(wd, STEPS, nan_params)                 # consistent checksums, NaN inside
  res = loop.train_and_evaluate(config_of(cfg), wd, devices=jax.devices()[:1])
  out = "".join(capsys.readouterr())
  assert re.search(rf"checkpoint step {STEPS} in .* is damaged or unreadable \(Damaged: "
                   r"1 array\(s\) hold non-finite values, first \['params'\]\['conv1'\]", out)
  assert f"falling back to checkpoint step {EVERY}" in out
  assert res["steps"] == STEPS and np.isfinite(res["loss"])
  jax.tree.map(np.testing.assert_array_equal, params_of(wd), params)   # steps 5-8 again


def test_nan_loss_message_names_a_checkpoint_that_exists(trained, tmp_path, monkeypatch):
  cfg = trained[0]
  make = iterators.create_train_iterator

  def poisoned(*args, **kwargs):
    for i, b in enumerate(make(*args, **kwargs), start=args[2] + 1):   # i = the step
      yield dict(b, image=np.full_like(b["image"], np.nan)) if i == 2 else b
  monkeypatch.setattr(iterators, "create_train_iterator", poisoned)
  wd = str(tmp_path / "nan")
  with pytest.raises(FloatingPointError) as e:
    loop.train_and_evaluate(config_of(cfg), wd, devices=jax.devices()[:1])
  assert "at step 2" in str(e.value) and "None" not in str(e.value)
  assert "no checkpoint was saved" in str(e.value)
  assert not os.path.exists(os.path.join(wd, "checkpoints", "1"))


def snapshot(wd):
  return {f: open(f, "rb").read() for f in glob.glob(os.path.join(wd, "**"), recursive=True)
          if os.path.isfile(f)}


@pytest.mark.parametrize("key,value,named", [
    ("model.fc_features", 32, "model.fc_features (16 -> 32)"),
    ("optimizer", "adam", "optimizer ('sgd' -> 'adam')"),
    ("dataset.max_train_examples", 32, "dataset.max_train_examples (-1 -> 32)"),
])
def test_incompatible_config_change_is_refused_before_writing(key, value, named, trained,
                                                              tmp_path):
  cfg, _, params = trained
  wd = copy_run(trained, tmp_path)
  before = snapshot(wd)
  c = config_of(cfg)
  *parents, leaf = key.split(".")
  node = c
  for p in parents:
    node = node[p]
  node[leaf] = value
  c.log_every_steps = 2                               # an allowed change beside it: not named
  with pytest.raises(ValueError) as e:
    loop.train_and_evaluate(c, wd, devices=jax.devices()[:1])
  msg = str(e.value)
  assert named in msg and "log_every_steps" not in msg and "new --workdir" in msg
  assert "\n" not in msg
  assert snapshot(wd) == before                       # nothing written, nothing moved
  jax.tree.map(np.testing.assert_array_equal, params_of(wd), params)


def test_incompatible_change_cli_exits_2_writing_nothing(trained, tmp_path):
  cfg = trained[0]
  wd = copy_run(trained, tmp_path)
  before = snapshot(wd)
  rc, out = cli(f"--config={cfg}", f"--workdir={wd}", "--config.model.fc_features=32")
  assert rc == 2 and len(error_lines(out)) == 1, out[-3000:]
  assert "model.fc_features (16 -> 32)" in error_lines(out)[0] and "Traceback" not in out
  assert snapshot(wd) == before
  assert weights.load_trained(wd)[2].model.fc_features == 16   # the record still loads


def test_allowed_config_changes_are_recorded(trained, tmp_path, capsys):
  cfg = trained[0]
  wd = copy_run(trained, tmp_path)
  info = checkpoints.load_dataset_info(wd)
  c = config_of(cfg)
  c.num_train_steps, c.num_epochs = STEPS * 3, 5.0        # longer: allowed, nothing written
  assert checkpoints.check_resume(c, wd, info) == {"num_epochs": (70.0, 5.0),
                                                  "num_train_steps": (STEPS, STEPS * 3)}
  assert not os.path.exists(os.path.join(wd, checkpoints.CONFIG_CHANGES))
  # A rerun of the finished run with other logging and report options: recorded, then run.
  c = config_of(cfg)
  c.log_every_steps, c.report.num_maps = 5, 3
  assert loop.train_and_evaluate(c, wd, devices=jax.devices()[:1])["steps"] == STEPS
  rows = [json.loads(l) for l in open(os.path.join(wd, checkpoints.CONFIG_CHANGES))]
  assert len(rows) == 1 and rows[0]["changes"] == {"log_every_steps": [1, 5],
                                                   "report.num_maps": [2, 3]}
  when = datetime.datetime.strptime(rows[0]["time"], "%Y-%m-%dT%H:%M:%S")   # local time
  assert abs((datetime.datetime.now() - when).total_seconds()) < 600
  notice = [l for l in "".join(capsys.readouterr()).splitlines() if l.startswith("config changed")]
  assert len(notice) == 1 and "log_every_steps (1 -> 5)" in notice[0]
  assert json.load(open(os.path.join(wd, "config.json")))["report"]["num_maps"] == 3


def test_checkpoint_format_version_and_old_checkpoints(trained, tmp_path, capsys):
  _, _, params = trained
  wd = copy_run(trained, tmp_path)
  meta_file = os.path.join(step_dir(wd, STEPS), "meta", "metadata")
  assert json.load(open(meta_file))["format_version"] == checkpoints.FORMAT_VERSION
  # A checkpoint as the code before versions wrote it: the same meta without the field.
  rewrite_step(wd, STEPS, lambda s: s,
               meta_change=lambda m: {k: v for k, v in m.items() if k != "format_version"})
  assert "format_version" not in json.load(open(meta_file))
  jax.tree.map(np.testing.assert_array_equal, params_of(wd), params)
  config, info = checkpoints.load_config(wd), checkpoints.load_dataset_info(wd)
  abstract = checkpoints.abstract_state(
      config, info, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  ckpt = os.path.join(wd, "checkpoints")
  mngr = checkpoints.manager(ckpt, 3)
  _, meta, step = checkpoints.restore_latest(mngr, abstract, ckpt)   # as training resumes
  assert step == STEPS and meta["step"] == STEPS and "damaged" not in "".join(capsys.readouterr())
  mngr.close()
  # A version newer than this code's: refused, and the older step used.
  rewrite_step(wd, STEPS, lambda s: s,
               meta_change=lambda m: dict(m, format_version=checkpoints.FORMAT_VERSION + 1))
  _, _, _, step, note = weights.load_latest(wd)
  assert step == EVERY and "format version 3 is newer" in note


def test_only_closed_event_loop_errors_are_dropped_and_the_filter_is_installed_once(
    monkeypatch):
  from types import SimpleNamespace  # pylint: disable=import-outside-toplevel
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  console.quiet_closed_event_loops()
  installed = sys.unraisablehook
  console.quiet_closed_event_loops()
  assert sys.unraisablehook is installed
  errors = [RuntimeError("Event loop is closed"), RuntimeError("other"),
            ValueError("Event loop is closed")]
  for e in errors:
    sys.unraisablehook(SimpleNamespace(exc_value=e))
  assert [u.exc_value for u in seen] == errors[1:]


def test_another_librarys_error_is_cut_after_200_characters():
  line = "x" * 200
  assert checkpoints._short(RuntimeError(line + "\nmore")) == "RuntimeError: " + line   # pylint: disable=protected-access
  assert checkpoints._short(RuntimeError(line + "y")) == f"RuntimeError: {line}..."      # pylint: disable=protected-access
  assert checkpoints._short(checkpoints.Damaged(line + "y")) == f"Damaged: {line}y"      # pylint: disable=protected-access


def test_of_two_changes_only_the_one_that_changes_shapes_is_refused(trained, tmp_path):
  cfg = trained[0]
  wd = copy_run(trained, tmp_path)
  c = config_of(cfg)
  # A new momentum changes no shape (each key is tried alone, with its new value).
  c.model.fc_features, c.momentum = 32, 0.8
  with pytest.raises(ValueError, match=r"config change model.fc_features \(16 -> 32\) is "
                                       r"incompatible") as e:
    checkpoints.check_resume(c, wd, checkpoints.load_dataset_info(wd))
  assert "momentum" not in str(e.value)

