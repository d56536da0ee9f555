"""Issue 20's first-layer sweep: band, aliasing and cost measures on hand-built filters
and maps; the sweep's grid and padding; a two-run tiny sweep's record, table and plot."""
import importlib.util
import json
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from zfnet_jax.analyses import spectra
from zfnet_jax.nn import geometry, models
from zfnet_jax.studies import conv1_sweep, sweeps

import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "launch" / "sweep.py")
SWEEP = str(ROOT / "experiments" / "conv1_sweep.py")


def _cos(n, fx, fy=0, amp=1.0):
  """(n, n, 1) amp cos(2 pi (fx x + fy y) / n): fx, fy whole cycles over n px."""
  y, x = np.mgrid[:n, :n]
  return (amp * np.cos(2 * np.pi * (fx * x + fy * y) / n))[..., None]


def _bands_by_dft(f, edges, n):
  """Band shares of one (k, k) filter zero-padded to n, by an explicit DFT sum."""
  k = f.shape[0]
  u = np.arange(n)
  e = np.exp(-2j * np.pi * np.outer(u, np.arange(k)) / n)       # (n, k)
  p = np.abs(e @ f @ e.T) ** 2
  freq = np.where(u < n / 2, u, u - n) / n                      # cycles/px of each bin
  r = np.hypot(freq[:, None], freq[None, :])
  lo, hi = edges
  return np.array([p[r < lo].sum(), p[(r >= lo) & (r < hi)].sum(), p[r >= hi].sum()]) / p.sum()


def test_sinusoid_filters_land_in_their_band():
  """16 px filters, whole cycles: 1/16 c/px is low, 3/16 and the diagonal (2, 2)/16
  (radius 0.177) mid, 2/16 = 1/8 exactly mid (edges belong to the upper band), 6/16 high."""
  filters = np.stack([_cos(16, 1), _cos(16, 3), _cos(16, 2, 2), _cos(16, 2), _cos(16, 6),
                      _cos(16, 1) + _cos(16, 6, amp=2.0)])
  got = spectra.band_fractions(filters)
  expected = [[1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1],
              [0.2, 0, 0.8]]                                  # energies a^2 : b^2 = 1 : 4
  np.testing.assert_allclose(got, expected, atol=1e-12)
  assert spectra.BAND_EDGES == (0.125, 0.25)              # 1/(2*4), 1/(2*2)


def test_band_fractions_match_an_explicit_dft_with_padding():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(7, 7, 1, 3))
  got = spectra.band_fractions(np.moveaxis(kernel, -1, 0), fft_size=32)
  for i in range(3):
    np.testing.assert_allclose(got[i], _bands_by_dft(kernel[..., 0, i], (0.125, 0.25), 32),
                               atol=1e-10)
  with pytest.raises(ValueError, match=r"band edges \(0.3, 0.2\)"):
    spectra.band_fractions(kernel[None, ..., 0], edges=(0.3, 0.2))


def test_stride4_grid_raises_the_grid_energy_by_hand():
  """32 px: a lattice of ones every 4 px (64 ones, mean 1/16) has mean-removed energy
  64 (15/16)^2 + 960 (1/16)^2 = 60, all in its 15 non-DC bins (u, v multiples of 8,
  equal power).  A cosine of 3 cycles has energy a^2 1024 / 2, none on the grid."""
  y, x = np.mgrid[:32, :32]
  lattice = ((y % 4 == 0) & (x % 4 == 0)).astype(float)[..., None]
  smooth = _cos(32, 3, amp=np.sqrt(120 / 1024))               # energy 60
  got = spectra.grid_energy(np.stack([smooth, lattice, smooth + lattice]), 4)
  np.testing.assert_allclose(got, [0.0, 1.0, 0.5], atol=1e-12)
  # At stride 2 the grid is (0, 1/2), (1/2, 0), (1/2, 1/2): 3 of the lattice's 15 bins.
  np.testing.assert_allclose(spectra.grid_energy(lattice[None], 2), [0.2], atol=1e-12)
  np.testing.assert_allclose(spectra.grid_energy(lattice[None], 1), [0.0], atol=1e-12)
  m = spectra.grid_mask(32, 4)
  assert m.sum() == 15 and m[8, 24] and not m[0, 0] and not m[4, 0]
  with pytest.raises(ValueError, match="stride 0"):
    spectra.grid_mask(32, 0)


