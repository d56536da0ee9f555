r"""Sec. 5.2 on PASCAL VOC 2012 classification: ImageNet ZFNet features -> 20 one-vs-rest classifiers.

  python -m zfnet_jax.transfer --config=experiments/transfer_voc2012.py \
      --workdir=workdirs/transfer_voc2012 --config.transfer.source_workdir=workdirs/zfnet \
      --config.transfer.data_dir=$HOME/tensorflow_datasets

Needs TFDS voc/2012 prepared beforehand (nothing is downloaded at run time).
Multi-label: an image is positive for every class among its objects; one
classifier per class (one-vs-rest softmax = logistic regression, and linear
SVM) on the frozen layer-7 features of the whole image, trained on TFDS
`train`, scored by mean average precision on `validation` (the paper's 79.0
mean AP is on the test server's split, which TFDS does not label).
"""
from zfnet_jax import configs


def get_config(variant: str = ""):
  del variant
  c = configs.default_config()
  c.transfer.dataset = "voc2012"
  c.transfer.folds = 1                 # one fixed split: train -> validation
  c.transfer.pool_grid = 6
  c.transfer.scratch_steps = 5000
  c.transfer.scratch_batch_size = 128
  c.transfer.scratch_learning_rate = 1e-2
  return c
