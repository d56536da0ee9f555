"""Dead filters, radial spectra and the high-frequency indicator on hand-made filters."""
import os

import jax
import numpy as np
import pytest

from zfnet_jax import configs, job
from zfnet_jax.analyses import diagnostics, spectra
from zfnet_jax.nn import models
from zfnet_jax.render import content
from zfnet_jax.report import comparisons
from zfnet_jax.training import weights

import helpers


def test_dead_fraction_by_hand():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(5, 5, 3, 8))
  kernel[..., 2] *= 0.01          # RMS ~ 0.01 of the others -> dead
  kernel[..., 5] = 0.0            # all zero -> dead
  kernel[..., 6] *= 0.2           # weak but alive at threshold 0.05
  dead = spectra.dead_filters(kernel, 0.05)
  np.testing.assert_array_equal(np.where(dead)[0], [2, 5])
  rms = np.sqrt((kernel ** 2).mean((0, 1, 2)))
  np.testing.assert_allclose(spectra.filter_rms(kernel), rms)
  assert spectra.dead_filters(kernel, 0.5).sum() == 3
  with pytest.raises(ValueError, match="1.5"):
    spectra.dead_filters(kernel, 1.5)


def test_radial_spectrum_of_hand_made_filters():
  k = 8
  y, x = np.mgrid[:k, :k]
  const = np.ones((k, k, 1))
  checker = ((-1.0) ** (x + y))[..., None]                      # frequency (1/2, 1/2)
  wave = np.cos(2 * np.pi * x / 4)[..., None]                   # 1/4 cycles/px along columns
  freqs, e = spectra.radial_spectrum(const[None])
  np.testing.assert_allclose(freqs, np.arange(len(e)) / k)
  np.testing.assert_allclose(e[0], 1.0)
  freqs, e = spectra.radial_spectrum(checker[None])
  np.testing.assert_allclose(e[round(np.sqrt(0.5) * k)], 1.0)    # corner: r = 0.707 -> bin 6
  freqs, e = spectra.radial_spectrum(wave[None])
  np.testing.assert_allclose(e[2], 1.0, atol=1e-12)               # r = 1/4 = bin 2 of 8
  np.testing.assert_allclose(e.sum(), 1.0)
  # averaged over filters, each normalised: half DC, half at 1/4 (different amplitudes)
  _, e = spectra.radial_spectrum(np.stack([3 * const, wave]))
  np.testing.assert_allclose(e[[0, 2]], [0.5, 0.5], atol=1e-12)
  # zero-padding keeps the energy where it was, spread around it
  freqs, e = spectra.radial_spectrum(wave[None], fft_size=32)
  assert abs(freqs[np.argmax(e)] - 0.25) <= 1 / 32


def test_high_freq_fraction():
  k = 8
  y, x = np.mgrid[:k, :k]
  sig = np.stack([np.ones((k, k)), (-1.0) ** (x + y), np.cos(2 * np.pi * x / 8),
                  np.ones((k, k)) + (-1.0) ** x])[..., None]
  # ones + (-1)^x: energy 64^2 at DC and 64^2 at (0, 1/2) -> half high
  np.testing.assert_allclose(spectra.high_freq_fraction(sig, 0.25), [0, 1, 0, 0.5], atol=1e-12)
  with pytest.raises(ValueError, match="high_freq 0"):
    spectra.high_freq_fraction(sig, 0.0)


# -- on a hand-built CNN (not one of our models) -------------------------------------

def _plain(scale_filter=1):
  """The plain CNN with filter ``scale_filter`` of c1 shrunk to 1% (dead at 0.05)."""
  net, variables = helpers.plain_network()
  params = jax.tree_util.tree_map(np.asarray, variables["params"])
  kernel = np.array(params["c1"]["kernel"])
  kernel[..., scale_filter] *= 0.01
  params["c1"] = {**params["c1"], "kernel": kernel}
  return net, {"params": params}


def _images(n=6, seed=6):
  return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (n, 32, 32, 1))) * 40


