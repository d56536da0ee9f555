r"""Is a 7x7/2 first layer better than 11x11/4, and why?  One sweep of conv1.

  python launch/sweep.py --sweep=experiments/conv1_sweep.py --root=workdirs/conv1 --dry_run
  python launch/sweep.py --sweep=experiments/conv1_sweep.py --root=workdirs/conv1
  python launch/sweep.py --sweep=experiments/conv1_sweep.py:imagenette --root=workdirs/conv1_in \
      -- --config.dataset.data_dir=$HOME/tensorflow_datasets          # GPU; or :imagenet

The same network and recipe, trained once per first-layer (kernel, stride) of
``GRID`` with the same seed(s) and budget; everything else as in the variant's
config (this file is also that config: ``get_config(variant)``).  After the
runs, ``collect`` (``zfnet_jax.studies.conv1_sweep``) measures every run and writes
<root>/conv1_measures.json and <root>/conv1_report/index.html: test error,
filter spectrum per band, dead filters, aliasing, parameters and FLOPs of conv1
and conv2, images/s.

Padding: conv1's pad is the one in 0..(k-1)//2 whose output side is closest to
the 7x7/2 run's (``conv1_sweep.matched_pad``).  At 28 px: every stride-2 run
has conv1 12 (13 for 5x5/2), every stride-4 run 8, the stride-1 runs 26, 24, 22: a
stride cannot be undone by padding, so later layers keep their sizes only
within a stride (the FLOPs columns show what the others cost).

Resolution (offline, "" variant): Fashion-MNIST at its native 28 px, not the
quickstart's 64 px nor a larger 112 px.  Upsampling 28 -> S px leaves no image
content above 14/S cycles/px (0.22 at 64, 0.125 at 112).  The question is
about frequencies relative to the stride's Nyquist 1/(2s) (0.25 at stride 2,
0.125 at stride 4): at 112 px nothing a stride-4 layer could fold back is in
the images, so 11x11/4 cannot alias by construction, and at 64 px stride 2
cannot; the filters' energy above 14/S is never constrained by the data
either.  A larger input would decide the question in advance.  At 28 px the
images fill the band to Nyquist, as ImageNet's downsampled photos do at 224,
so the first layer faces the paper's trade-off in the same cycles/px.  The
price: the network after conv1 is small (7x7/2: conv2 2x2, conv3-5 1x1), so
test error measures the first layer through a short network; the filter and
aliasing measures do not depend on that.

Budget (offline): one seed, ``EPOCHS`` epochs on all 60k training images, the
quickstart's recipe (Adam 1e-3, cosine, weight decay 2e-3, batch 128, conv1
initialised near zero so its spectrum is what training put there), no report,
no comparison model; evaluation on the 10k test images (centre and 10 crops;
at crop = resize the 10 crops are the centre and its mirror, 5 times each).
The GPU variants run each geometry with ``GPU_SEEDS``.
"""
import os

from zfnet_jax import configs
from zfnet_jax.studies import conv1_sweep, sweeps

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = "experiments/conv1_sweep.py"
GRID = ((3, 1), (5, 1), (7, 1), (5, 2), (7, 2), (9, 2), (11, 2), (7, 4), (9, 4), (11, 4))
EPOCHS = 4.0
GPU_SEEDS = (0, 1, 2)
INPUT_SIZE = {"": 28, "imagenette": 224, "imagenet": 224}


def _config_file(name):
  return configs.load_file(os.path.join(HERE, f"{name}.py"), name)


def _check(variant: str) -> str:
  variant = variant.strip()
  if variant not in INPUT_SIZE:
    raise ValueError(f"unknown variant {variant!r} of experiments/conv1_sweep.py; allowed: "
                     + ", ".join(repr(v) for v in INPUT_SIZE))
  return variant


def get_config(variant: str = ""):
  """"": the quickstart at native 28 px for EPOCHS; "imagenette" / "imagenet": ZFNet with
  the paper's recipe (experiments/zfnet.py) at 224 px (imagenette: 30 epochs)."""
  variant = _check(variant)
  if variant:
    c = _config_file("zfnet").get_config("")
    if variant == "imagenette":
      c.dataset.name = "imagenette"
      c.num_epochs = 30.0
  else:
    c = _config_file("quickstart").get_config("")
    c.dataset.resize_size = c.dataset.crop_size = INPUT_SIZE[""]
    # The model's own first layer (7x7/2) unless a run sets it (the quickstart's 7x7/1 is
    # for its 32 px input).
    c.model.conv1_kernel = c.model.conv1_stride = c.model.conv1_pad = None
    c.num_epochs = EPOCHS
    c.evolution_epochs = ()
    c.checkpoint_every_steps = 100_000   # the final checkpoint only
    c.analyses.diagnostics.train_comparison = False
    c.transfer.in_report = False
  c.report.enabled = False               # collect() measures every run instead
  return c


def get_sweep(variant: str = ""):
  variant = _check(variant)
  size = INPUT_SIZE[variant]
  runs = [{"model.conv1_kernel": k, "model.conv1_stride": s,
           "model.conv1_pad": conv1_sweep.matched_pad(size, k, s)} for k, s in GRID]
  if variant:
    runs = sweeps.product([{"config": f"{CONFIG}:{variant}"}], runs,
                          [{"seed": seed} for seed in GPU_SEEDS])
  return runs


def collect(planned, root, command=""):
  return conv1_sweep.collect(planned, root, command)
