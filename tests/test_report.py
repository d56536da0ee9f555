"""The HTML report: a panel for every conv layer, escaped text, atomic rewrite,
extra sections, and a real headless Chromium loading it."""
import html.parser
import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from zfnet_jax import configs
from zfnet_jax.analyses import atlas
from zfnet_jax.nn import models
from zfnet_jax.render import content
from zfnet_jax.report import report
from zfnet_jax.training import weights

import helpers

S = 64
PAYLOAD = "<script>alert(1)</script>"
CHROMIUM = helpers.CHROMIUM
CONVS = ("conv1", "conv2", "conv3", "conv4", "conv5")


def _config(**report_opts):
  c = configs.default_config()
  c.model.name = "ZFNetLowRes"
  c.dataset.name = "folder"
  c.dataset.folder = f"/data/{PAYLOAD}"
  c.dataset.eval_split = "test"
  c.report.update(dict(layers=CONVS, num_maps=3, top_k=9, batch_size=16, chunk_size=32,
                       max_examples=-1) | report_opts)
  return c


def _batches(n=20, batch_size=16, fail_at=None):
  rng = np.random.default_rng(0)
  images = rng.normal(0, 50, (n, S, S, 1)).astype(np.float32)
  for b, s in enumerate(range(0, n, batch_size)):
    if b == fail_at:
      raise RuntimeError("disk on fire")
    x = images[s:s + batch_size]
    pad = batch_size - len(x)
    yield {"image": np.concatenate([x, np.zeros((pad, S, S, 1), np.float32)]),
           "label": np.arange(s, s + batch_size, dtype=np.int32) % 3,
           "mask": np.arange(batch_size) < len(x),
           "id": np.concatenate([np.arange(s, s + len(x)), -np.ones(pad, np.int64)])}


def _fake_workdir(path):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for e in (1, 2, 3):
      for split in ("train", "eval"):
        f.write(json.dumps({"step": 10 * e, "epoch": e, "split": split, "loss": 2.0 / e,
                            "top1_error": 0.6 / e, "top5_error": 0.2 / e}) + "\n")
    f.write('{"step": 40, "epo')  # a line cut short by a kill
  with open(os.path.join(path, "results.json"), "w") as f:
    json.dump({"test_top1_error": 0.25, PAYLOAD: {"note": PAYLOAD}}, f)
  return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  model = models.ZFNetLowRes(num_classes=3, conv_features=(4, 6, 8, 8, 6), fc_features=8)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, S, S, 1)))
  mean = np.full((S, S, 1), 120.0, np.float32)
  workdir = _fake_workdir(str(tmp_path_factory.mktemp("run")))
  path = report.render_report(_config(), workdir, model, variables, _batches(), mean,
                              class_names=["shirt", PAYLOAD, "bag"], total=20, progress=False,
                              extra_sections=False)
  return model, variables, mean, workdir, path


class _Page(html.parser.HTMLParser):
  """Sections (id -> img srcs), links, scripts and event-handler attributes."""

  def __init__(self):
    super().__init__()
    self.sections, self.links, self.scripts, self.handlers, self.current = {}, [], 0, [], None

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    self.handlers += [k for k in attrs if k.lower().startswith("on")]
    if tag == "section":
      self.current = attrs["id"]
      self.sections[self.current] = []
    elif tag == "img" and self.current:
      self.sections[self.current].append(attrs["src"])
    elif tag == "a":
      self.links.append(attrs.get("href", ""))
    elif tag == "script":
      self.scripts += 1


def _parse(path):
  page = _Page()
  with open(path, encoding="utf-8") as f:
    page.feed(f.read())
  return page