def test_measure_of_a_hand_built_cnn_by_numpy():
  """Dead filters and spectrum from the c1 kernel by NumPy; aliasing from backprop
  projections of c2 computed with jax.vjp of the plain features (backprop = gradient times
  the activation)."""
  net, variables = _plain()
  cnn = helpers.PlainCNN()
  images = _images()
  r = spectra.measure(net, variables, images, dead_threshold=0.05, fft_size=16,
                      high_freq=0.25, rule="backprop", first_layer="c1", second_layer="c2")
  kernel = np.asarray(variables["params"]["c1"]["kernel"], np.float64)   # (5, 5, 1, 4)
  rms = np.sqrt((kernel ** 2).sum((0, 1, 2)) / 25)
  np.testing.assert_array_equal(r["dead"], rms < 0.05 * rms.max())
  assert r["dead_fraction"] == 0.25
  # spectrum: each filter zero-padded to 16x16, |FFT|^2, normalised, binned by radius
  n = 16
  per_filter = []
  for f in range(4):
    padded = np.zeros((n, n))
    padded[:5, :5] = kernel[:, :, 0, f]
    p = np.abs(np.fft.fft2(padded)) ** 2
    p /= p.sum()
    b = np.zeros(12)
    for u in range(n):
      for w in range(n):
        fu, fw = (u if u < n / 2 else u - n) / n, (w if w < n / 2 else w - n) / n
        b[int(round(np.hypot(fu, fw) * n))] += p[u, w]
    per_filter.append(b)
  want = np.mean(per_filter, 0)
  np.testing.assert_allclose(r["spectrum"], want, atol=1e-12)
  np.testing.assert_allclose(r["frequencies"], np.arange(12) / 16)
  np.testing.assert_allclose(r["filter_high_freq"], want[4:].sum(), atol=1e-12)
  np.testing.assert_allclose(r["filter_low_freq"], want[:2].sum(), atol=1e-12)
  # aliasing: c2 has 6 maps; per map the image with the strongest activation, its argmax
  feats = lambda x: cnn.apply(variables, x, method="features")
  c2 = np.asarray(feats(images)["c2"])
  assert r["projections"].shape == (6, 32, 32, 1) and r["aliasing"].shape == (6,)
  for m in range(6):
    k, i, j = np.unravel_index(np.argmax(c2[..., m]), c2[..., m].shape)
    out, vjp = jax.vjp(lambda x: feats(x)["c2"], images[k:k + 1])
    cot = np.zeros(out.shape, np.float32)
    cot[0, i, j, m] = c2[k, i, j, m]          # the activation itself is projected
    g = np.asarray(vjp(cot)[0][0, ..., 0], np.float64)
    g -= g.mean()
    np.testing.assert_allclose(r["projections"][m, ..., 0], g, atol=1e-5)
    p = np.abs(np.fft.fft2(g)) ** 2
    fr = np.fft.fftfreq(32)
    high = np.hypot(fr[:, None], fr[None, :]) >= 0.25
    np.testing.assert_allclose(r["aliasing"][m], p[high].sum() / p.sum(), atol=1e-5)
  np.testing.assert_allclose(r["aliasing_mean"], r["aliasing"].mean())
  assert "aliasing" not in spectra.measure(net, variables, None, first_layer="c1")
  with pytest.raises(ValueError, match="conv1"):
    spectra.measure(net, variables, None)          # the plain CNN has no conv1


def test_sections_of_a_hand_built_cnn(tmp_path):
  net, variables = _plain()
  other, other_vars = helpers.plain_network(seed=1)
  data = content.Data("plain", 32, 32, 1)
  options = diagnostics.Options(0.05, 16, 0.25, first_layer="c1", second_layer="c2")
  base = dict(net=net, variables=variables, images=_images(4), labels=np.zeros(4, int),
              ids=np.arange(4), pixel_mean=np.zeros((32, 32, 1), np.float32),
              class_names=("a", "b", "c"), data=data)
  (sec,) = diagnostics.sections(content.Context(out_dir=str(tmp_path / "alone"), **base),
                                options)
  assert (sec.title, sec.anchor) == ("Architecture diagnostics", "diagnostics")
  assert [f for f, _ in sec.figures] == ["diagnostics.png", "diagnostics_c2.png"]
  assert all((tmp_path / "alone" / f).is_file() for f, _ in sec.figures)
  assert sec.paragraphs[-1] == ("No comparison model: set --config.analyses.diagnostics."
                                "train_comparison=True to train one.")
  header, rows = sec.tables[0]
  assert len(header) == 9 and [r[:3] for r in rows] == [["PlainCNN", "5x5", "0.250"]]
  ctx = content.Context(out_dir=str(tmp_path), comparisons={
      "Other": (other, other_vars, "Other: another seed.")}, **base)
  (sec,) = diagnostics.sections(ctx, options)
  assert sec.paragraphs[1:] == ["Other: another seed."]
  assert [r[0] for r in sec.tables[0][1]] == ["PlainCNN", "Other"]
  saved = np.load(tmp_path / "diagnostics.npz")
  assert saved["PlainCNN/dead_fraction"] == 0.25 and saved["Other/projections"].shape[0] == 6
  want = spectra.measure(other, other_vars, base["images"], fft_size=16, first_layer="c1",
                             second_layer="c2")
  np.testing.assert_allclose(saved["Other/spectrum"], want["spectrum"])


