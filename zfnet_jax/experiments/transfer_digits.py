r"""Offline transfer and per-layer probes: the quickstart model -> scikit-learn's digits.

  python -m zfnet_jax.main --config=experiments/quickstart.py --workdir=workdirs/quickstart
  python -m zfnet_jax.transfer --config=experiments/transfer_digits.py --workdir=workdirs/quickstart

Fashion-MNIST features transferred to a dataset the model never saw (1797
handwritten 8x8 digits bundled with scikit-learn, upsampled to the model's input size): a
Table 7-style probe of every layer (linear SVM and softmax, 15 and 30 training
images per class, mean per-class accuracy over 5 folds) and the Sec. 5.2
comparison with the same architecture trained from scratch on the same images.
Writes <workdir>/transfer/{probes,transfer}.{csv,md}.  A few minutes on 2 CPU cores.
"""
import os

from zfnet_jax import configs


def get_config(variant: str = ""):
  quickstart = configs.load_file(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py"))
  c = quickstart.get_config(variant)
  c.transfer.dataset = "digits"
  c.transfer.train_per_class = (15, 30)
  c.transfer.test_per_class = 50
  c.transfer.folds = 5
  c.transfer.scratch_flip = False      # digits are not mirror-symmetric
  return c