def test_report_has_a_panel_for_every_conv_layer(setup):
  *_, path = setup
  page = _parse(path)
  for layer in CONVS:
    srcs = page.sections[f"layer-{layer}"]
    assert srcs == [f"atlas_{layer}_0.png"]
    assert f"#layer-{layer}" in page.links  # table of contents
    img = Image.open(os.path.join(os.path.dirname(path), srcs[0]))
    assert img.format == "PNG" and min(img.size) > 50
    saved = atlas.load(os.path.join(os.path.dirname(path), f"atlas_{layer}.npz"))
    assert saved["distinct_images"] and all(len(set(r)) == len(r) for r in saved["ids"])
  with open(path, encoding="utf-8") as f:
    assert f.read().count("Legibility (zfnet_jax.analyses.legibility)") == len(CONVS)
  for section, src in (("results", "curves.png"), ("filters", "filters_conv1.png")):
    assert page.sections[section] == [src]
  assert sorted(os.listdir(os.path.dirname(os.path.dirname(path)))) == [
      "metrics.jsonl", "report", "results.json"]  # no temporary directories left


def test_text_from_data_and_config_is_escaped(setup):
  *_, path = setup
  text = open(path, encoding="utf-8").read()
  assert PAYLOAD not in text
  assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
  assert text.count("&lt;script&gt;alert(1)") >= 3  # class table, config, results
  page = _parse(path)
  assert page.scripts == 0 and page.handlers == []
  assert "Content-Security-Policy" in text and "default-src 'none'" in text
  assert "http://" not in text and "https://" not in text


def test_bad_options_fail_before_work_and_keep_the_old_report(setup, monkeypatch):
  model, variables, mean, workdir, path = setup
  before = open(path).read()
  consumed = []

  def spy():
    consumed.append(1)
    yield from _batches()
  for opts, match in [(dict(layers=("conv1", "conv6")), "'conv6'.*allowed"),
                      (dict(rule="magic"), "'magic'"), (dict(num_maps=0), "num_maps.*0"),
                      (dict(top_k=-3), "top_k.*-3"), (dict(layers=()), "layers")]:
    with pytest.raises(ValueError, match=match):
      report.render_report(_config(**opts), workdir, model, variables, spy(), mean,
                           progress=False, extra_sections=False)
  with pytest.raises(ValueError, match="'magic'"):  # before looking for a checkpoint
    report.write_report(_config(rule="magic"), os.path.join(workdir, "missing"))
  assert not consumed
  # A failure half-way leaves the previous report as it was, and no temporary files.
  with pytest.raises(RuntimeError, match="disk on fire"):
    report.render_report(_config(), workdir, model, variables, _batches(fail_at=0), mean,
                         progress=False, extra_sections=False)
  assert open(path).read() == before
  assert sorted(os.listdir(workdir)) == ["metrics.jsonl", "report", "results.json"]


def test_sections_from_a_registered_contributor_are_rendered_and_their_errors_raised(
    setup, tmp_path):
  model, variables, mean, _, _ = setup
  workdir = _fake_workdir(str(tmp_path / "run"))
  calls = []

  class Fake:
    """A contributor as an analysis is one: validate, then sections from the context."""

    @staticmethod
    def validate(options, net, data):
      if options["size"] > data.input_size:
        raise ValueError(f"occlusion.size {options['size']} not allowed")
      return options["size"]

    @staticmethod
    def sections(context, size):
      calls.append((context.net.module == model, size, context.data.input_size))
      Image.new("RGB", (20, 10), (255, 0, 0)).save(context.path("analyses/occ.png"))
      return [content.Section(f"Occlusion {PAYLOAD}", "occlusion", [PAYLOAD],
                               [("analyses/occ.png", f"cap {PAYLOAD}")],
                               [(["a"], [[PAYLOAD]])])]

  def registry(size):
    return [e for e in report.REGISTRY if e.name in report.CORE] + [
        report.Entry("occlusion", Fake, lambda c: {"size": size})]
  config = _config(layers=("conv1",), num_maps=2)
  path = report.render_report(config, workdir, model, variables, _batches(), mean,
                              progress=False, registry=registry(16))
  assert calls == [(True, 16, S)]
  page = _parse(path)
  assert page.sections["occlusion"] == ["analyses/occ.png"]
  for rel in page.sections["occlusion"]:
    assert os.path.isfile(os.path.join(workdir, "report", rel))
  text = open(path).read()
  assert PAYLOAD not in text and "#occlusion" in page.links
  consumed = []

  def spy():
    consumed.append(1)
    yield from _batches()
  with pytest.raises(ValueError, match="occlusion.size 99"):
    report.render_report(config, workdir, model, variables, spy(), mean, progress=False,
                         registry=registry(99))
  assert not consumed  # their settings are checked before the scan

  class Broken(Fake):
    @staticmethod
    def sections(context, size):
      raise KeyError("analysis bug")
  broken = registry(16)[:-1] + [report.Entry("occlusion", Broken, lambda c: {"size": 16})]
  with pytest.raises(KeyError, match="analysis bug"):
    report.render_report(config, workdir, model, variables, _batches(), mean, progress=False,
                         registry=broken)
  assert open(path).read() == text