def test_aliased_fraction_of_hand_built_filters():
  """On an impulse image the response spectrum is the filter's: a 3/16 c/px cosine is
  kept by stride 2 (Nyquist 1/4) and folded by stride 4 (1/8); low + 2 x high folds 4/5
  at stride 2."""
  delta = np.zeros((1, 16, 16, 1))
  delta[0, 0, 0] = 1
  mid = _cos(16, 3)[..., None]                                   # (16, 16, 1, 1)
  mixed = (_cos(16, 1) + _cos(16, 6, amp=2.0))[..., None]
  for stride, want in ((1, 0.0), (2, 0.0), (4, 1.0)):
    assert spectra.aliased_fraction(mid, delta, stride) == pytest.approx(want, abs=1e-12)
  assert spectra.aliased_fraction(mixed, delta, 2) == pytest.approx(0.8, abs=1e-12)
  y, x = np.mgrid[:16, :16]
  checker = ((-1.0) ** (x + y))[..., None, None]                # (1/2, 1/2): the Nyquist bin
  assert spectra.aliased_fraction(checker, delta, 1) == 0.0
  assert spectra.aliased_fraction(checker, delta, 2) == pytest.approx(1.0, abs=1e-12)


def test_aliased_fraction_matches_a_looped_correlation():
  """Random 2-channel filters and 11 images: the stride-1 periodic cross-correlation by loops,
  then its energy outside max(|u|, |v|) < 1/(2s) (mean removed) over all of it."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(11, 12, 12, 2))          # more than one chunk of 8 images
  w = rng.normal(size=(5, 5, 2, 4))
  for s in (2, 3, 4):
    assert spectra.aliased_fraction(w, x, s) == pytest.approx(_aliased_by_loops(w, x, s),
                                                               rel=1e-10)


def _aliased_by_loops(w, x, s):
  """The stride-1 periodic cross-correlation of images x (N, n, n, C) with filters w
  (k, k, C, F) by loops, mean removed; its energy outside max(|u|, |v|) < 1/(2s) over
  all of it."""
  n, k = x.shape[1], w.shape[0]
  resp = np.zeros(x.shape[:3] + (w.shape[-1],))
  for a in range(k):
    for b in range(k):
      resp += np.einsum("nijc,cf->nijf", np.roll(x, (-a, -b), axis=(1, 2)), w[a, b])
  resp -= resp.mean((1, 2), keepdims=True)
  p = np.abs(np.fft.fft2(resp, axes=(1, 2))) ** 2
  f = np.abs(np.fft.fftfreq(n))
  out = np.maximum(f[:, None], f[None, :]) >= 1 / (2 * s) - 1e-12
  return p[:, out].sum() / p.sum()


def test_layer_costs_by_hand():
  """ZFNet at 224: conv1 7x7x3x96 (+96), 110^2 outputs; conv2 5x5x96x256 (+256), 26^2;
  AlexNet conv1 11x11x3x96, 55^2 outputs."""
  zf = spectra.layer_costs(models.ZFNet(), 224, 3)
  assert zf["conv1"] == {"params": 14208, "flops": 2 * 7 * 7 * 3 * 96 * 110 ** 2}
  assert zf["conv2"] == {"params": 614656, "flops": 2 * 5 * 5 * 96 * 256 * 26 ** 2}
  alex = spectra.layer_costs(models.AlexNet(), 224, 3, ("conv1",))
  assert alex == {"conv1": {"params": 34944, "flops": 210_830_400}}
  with pytest.raises(ValueError, match="conv9"):
    spectra.layer_costs(models.ZFNet(), 224, 3, ("conv9",))


def test_first_layer_measures_zero_filter_is_dead():
  """A ZFNetLowRes at 28 px with conv1 filter 2 set to zero: dead 1/4; bands over the 3
  live filters; geometry and costs by hand (conv1 7x7/2 -> 12, conv2 5x5/2 -> 2)."""
  model = models.ZFNetLowRes(num_classes=3, conv_features=(4, 4, 4, 4, 4), fc_features=8)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), np.zeros((1, 28, 28, 1)))
  rng = np.random.default_rng(0)                  # random weights without compiling init
  params = jax.tree_util.tree_map(lambda a: rng.normal(0, 0.1, a.shape).astype(np.float32),
                                  shapes["params"])
  kernel = np.array(params["conv1"]["kernel"])
  kernel[..., 2] = 0.0
  params["conv1"] = {**params["conv1"], "kernel": kernel}
  images = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (4, 28, 28, 1))) * 50
  m = spectra.first_layer_measures(model, {"params": params}, images, fft_size=32)
  np.testing.assert_array_equal(m["dead"], [False, False, True, False])
  assert m["dead_fraction"] == 0.25
  live = [_bands_by_dft(kernel[..., 0, i], (0.125, 0.25), 32) for i in (0, 1, 3)]
  np.testing.assert_allclose([m["filter_low"], m["filter_mid"], m["filter_high"]],
                             np.mean(live, 0), atol=1e-10)
  assert (m["kernel_size"], m["stride"], m["pad"], m["conv1_out"]) == (7, 2, 0, 12)
  assert (m["conv1_params"], m["conv1_flops"]) == (7 * 7 * 4 + 4, 2 * 7 * 7 * 4 * 12 ** 2)
  assert (m["conv2_params"], m["conv2_flops"]) == (5 * 5 * 16 + 4, 2 * 5 * 5 * 16 * 2 ** 2)
  # The aliasing columns, at conv1's stride 2 (at stride 1 all three would be 0).
  assert m["conv1_aliased"] == pytest.approx(
      _aliased_by_loops(np.asarray(kernel, np.float64), images.astype(np.float64), 2), rel=1e-6)
  proj = np.asarray(m["projections"], np.float64)   # (M, 28, 28, 1): mean over colour
  p = np.abs(np.fft.fft2(proj[..., 0] - proj[..., 0].mean((1, 2), keepdims=True))) ** 2
  p /= np.maximum(p.sum((1, 2), keepdims=True), 1e-300)   # a map with no signal: 0
  grid = p[:, ::14, ::14].sum((1, 2)) - p[:, 0, 0]   # bins (i, j) * 28 / 2, DC aside
  assert m["aliasing_grid"] == pytest.approx(grid.mean(), rel=1e-6) and grid.mean() > 0
  f = np.fft.fftfreq(28)
  high = np.hypot(f[:, None], f[None, :]) >= 0.25
  assert m["aliasing_mean"] == pytest.approx(p[:, high].sum(1).mean(), rel=1e-6)
  assert m["conv1_aliased"] > 0 and m["aliasing_mean"] > 0


def test_matched_pad_by_hand():
  """At 28 px the 7x7/2 baseline gives 12: 9/2 needs pad 1, 11/2 pad 2; stride 4 reaches
  8 at most (7/4 pad 2, 9/4 pad 3, 11/4 pad 4); stride 1 cannot shrink (pad 0)."""
  got = {(k, s): conv1_sweep.matched_pad(28, k, s)
         for k, s in ((5, 1), (7, 2), (9, 2), (11, 2), (7, 4), (9, 4), (11, 4), (5, 2))}
  assert got == {(5, 1): 0, (7, 2): 0, (9, 2): 1, (11, 2): 2, (7, 4): 2, (9, 4): 3,
                 (11, 4): 4, (5, 2): 0}
  assert geometry.conv_out(28, 11, 4, 4)[0] == 8 and geometry.conv_out(28, 11, 2, 2)[0] == 12


def test_dry_run_lists_the_grid():
  out = subprocess.run([sys.executable, SCRIPT, f"--sweep={SWEEP}", "--root=/r", "--dry_run",
                        "--python=py"], cwd=ROOT, capture_output=True, text=True,
                       check=True, timeout=120).stdout.strip().splitlines()
  grid = [(3, 1, 0), (5, 1, 0), (7, 1, 0), (5, 2, 0), (7, 2, 0), (9, 2, 1), (11, 2, 2),
          (7, 4, 2), (9, 4, 3), (11, 4, 4)]
  assert out == [
      f"py -m zfnet_jax.main --config=experiments/conv1_sweep.py --workdir=/r/conv1_kernel={k}"
      f"__conv1_stride={s}__conv1_pad={p} --config.model.conv1_kernel={k} "
      f"--config.model.conv1_stride={s} --config.model.conv1_pad={p}" for k, s, p in grid]
  runs, _ = sweeps.load_sweep(SWEEP + ":imagenette")
  assert len(runs) == 30 and runs[0]["config"] == "experiments/conv1_sweep.py:imagenette"
  assert {r["seed"] for r in runs} == {0, 1, 2}
  assert {(r["model.conv1_kernel"], r["model.conv1_pad"]) for r in runs
          if r["model.conv1_stride"] == 4} == {(7, 2), (9, 3), (11, 4)}   # 224 px: conv1 57
  with pytest.raises(ValueError, match="'cifar'"):
    sweeps.load_sweep(SWEEP + ":cifar")


def test_sweep_configs_per_variant(monkeypatch):
  """The offline config is native 28 px Fashion-MNIST without report; the GPU ones 224 px."""
  monkeypatch.chdir(ROOT)
  spec = importlib.util.spec_from_file_location("conv1_sweep_file", SWEEP)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  want = {"": ("fashion_mnist_idx", 28, 28), "imagenette": ("imagenette", 256, 224),
          "imagenet": ("imagenet2012", 256, 224)}
  for variant, (name, resize, crop) in want.items():
    c = module.get_config(variant)
    assert (c.dataset.name, c.dataset.resize_size, c.dataset.crop_size) == (name, resize, crop)
    assert not c.report.enabled and c.model.conv1_kernel is None
    models.validate(c.model)
  assert module.get_config("").num_epochs == module.EPOCHS


@pytest.mark.slow      # two training processes and the collection: ~1 min on 2 idle cores
def test_two_run_tiny_sweep_writes_record_table_and_plot(tmp_path):
  data = tmp_path / "fmnist"
  helpers.make_fmnist(str(data), n_train=32, n_test=8)
  cfg = tmp_path / "tiny_cfg.py"
  cfg.write_text(textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {str(ROOT / "tests")!r})
      import helpers
      def get_config():
        c = helpers.small_config({str(data)!r}, steps=2)
        c.dataset.resize_size = c.dataset.crop_size = 28
        c.checkpoint_every_steps = 100
        return c
  """))
  sweep = tmp_path / "s.py"
  sweep.write_text(textwrap.dedent(f"""
      from zfnet_jax.studies import conv1_sweep
      CONFIG = {str(cfg)!r}
      def get_sweep():
        return [{{"model.conv1_kernel": 7, "model.conv1_stride": 2}},
                {{"model.conv1_kernel": 11, "model.conv1_stride": 4, "model.conv1_pad": 4}}]
      def collect(planned, root, command):
        return conv1_sweep.collect(planned, root, command, num_images=8)
  """))
  root = tmp_path / "runs"
  proc = subprocess.run([sys.executable, SCRIPT, f"--sweep={sweep}", f"--root={root}",
                         "--parallel=2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  record = json.loads((root / "conv1_measures.json").read_text())
  assert [r["name"] for r in record["runs"]] == [
      "conv1_kernel=7__conv1_stride=2", "conv1_kernel=11__conv1_stride=4__conv1_pad=4"]
  m0, m1 = (r["measures"] for r in record["runs"])
  assert (m0["kernel_size"], m0["stride"], m0["conv1_out"], m0["conv1_params"]) == (7, 2, 12, 200)
  assert (m1["kernel_size"], m1["stride"], m1["conv1_out"], m1["conv1_params"]) == (11, 4, 8, 488)
  assert m0["images_per_second"] > 0 and "sweep.py" in record["command"]
  results = json.loads((root / "conv1_kernel=7__conv1_stride=2" / "results.json").read_text())
  assert record["runs"][0]["results"]["top1_error"] == results["top1_error"]
  report = root / "conv1_report"
  for png in ("conv1_vs_stride.png", "conv1_filters.png"):
    assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  page = (report / "index.html").read_text()
  assert "7x7/2" in page and "11x11/4" in page and "conv1_vs_stride.png" in page
  table = conv1_sweep.readme_table(str(root / "conv1_measures.json"))
  lines = table.splitlines()
  assert lines[2].startswith("| 7x7/2 | 1 | 0 | 12 | " + f"{results['top1_error']:.4f} |")
  assert lines[3].startswith("| 11x11/4 | 1 | 4 | 8 |") and len(lines) == 4
  assert table == (report / "conv1_table.md").read_text()


def _entry(k, s, seed, err, mid, ips):
  m = dict(kernel_size=k, stride=s, pad=0, conv1_out=12, dead_fraction=0.0, filter_low=0.5,
           filter_mid=mid, filter_high=0.5 - mid, conv1_aliased=0.1, aliasing_grid=0.01,
           aliasing_mean=0.2, conv1_params=100, conv1_flops=2_000_000, conv2_params=12_345,
           conv2_flops=500_000, images_per_second=ips, num_images=64)
  return {"name": f"{k}/{s}/{seed}", "seed": seed, "measures": m,
          "results": {"top1_error": err, "top1_error_10crop": err - 0.01}}


def test_readme_table_from_a_record(tmp_path):
  """Rows per (kernel, stride) sorted by stride then kernel; two seeds -> mean ± std
  (population std: 0.10 and 0.12 -> 0.1100 ± 0.0100) where they differ, the value where
  they agree; the README between the markers is replaced and nothing else."""
  record = {"runs": [_entry(11, 4, 0, 0.2, 0.1, 900), _entry(7, 2, 0, 0.10, 0.3, 1000),
                     _entry(7, 2, 1, 0.12, 0.4, 1200)]}
  path = tmp_path / "conv1_measures.json"
  path.write_text(json.dumps(record))
  lines = conv1_sweep.readme_table(str(path)).splitlines()
  assert lines[0].startswith("| conv1 | runs | pad | conv1 out | top-1 err | top-1 err 10-crop |")
  assert lines[2] == ("| 7x7/2 | 2 | 0 | 12 | 0.1100 ± 0.0100 | 0.1000 ± 0.0100 | 0.500 | "
                      "0.350 ± 0.050 | 0.150 ± 0.050 | 0.000 | 0.100 | 0.0100 | 0.200 | 100 | "
                      "2.00 | 12,345 | 0.50 | 1100 ± 100 |")
  assert lines[3].startswith("| 11x11/4 | 1 | 0 | 12 | 0.2000 | 0.1900 | 0.500 | 0.100 |")
  start, end = conv1_sweep.TABLE_MARKERS
  readme = f"# R\n\nbefore\n{start}\nold table\n{end}\nafter\n"
  (tmp_path / "README.md").write_text(readme)
  out = subprocess.run([sys.executable, str(ROOT / "launch" / "conv1_table.py"), str(path),
                        str(tmp_path / "README.md")], capture_output=True, text=True,
                       timeout=120, check=False)
  assert out.returncode == 0, out.stderr
  text = (tmp_path / "README.md").read_text()
  assert text == readme.replace("\nold table\n", "\n" + "\n".join(lines) + "\n")
  with pytest.raises(ValueError, match="no table markers"):
    conv1_sweep.replace_table("no markers", "| x |")
