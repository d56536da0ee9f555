r"""ZFNet (Fig. 3) on ImageNet 2012 with the paper's recipe (Sec. 3).

Command:
  python -m zfnet_jax.main --config=experiments/zfnet.py --workdir=/tmp/zfnet \
      --config.dataset.data_dir=$HOME/tensorflow_datasets
Variants: --config=experiments/zfnet.py:VARIANT (see VARIANTS below).

Needs the ImageNet tarballs in <data_dir>/downloads/manual (see README).
Expected runtime: ~12 days on one GTX580 (paper); ~1 day on 8 modern GPUs.
Expected result (paper Table 2, one net): val top-1 error 38.4%, top-5 16.5%.
"""
from zfnet_jax import configs


def get_config(variant: str = ""):
  c = configs.default_config()
  c.model.name = "ZFNet"
  c.dataset.name = "imagenet2012"
  c.dataset.eval_split = "validation"
  return c
