r"""ZFNet (Fig. 3) on ImageNet 2012 with the paper's recipe (Sec. 3), and its Table 2/3 rows.

Command (default row; pick a variant with ``experiments/zfnet.py:VARIANT``):
  python -m zfnet_jax.main --config=experiments/zfnet.py --workdir=/tmp/zfnet \
      --config.dataset.data_dir=$HOME/tensorflow_datasets
  python -m zfnet_jax.main --config=experiments/zfnet.py:fc8192 --workdir=/tmp/zfnet_fc8192

Needs the ImageNet tarballs in <data_dir>/downloads/manual (see README).
Expected runtime: ~12 days on one GTX580 (paper); ~1 day on 8 modern GPUs.

The report's Fig. 2 scans the whole validation set (report.max_examples = -1: 50,000
images; the paper's "across the validation data") in one pass. Its cost, an estimate
from FLOPs and the CPU forward rate in benchmarks/results/latest.json, not a measured
scan: conv1-conv5 are 2.22 GFLOP per image at 224 px, 111 TFLOP for 50,000 images; on
one H100/H200-class GPU well under a minute of compute (bf16), so the JPEG decoding of
the host's input pipeline sets the pace (~0.5-1 min at 1,000-2,000 images/s); on 2 CPU
cores ~12-14 min at the forward rate (67.7 images/s, the scan at >= 0.9x of it) plus
the decoding. --config.report.max_examples=10000 makes it 5x cheaper.

Variants and the paper's numbers they should reproduce, as error %
(train top-1 / val top-1 / val top-5; Table 3, Table 2 for the test column):

  variant             change                               paper
  ""  (default)       Fig. 3                               33.1 / 38.4 / 16.5   (Table 2: val 38.4 / 16.5)
  fc2048              fc6, fc7 = 2048                      38.2 / 40.2 / 17.6
  fc8192              fc6, fc7 = 8192                      22.0 / 38.8 / 17.0
  conv512             conv3, 4, 5 = 512 / 1024 / 512       18.8 / 37.5 / 16.0   (Table 2: test top-5 16.1)
  fc8192_conv512      both of the above                    10.0 / 38.3 / 16.9
  no_conv34           without conv3, conv4                 not in the paper (AlexNet only)
  no_fc7              without fc7                          not in the paper (AlexNet only)
  no_fc67             without fc6, fc7                     not in the paper (AlexNet only)
  no_conv34_fc67      without conv3, conv4, fc6, fc7       not in the paper (AlexNet only)

Weight decay: 5e-4 (``configs.default_config``) is AlexNet's value (Krizhevsky et al.
2012); the paper does not state one.  Contrast normalisation: AlexNet's constants with
alpha not divided by n by default; ``--config.model.lrn_alpha_over_n=True`` gives
cuda-convnet's convention, which the paper's code most likely used (README,
"The models, exact to the paper").

Table 2's "5 convnets" / "6 convnets" rows average the softmax outputs of
several such nets (the default trained with different seeds, plus conv512);
they are ensembles of these runs, not separate configs:
  python -m zfnet_jax.main --config=experiments/zfnet.py --mode=ensemble \
      --ensemble=/tmp/zf1,/tmp/zf2,/tmp/zf3,/tmp/zf4,/tmp/zf5 --workdir=/tmp/zf_ensemble5
"""
from zfnet_jax import configs

# variant -> (config.model overrides, paper's train top-1 / val top-1 / val top-5 error %)
VARIANTS = {
    "": ({}, (33.1, 38.4, 16.5)),
    "fc2048": ({"fc_features": 2048}, (38.2, 40.2, 17.6)),
    "fc8192": ({"fc_features": 8192}, (22.0, 38.8, 17.0)),
    "conv512": ({"conv_features": (96, 256, 512, 1024, 512)}, (18.8, 37.5, 16.0)),
    "fc8192_conv512": ({"fc_features": 8192, "conv_features": (96, 256, 512, 1024, 512)},
                       (10.0, 38.3, 16.9)),
    "no_conv34": ({"removed": ("conv3", "conv4")}, None),
    "no_fc7": ({"removed": ("fc7",)}, None),
    "no_fc67": ({"removed": ("fc6", "fc7")}, None),
    "no_conv34_fc67": ({"removed": ("conv3", "conv4", "fc6", "fc7")}, None),
}


def get_config(variant: str = ""):
  return configs.imagenet_variant("ZFNet", VARIANTS, variant, "experiments/zfnet.py")