_chromium, _browser_check = helpers.chromium, helpers.browser_check


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs /usr/bin/chromium")
def test_report_in_a_real_browser(setup, tmp_path):
  *_, path = setup
  report_dir = str(tmp_path / "report")
  shutil.copytree(os.path.dirname(path), report_dir)
  seen = _browser_check(report_dir, tmp_path, "check.html")
  assert seen["alerts"] == [] and seen["scripts"] == 1  # only the checker ran
  assert len(seen["images"]) == len(CONVS) + 2
  assert all(w > 0 for _, w in seen["images"]), seen["images"]
  assert {f"layer-{l}" for l in CONVS} <= set(seen["sections"])
  # The harness can fail: an unescaped payload without the CSP does run.
  control = _browser_check(report_dir, tmp_path, "control.html", keep_csp=False,
                           inject=PAYLOAD)
  assert control["alerts"] == ["1"]
  shot = tmp_path / "report.png"
  _chromium(f"--user-data-dir={tmp_path / 'profile-shot'}", f"--screenshot={shot}",
            "--window-size=1280,2400", "--hide-scrollbars", f"file://{path}")
  assert Image.open(shot).size == (1280, 2400)
  if os.environ.get("ZFNET_SCREENSHOT_DIR"):
    shutil.copy(shot, os.environ["ZFNET_SCREENSHOT_DIR"])


@pytest.mark.slow
def test_report_of_a_trained_run(tiny_workdir):
  """End to end: --mode=report's path on the training helper's tiny run."""
  _, _, config = weights.load_trained(tiny_workdir)
  config.unlock()
  config.report.update(dict(layers=CONVS + ("pool2",), num_maps=4, max_examples=128,
                            rule="guided"))
  path = report.write_report(config, tiny_workdir)
  assert path == os.path.join(tiny_workdir, "report", "index.html")
  page = _parse(path)
  for layer in CONVS + ("pool2",):
    assert page.sections[f"layer-{layer}"] == [f"atlas_{layer}_0.png"]
  assert page.sections["results"] == ["curves.png"]
  text = open(path).read()
  assert "T-shirt/top" in text  # class names of the run's dataset
  # The analyses' sections (Figs. 4-7, Table 1) are on the page, with their images ...
  assert {"occlusion", "invariance", "correspondence", "evolution", "diagnostics"} <= set(
      page.sections), list(page.sections)
  for name in ("occlusion", "invariance", "correspondence", "evolution", "diagnostics"):
    assert page.sections[name], name
    for src in page.sections[name]:
      assert os.path.isfile(os.path.join(tiny_workdir, "report", src)), src
  # ... and load in a real browser.
  if not os.path.exists(CHROMIUM):
    pytest.skip("needs /usr/bin/chromium (a failure in CI)")
  import tempfile
  with tempfile.TemporaryDirectory() as tmp:
    report_dir = os.path.join(tmp, "report")
    shutil.copytree(os.path.dirname(path), report_dir)
    seen = _browser_check(report_dir, pathlib.Path(tmp), "check.html")
  assert seen["alerts"] == [] and seen["scripts"] == 1
  assert {"occlusion", "invariance", "correspondence", "evolution", "diagnostics"} <= set(
      seen["sections"]), seen["sections"]
  assert seen["images"] and all(w > 0 for _, w in seen["images"]), seen["images"]
