r"""Sec. 5.2 / Table 4 and Table 7 on Caltech-101: ImageNet ZFNet features -> a new softmax.

  python -m zfnet_jax.transfer --config=experiments/transfer_caltech101.py \
      --workdir=workdirs/transfer_caltech101 --config.transfer.source_workdir=workdirs/zfnet \
      --config.transfer.data_dir=$HOME/tensorflow_datasets

Needs TFDS caltech101 prepared beforehand (`tfds build caltech101`; nothing is
downloaded at run time) and a trained ImageNet model (experiments/zfnet.py).
As the paper: 15 or 30 training images per class, up to 50 test images per
class, mean per-class accuracy, 5 random folds (TFDS train+test merged, all
102 classes incl. background).  The from-scratch control trains the same
architecture on the same images.

Paper (% mean per-class accuracy, 15 / 30 per class): pretrained 83.8 / 86.5,
from scratch 22.8 / 46.5.  Table 7 (30/class, linear SVM on layer l):
44.8, 66.2, 72.3, 76.6, 86.2 (layer 5), 85.5 (layer 7); softmax(5) 82.9, softmax(7) 85.4.
"""
from zfnet_jax import configs


def get_config(variant: str = ""):
  del variant
  c = configs.default_config()
  c.transfer.dataset = "caltech101"
  c.transfer.train_per_class = (15, 30)
  c.transfer.test_per_class = 50
  c.transfer.folds = 5
  c.transfer.pool_grid = 6             # conv maps at 224: 6x6 regions, as pool5's grid
  c.transfer.scratch_steps = 5000
  c.transfer.scratch_batch_size = 128
  c.transfer.scratch_learning_rate = 1e-2
  return c
