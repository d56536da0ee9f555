"""Default configuration shared by every experiment in ``experiments/``.

Experiment files call ``default_config()`` and override a few fields.  Every
field the library reads is declared here, so ``--config.x=y`` with a typo or a
value of the wrong type fails at once (configs are locked by ``main.py``).
"""
from __future__ import annotations

import ml_collections


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # -- model (zfnet_jax.models) ----------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.name = "ZFNet"              # ZFNet | AlexNet | ZFNetLowRes | AlexNetLowRes
  c.model.conv_features = (96, 256, 384, 384, 256)
  c.model.fc_features = 4096
  c.model.removed = ()                 # Table 3: any of conv3, conv4, fc6, fc7
  c.model.contrast_norm = True
  c.model.dropout_rate = 0.5
  c.model.kernel_init_std = 1e-2       # paper: weights 1e-2; None -> He normal
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
  c.dataset.on_corrupt = "skip"        # folder datasets: "skip" (and count) or "stop"
  c.dataset.shuffle_buffer = 10_000
  c.dataset.prefetch = 2

  # -- optimisation (zfnet_jax.train) ----------------------------------------
  c.batch_size = 128                   # global batch, divided over all devices
  c.num_epochs = 70.0
  c.num_train_steps = -1               # > 0 overrides num_epochs
  c.optimizer = "sgd"                  # sgd (momentum) | adam
  c.learning_rate = 1e-2
  c.momentum = 0.9
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

  # -- checkpoints, logging --------------------------------------------------
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.evolution_epochs = (1, 2, 5, 10, 20, 30, 40, 64)  # kept for Fig. 4; scaled to the run
  c.restore_path = ""                  # explicit checkpoint to start from ("" = resume workdir)
  c.log_every_steps = 100
  c.distributed = False                # call jax.distributed.initialize()

  # -- report (zfnet_jax.report) ---------------------------------------------
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
  return c
