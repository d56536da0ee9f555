"""Default configuration shared by every experiment in ``experiments/``.

Experiment files call ``default_config()`` and override a few fields.  Every
field the library reads is declared here, so ``--config.x=y`` with a typo or a
value of the wrong type fails at once (configs are locked by ``main.py``).
"""
from __future__ import annotations

import collections
import importlib.util
import os
import re
import sys
import types

import ml_collections
from absl import flags


def load_file(path: str, name: str = "config_file") -> types.ModuleType:
  """The Python file at ``path`` (an experiment config or a sweep file) as a module."""
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


EXPERIMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "experiments")


def experiment_names() -> list[str]:
  """The names of the shipped experiment files (``quickstart``, ``zfnet``, ...)."""
  return sorted(f[:-3] for f in os.listdir(EXPERIMENTS)
                if f.endswith(".py") and not f.startswith("_"))


def experiment_path(spec: str) -> str:
  """A config argument as a file path: ``spec`` itself where that file exists, else a
  shipped experiment named ``NAME``, ``NAME.py`` or ``experiments/NAME.py``.  A
  ``:variant`` suffix is kept.  ValueError naming the shipped names otherwise."""
  path, sep, variant = spec.partition(":")
  if not os.path.isfile(path):
    name = os.path.basename(path)
    name = name[:-3] if name.endswith(".py") else name
    shipped = os.path.join(EXPERIMENTS, name + ".py")
    if os.path.dirname(path) not in ("", "experiments"):
      raise ValueError(f"config file {path!r} does not exist")
    if not os.path.isfile(shipped):
      raise ValueError(f"config {path!r} is neither a file nor a shipped experiment; "
                       f"shipped: {', '.join(experiment_names())}")
    path = shipped
  return path + sep + variant


def config_argv(argv: list[str]) -> list[str]:
  """``argv`` with each ``--config=SPEC`` as ``--config=experiment_path(SPEC)``."""
  return [("--config=" + experiment_path(a.split("=", 1)[1])
           if i and a.startswith(("--config=", "-config=")) else a)
          for i, a in enumerate(argv)]