def test_validate():
  net, _ = helpers.plain_network()
  model = models.ZFNetLowRes(num_classes=3, conv_features=(4, 6, 6, 6, 8), fc_features=8)
  data = content.Data("plain", 32, 32, 1)
  o = configs.default_config().analyses.diagnostics
  assert diagnostics.validate(o, model, data) == diagnostics.Options(0.05, 32, 0.25)
  with pytest.raises(ValueError, match="diagnostics need a conv1 layer"):
    diagnostics.validate(o, net, data)
  for field, value, match in (("dead_threshold", 1.5, "dead_threshold 1.5"),
                              ("high_freq", 0.0, "high_freq 0"),
                              ("fft_size", -1, r"diagnostics.fft_size -1 not allowed: >= 0")):
    bad = configs.default_config().analyses.diagnostics
    bad[field] = value
    with pytest.raises(ValueError, match=match):
      diagnostics.validate(bad, model, data)


@pytest.mark.slow   # two trainings and a report: ~100 s on 2 loaded cores
def test_pipeline_trains_the_no_clip_comparison_and_shows_its_filter_statistics(tmp_path):
  """Fig. 6(a): the top-level pipeline trains this model with clip_filters=False beside the
  run (clip radius 0.01 < the initial filter RMS of ~0.05, so clipping binds) and the
  diagnostics table shows both runs' conv1 statistics, checked against a NumPy RMS and
  dead fraction of each run's stored kernel."""
  d = str(tmp_path / "fmnist")
  helpers.make_fmnist(d, n_train=40, n_test=10)
  c = helpers.small_config(d, steps=2)
  c.clip_radius = 0.01
  c.report.enabled = True
  c.report.update(dict(layers=("conv1",), num_maps=2, max_examples=8, batch_size=8))
  for name in ("walkthrough", "occlusion", "invariance", "correspondence", "evolution"):
    c.analyses[name].enabled = False
  c.analyses.num_images = 2
  c.analyses.diagnostics.train_comparison = True
  c.analyses.diagnostics.comparisons = ("no_clip",)
  work = str(tmp_path / "wd")
  job.run(c, work, train_model=True, write_report=True)
  sub = os.path.join(work, "comparison_ZFNetLowRes_noclip")
  assert os.path.isfile(os.path.join(sub, "results.json"))
  html = open(os.path.join(work, "report", "index.html"), encoding="utf-8").read()
  rows = {}
  for name, where in (("ZFNetLowRes", work), ("ZFNetLowRes without clipping", sub)):
    kernel = np.asarray(weights.load_trained(where)[1]["params"]["conv1"]["kernel"],
                        np.float64)
    rms = np.sqrt(np.mean(kernel ** 2, axis=(0, 1, 2)))
    dead = np.mean(rms < 0.05 * rms.max())
    rows[name] = rms
    cells = [name, f"{dead:.3f}", f"{rms.max():.4g}", f"{np.median(rms):.4g}",
             f"{rms.max() / np.median(rms):.3g}"]
    assert "</td><td>".join(cells[:1] + ["7x7"] + cells[1:]) in html.replace("\n", ""), cells
  assert rows["ZFNetLowRes"].max() <= 0.01 + 1e-6 < rows["ZFNetLowRes without clipping"].max()
  assert "without feature scale clipping (paper Fig. 6 (a))" in html


def test_comparison_runs_of_a_config():
  """Which Fig. 6 comparison runs a run has, where they train and with what config."""
  c = configs.default_config()                       # ZFNet, clipping on
  assert comparisons.kinds(c) == ["counterpart", "no_clip"]
  nc = comparisons.config_of(c, "no_clip")
  assert (nc.model.name, nc.clip_filters, c.clip_filters) == ("ZFNet", False, True)
  assert nc.model.to_dict() == c.model.to_dict() and nc.learning_rate == c.learning_rate
  assert comparisons.config_of(c, "counterpart").model.name == "AlexNet"
  assert comparisons.workdir_of(c, "/w", "no_clip") == "/w/comparison_ZFNet_noclip"
  assert comparisons.workdir_of(c, "/w") == "/w/comparison_AlexNet"
  c.clip_filters = False                             # nothing to compare without clipping
  assert comparisons.kinds(c) == ["counterpart"]
  assert comparisons.workdir_of(c, "/w", "no_clip") is None
  c.analyses.diagnostics.comparisons = ("no_clip", "alexnet")
  with pytest.raises(ValueError, match=r"\['alexnet'\]; allowed: counterpart, no_clip"):
    comparisons.kinds(c)
