r"""Single-tower AlexNet trained with ZFNet's recipe (the paper's replication), and its Table 3 rows.

Command (default row; pick a variant with ``experiments/alexnet.py:VARIANT``):
  python -m zfnet_jax.main --config=experiments/alexnet.py --workdir=/tmp/alexnet
  python -m zfnet_jax.main --config=experiments/alexnet.py:no_fc7 --workdir=/tmp/alexnet_no_fc7
Expected runtime: as experiments/zfnet.py.

Variants and the paper's numbers they should reproduce, as error %
(Table 3: train top-1 / val top-1 / val top-5):

  variant             change                               paper
  ""  (default)       "our replication" of AlexNet         35.1 / 40.5 / 18.1   (Table 2: val 40.5 / 18.1)
  no_conv34           without conv3, conv4                 41.8 / 45.4 / 22.1
  no_fc7              without fc7                          27.4 / 40.0 / 18.4
  no_fc67             without fc6, fc7                     27.4 / 44.8 / 22.4
  no_conv34_fc67      without conv3, conv4, fc6, fc7       71.1 / 71.3 / 50.1
  fc2048              fc6, fc7 = 2048                      40.3 / 41.7 / 18.8
  fc8192              fc6, fc7 = 8192                      26.8 / 40.0 / 18.1
"""
from zfnet_jax import configs

# variant -> (config.model overrides, paper's train top-1 / val top-1 / val top-5 error %)
VARIANTS = {
    "": ({}, (35.1, 40.5, 18.1)),
    "no_conv34": ({"removed": ("conv3", "conv4")}, (41.8, 45.4, 22.1)),
    "no_fc7": ({"removed": ("fc7",)}, (27.4, 40.0, 18.4)),
    "no_fc67": ({"removed": ("fc6", "fc7")}, (27.4, 44.8, 22.4)),
    "no_conv34_fc67": ({"removed": ("conv3", "conv4", "fc6", "fc7")}, (71.1, 71.3, 50.1)),
    "fc2048": ({"fc_features": 2048}, (40.3, 41.7, 18.8)),
    "fc8192": ({"fc_features": 8192}, (26.8, 40.0, 18.1)),
}


def get_config(variant: str = ""):
  return configs.imagenet_variant("AlexNet", VARIANTS, variant, "experiments/alexnet.py")