def data_file(path: str) -> str:
  """``path`` where it exists, else the shipped file of that name in ``experiments/``
  (e.g. a box file a config names relative to the repository)."""
  if os.path.exists(path) or os.path.dirname(path) not in ("", "experiments"):
    return path
  shipped = os.path.join(EXPERIMENTS, os.path.basename(path))
  return shipped if os.path.exists(shipped) else path


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # -- model (zfnet_jax.models) ----------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.name = "ZFNet"              # ZFNet | AlexNet | ZFNetLowRes | AlexNetLowRes, or for
                                       # imported weights TorchvisionAlexNet | VGG16
  c.model.conv_features = (96, 256, 384, 384, 256)
  c.model.fc_features = 4096
  c.model.removed = ()                 # Table 3: any of conv3, conv4, fc6, fc7
  c.model.contrast_norm = True
  # Contrast normalisation: b = a / (k + alpha' * sum of a^2 over n neighbouring maps)^beta,
  # alpha' = alpha (Krizhevsky 2012's formula, the default) or alpha / n (lrn_alpha_over_n:
  # cuda-convnet's cmrnorm, which the paper's code most likely used; Caffe, PyTorch).
  c.model.lrn_k = 2.0
  c.model.lrn_n = 5
  c.model.lrn_alpha = 1e-4
  c.model.lrn_beta = 0.75
  c.model.lrn_alpha_over_n = False
  c.model.dropout_rate = 0.5
  c.model.kernel_init_std = 1e-2       # paper: weights 1e-2; None -> He normal
  c.model.conv1_init_std = ml_collections.config_dict.placeholder(float)  # None: kernel_init_std
  # The first layer's geometry (None: the model's own, ZFNet 7/2/0, AlexNet 11/4/0); the
  # layer table, receptive fields and parameter counts follow (cuda-convnet size rules).
  c.model.conv1_kernel = ml_collections.config_dict.placeholder(int)
  c.model.conv1_stride = ml_collections.config_dict.placeholder(int)
  c.model.conv1_pad = ml_collections.config_dict.placeholder(int)
  c.model.dtype = "float32"            # bfloat16 for mixed precision on GPU/TPU

  # -- data (zfnet_jax.input_pipeline) ---------------------------------------
  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "imagenet2012"      # a TFDS name, "fashion_mnist_idx", or "folder"
  c.dataset.data_dir = ""              # TFDS data_dir ("" = TFDS default)
  c.dataset.manual_dir = ""            # ImageNet tarballs ("" = <data_dir>/downloads/manual)
  c.dataset.folder = ""                # root of class sub-folders for name="folder"
  c.dataset.fashion_mnist_dir = "/usr/share/datasets/fashion-mnist"
  c.dataset.train_split = "train"
  c.dataset.eval_split = "validation"
  c.dataset.resize_size = 256          # smaller side -> this, centre crop this
  c.dataset.crop_size = 224            # random crops for training, model input size
  c.dataset.random_flip = True
  # Imported weights only (pretrained=*.pth|*.pt|*.safetensors): the network was trained on
  # (pixels * pixel_scale - mean) / std per RGB channel, pixels 0..255 (torchvision: 1/255,
  # (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).  () = our models: minus the training mean.
  c.dataset.pixel_scale = 1.0
  c.dataset.mean = ()
  c.dataset.std = ()
  c.dataset.on_corrupt = "skip"        # folder datasets: "skip" (and count) or "stop"
  c.dataset.shuffle_buffer = 10_000
  c.dataset.prefetch = 2
  # (training helper) subsets, mean, folder split
  c.dataset.max_train_examples = -1    # > 0: use only the first N training examples
  c.dataset.max_eval_examples = -1     # > 0: evaluate on the first N examples only
  c.dataset.mean_max_examples = -1     # > 0: per-pixel mean over the first N training images
  c.dataset.folder_eval_fraction = 0.1 # folder without an <eval_split>/ sub-folder: hold out this

  # -- optimisation (zfnet_jax.train) ----------------------------------------
  c.batch_size = 128                   # global batch, divided over all devices
  c.num_epochs = 70.0
  c.num_train_steps = -1               # > 0 overrides num_epochs
  c.optimizer = "sgd"                  # sgd (momentum) | adam
  c.learning_rate = 1e-2
  c.momentum = 0.9
  # paper: cuda-convnet's v <- 0.9 v - lr (g + wd w), w <- w + v, as both papers trained
  # (the rate inside the velocity: a x0.1 drop lets the old velocity fade); pytorch:
  # v <- 0.9 v + g + wd w, w <- w - lr v.  The same at a constant rate.
  c.momentum_form = "paper"
  c.weight_decay = 5e-4
  c.schedule = "plateau"               # constant | step | cosine | plateau
  c.step_epochs = (30, 60)             # for schedule="step": x0.1 at these epochs
  c.warmup_epochs = 0.0
  c.plateau_patience = 2               # evals without improvement before x0.1
  c.plateau_factor = 0.1
  c.clip_filters = True                # feature scale clipping (paper Sec. 3)
  c.clip_radius = 0.1                  # max RMS of a conv filter
  c.eval_batch_size = 256
  c.eval_every_epochs = 1.0
  c.ten_crop_eval = True
  # Divergence guard (train): stop (exit 1, last good checkpoint kept) when a logged
  # training loss (mean since the previous row) exceeds max_loss, or stays above
  # divergence_factor x max(first step's loss, ln num_classes) for divergence_patience
  # consecutive rows; no checkpoint is saved while the loss is above that level. 0 = off.
  c.max_loss = 1e4
  c.divergence_factor = 100.0
  c.divergence_patience = 3

  # -- checkpoints, logging --------------------------------------------------
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.evolution_epochs = (1, 2, 5, 10, 20, 30, 40, 64)  # kept for Fig. 4; scaled to the run
  c.evolution_reference_epochs = 70.0  # evolution_epochs are for a run this long (paper: 70);
                                       # scaled by num_epochs / this. 0 = use them as given
  c.restore_path = ""                  # explicit checkpoint to start from ("" = resume workdir)
  c.pretrained = ""                    # report/visualize without training: "quickstart" (shipped
                                       # in the package), a folder of launch/ship_weights.py, or a
                                       # torchvision state dict (.pth/.pt/.safetensors; model.name
                                       # TorchvisionAlexNet | VGG16, see experiments/vgg16.py)
  c.log_every_steps = 100
  c.distributed = False                # call jax.distributed.initialize()
  # CPU only, command line only: split the CPU into this many JAX host devices before JAX
  # starts (1 = one device, the default).  Can be faster, but on a loaded machine XLA's
  # in-process all-reduce between them can abort the run (zfnet_jax/xla.py says why).
  c.cpu_host_devices = 1
  # A warning line when no training step has finished for this long (0 = never).
  c.stall_warning_seconds = 60.0

  # -- report (zfnet_jax.report.report) ---------------------------------------------
  c.report = ml_collections.ConfigDict()
  c.report.enabled = True              # write <workdir>/report after training
  c.report.split = ""                  # "" = dataset.eval_split
  c.report.layers = ("conv1", "conv2", "conv3", "conv4", "conv5")
  c.report.num_maps = 16               # feature maps shown per layer (-1 = all)
  c.report.top_k = 9
  c.report.rule = "deconvnet"          # deconvnet | guided | backprop
  c.report.max_examples = 10_000       # examples scanned for the top-k (-1 = all)
  c.report.batch_size = 256
  c.report.chunk_size = 64             # projections per batched VJP
  c.report.distinct_images = True      # Fig. 2: top-k images (each at its strongest unit), as
                                       # the paper; False: top-k units (an image may repeat)

  # -- visualize (zfnet_jax.report.visualize): --mode=visualize --images=PATH -------
  c.visualize = ml_collections.ConfigDict()
  c.visualize.layers = ()              # () = report.layers
  c.visualize.num_maps = 9             # strongest maps of each layer shown per image
  c.visualize.occlusion = True         # Fig. 7 panels for the top class (analyses.occlusion.*)

  # -- analyses (zfnet_jax.analyses): Sec. 4, Figs. 4-7, Table 1 ------------
  # Added to the report by report.write_report; sizes in pixels of the model
  # input; -1 = a default scaled from the paper's 224x224 to dataset.crop_size.
  c.analyses = ml_collections.ConfigDict()
  c.analyses.enabled = True
  c.analyses.split = ""                # images analysed ("" = dataset.eval_split)
  c.analyses.num_images = 4            # first N examples of the split (occlusion, invariance)
  c.analyses.image_ids = ()            # or exactly these examples (index in the split)
  c.analyses.batch_size = 64           # forward passes per jitted batch
  c.analyses.walkthrough = ml_collections.ConfigDict()
  c.analyses.walkthrough.enabled = True
  c.analyses.walkthrough.layers = ()   # Fig. 1 stages for one unit each (() = every conv)
  c.analyses.occlusion = ml_collections.ConfigDict()
  c.analyses.occlusion.enabled = True
  c.analyses.occlusion.layer = "conv5"  # map (b)/(c) is this layer's strongest map
  c.analyses.occlusion.size = -1       # square side (-1: crop_size / 4, 56 at 224)
  c.analyses.occlusion.stride = -1     # step between square centres (-1: crop_size / 28, 8 at 224)
  c.analyses.occlusion.fill = -1.0     # square's pixel value 0..255 (-1: training mean = grey)
  c.analyses.occlusion.chunk_size = 128  # occluded images per forward pass (bounds memory)
  c.analyses.occlusion.companion_examples = 2000  # (c): the map's top 9 in other images among
                                                 # the first N of report.split (0 = off)
  c.analyses.invariance = ml_collections.ConfigDict()
  c.analyses.invariance.enabled = True
  c.analyses.invariance.layers = ("conv1", "fc7")
  c.analyses.invariance.max_shift = -1.0  # vertical shift range +-px (-1: 60 at 224, scaled)
  c.analyses.invariance.num_shifts = 13
  c.analyses.invariance.max_scale = 1.8
  c.analyses.invariance.num_scales = 9
  c.analyses.invariance.rotation_step = 10.0  # degrees, 0..360 exclusive
  c.analyses.correspondence = ml_collections.ConfigDict()
  c.analyses.correspondence.enabled = True
  c.analyses.correspondence.boxes = "experiments/correspondence_fashion_mnist.json"
  c.analyses.correspondence.layers = ("conv5", "fc7")
  c.analyses.correspondence.repeats = 10   # random-box control: boxes drawn (pairs pooled)
  c.analyses.evolution = ml_collections.ConfigDict()
  c.analyses.evolution.enabled = True
  c.analyses.evolution.layers = ("conv1", "conv2", "conv3", "conv4", "conv5")
  c.analyses.evolution.maps = ()       # channels shown in every layer; () = num_maps random
  c.analyses.evolution.num_maps = 6    # maps per layer (seeded by config.seed), as the paper
  c.analyses.evolution.max_examples = 10_000  # first N training images searched (-1 = all, as
                                       # the paper); one pass serves every checkpoint
  c.analyses.evolution.tensorboard_every_steps = 0  # >0: panels as TensorBoard images
  c.analyses.evolution.tensorboard_maps = (0, 1, 2, 3)
  c.analyses.diagnostics = ml_collections.ConfigDict()
  c.analyses.diagnostics.enabled = True
  c.analyses.diagnostics.dead_threshold = 0.05  # dead: filter RMS < this x the largest RMS
  c.analyses.diagnostics.fft_size = 32          # filters zero-padded to this for spectra
  c.analyses.diagnostics.high_freq = 0.25       # cycles/px: "high" spatial frequency
  c.analyses.diagnostics.train_comparison = False  # train the comparison runs below
  c.analyses.diagnostics.comparisons = ("counterpart", "no_clip")  # the other model
  # (AlexNet<->ZFNet), and this model without feature scale clipping (Fig. 6(a))
  c.analyses.diagnostics.comparison_epochs = -1.0  # their epochs (-1: same as this run)
  c.analyses.diagnostics.comparison_workdir = ""   # counterpart's; "" = <workdir>/
                                                   # comparison_<model> (no_clip: _noclip)

  # -- transfer (zfnet_jax.transfer): Sec. 5.2 transfer and Table 7 probes ----
  c.transfer = ml_collections.ConfigDict()
  c.transfer.source_workdir = ""       # trained model to transfer ("" = the run's own workdir)
  c.transfer.in_report = False         # write_report computes the tables if missing and shows them
  c.transfer.dataset = "digits"        # digits (scikit-learn's, offline) | caltech101 | caltech256 | voc2012
  c.transfer.data_dir = ""             # TFDS data_dir for caltech101 / voc2012 ("" = default);
                                       # caltech256: its 256_ObjectCategories folder (no TFDS builder)
  c.transfer.train_per_class = (15, 30)  # training images per class (single-label datasets)
  c.transfer.test_per_class = 50       # at most this many test images per class
  c.transfer.folds = 5                 # random train/test splits; mean +- std over them
  c.transfer.layers = (1, 2, 3, 4, 5, 6, 7)  # probed layers (outputs: norm1 norm2 conv3 conv4 pool5 fc6 fc7)
  c.transfer.pool_grid = 3             # conv outputs: max over a g x g grid of regions
  c.transfer.classifiers = ("svm", "softmax")  # LinearSVC and multinomial logistic regression
  c.transfer.svm_c = 0.1               # LinearSVC C (on standardised features)
  c.transfer.softmax_c = 0.1           # LogisticRegression C (inverse L2 strength)
  c.transfer.batch_size = 128          # feature extraction batch
  c.transfer.scratch_steps = 300       # from-scratch control: SGD steps (0 = skip the control)
  c.transfer.scratch_batch_size = 32
  c.transfer.scratch_flip = True       # random horizontal flips (off for digits)
  c.transfer.scratch_learning_rate = 1e-3  # 1e-2 collapses to one class on 0..255 inputs in 300 steps
  return c


def from_saved(saved: dict) -> ml_collections.ConfigDict:
  """A config saved as JSON (a run's ``config.json``) over the current defaults.

  Keys the defaults do not have are kept; JSON lists become tuples.
  """
  config = default_config()
  if "momentum_form" not in saved:   # saved before the option: trained with PyTorch's form
    saved = {**saved, "momentum_form": "pytorch"}

  def merge(c, d):
    for k, v in d.items():
      if k in c and isinstance(c[k], ml_collections.ConfigDict) and isinstance(v, dict):
        merge(c[k], v)
      else:
        c[k] = tuple(v) if isinstance(v, list) else v
  with config.unlocked():
    merge(config, saved)
  return config


def imagenet_variant(model_name: str, variants: dict, variant: str, where: str):
  """The paper's ImageNet recipe for ``model_name`` with a variant's model overrides.

  variants: {name: (config.model overrides, paper's numbers)}; "" is the default.
  """
  variant = variant.strip()
  if variant == "default":
    variant = ""
  if variant not in variants:
    raise ValueError(f"unknown variant {variant!r} of {where}; allowed: "
                     + ", ".join(repr(v) for v in variants))
  c = default_config()
  c.model.name = model_name
  c.dataset.name = "imagenet2012"
  c.dataset.eval_split = "validation"
  c.report.max_examples = -1           # Fig. 2 over the whole validation set (50,000), as the paper
  for key, value in variants[variant][0].items():
    c.model[key] = value
  return c


def torchvision_imported(model_name: str, layers: tuple[str, ...], occlusion_layer: str):
  """The shared config of torchvision's ImageNet models (``pretrained`` = weights file)."""
  c = default_config()
  c.model.name = model_name
  c.pretrained = ""                    # --config.pretrained=FILE.pth|.pt|.safetensors (required)
  c.dataset.name = "imagenet2012"      # report over: a TFDS split, or name=folder + folder=DIR
  c.dataset.eval_split = "validation"  # (class sub-folders, or a flat folder of images)
  c.dataset.resize_size = 256
  c.dataset.crop_size = 224
  c.dataset.pixel_scale = 1.0 / 255.0
  c.dataset.mean = (0.485, 0.456, 0.406)
  c.dataset.std = (0.229, 0.224, 0.225)
  c.report.enabled = True
  c.report.layers = layers
  c.report.max_examples = 1000
  c.report.batch_size = 32
  c.analyses.occlusion.layer = occlusion_layer
  c.analyses.invariance.layers = (layers[0], "fc7")
  c.analyses.walkthrough.layers = layers[:2]
  c.analyses.evolution.enabled = False     # no training run: no checkpoints to evolve
  c.analyses.correspondence.enabled = False  # its boxes are Fashion-MNIST's
  c.analyses.diagnostics.train_comparison = False
  c.analyses.evolution.layers = layers
  return c


# -- the command line -----------------------------------------------------------

def _usage_error(msg: str):
  print(f"error: {msg}", file=sys.stderr, flush=True)
  sys.exit(2)


def parse_flags(FLAGS, argv: list[str]) -> list[str]:  # pylint: disable=invalid-name
  """absl's flag parsing of ``argv`` into ``FLAGS``, with bad flags as one line ``error: ...`` and exit 2.

  Before parsing: ``--config=NAME`` of a shipped experiment becomes its file, one that
  is neither a file nor such a name is refused with the names, and a
  ``--config.KEY`` given more than once is refused (absl would concatenate
  repeated tuple values).  While parsing: an unknown key and a value that does
  not parse as the key's type are named, with the expected type.
  """
  given = [m.group(2) for m in (re.match(r"^--?(no)?config\.([^=]+)", a) for a in argv[1:]) if m]
  repeated = [k for k, n in collections.Counter(given).items() if n > 1]
  if repeated:
    _usage_error(f"--config.{repeated[0]} is given {given.count(repeated[0])} times; give it "
                 f"once (a tuple as one value: --config.{repeated[0]}='(a, b, c)')")
  try:
    argv = config_argv(argv)   # a shipped experiment's name stands for its file
  except ValueError as e:
    _usage_error(str(e))
  files = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
  try:
    return FLAGS(argv)
  except flags.Error as e:
    m = re.match(r"flag --([^=]+)=(.*?): (.*)", str(e), re.S)
    if m and m.group(1) == "config":   # absl hides why the file gave no config: say it
      path, _, variant = m.group(2).partition(":")
      try:
        load_file(path).get_config(*([variant] if variant else []))
      except Exception as cause:  # pylint: disable=broad-except
        _usage_error(f"--config={m.group(2)}: {cause}")
    if m and m.group(1) in FLAGS:
      flag = FLAGS[m.group(1)]
      expected = getattr(flag.parser, "flag_type", lambda: "?")()
      _usage_error(f"--{m.group(1)}={m.group(2)}: expected {expected} (the type of "
                   f"{m.group(1)}), got {m.group(2)!r}")
    _usage_error(str(e).splitlines()[0] if str(e) else type(e).__name__)
  except (KeyError, AttributeError) as e:   # ml_collections: a key the config lacks
    name = str(e).strip("\"'")
    key = next((k for k in given if name in k.split(".")), name)
    _usage_error(f"--config.{key}: unknown config key {name!r} (not in the config "
                 f"{files[-1] if files else ''}; see --mode=summary or zfnet_jax/configs.py)")
