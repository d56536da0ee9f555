r"""Sec. 5.2 on Caltech-256 (Table 5, Fig. 9, Table 7's 60/class column): ImageNet ZFNet.

  python -m zfnet_jax.transfer --config=experiments/transfer_caltech256.py \
      --workdir=workdirs/transfer_caltech256 --config.transfer.source_workdir=workdirs/zfnet \
      --config.transfer.data_dir=$HOME/data/256_ObjectCategories

TFDS has no Caltech-256 builder, so it is read from its folder: download
https://data.caltech.edu/records/nyy15-4j048/files/256_ObjectCategories.tar (1.2 GB)
and untar it (folders 001.ak47 ... 257.clutter); nothing is downloaded at run time.
Needs a trained ImageNet model (experiments/zfnet.py).

Protocol (the paper follows Griffin et al. 2007): 256 classes, the clutter class
257 left out; 15, 30, 45 or 60 random training images per class and up to 25 of
the rest for testing (Griffin et al.'s test size; classes have 80-827 images, so
at 60 per class a few test on 20); mean per-class accuracy, mean ± std over 5
random folds.  The from-scratch control trains the same architecture on the same
images.  Writes <workdir>/transfer/: transfer.csv/.md (Table 5), probes (Table 7),
transfer.json (every fold), curve.png (Fig. 9).  Add more points to the curve
with e.g. --config.transfer.train_per_class=6,15,30,45,60 (the paper: 6 per class
already beats Bo et al.'s 55.2% at 60).

Expected runtime on one GPU (estimated, not measured): a few minutes to decode and
resize the 29,780 images (tf.data on the CPUs) and extract features (2.33 GFLOPs
each); the probes fit 7 layers x 4 settings x 5 folds x 2 linear classifiers with
256 classes on up to 15,360 examples of up to 13,824 features on the CPUs, one to
several hours (--config.transfer.layers=5,7 shortens it); the scratch control trains
20 nets of 5,000 steps of 128 (4.5 PFLOP each: ~1.5 min at an assumed 60 TFLOP/s,
say 2-3 min with host-to-device copies), under an hour.  Memory: the images are
kept as uint8, 4.5 GB at 224 px.

Paper (% mean per-class accuracy, 15 / 30 / 45 / 60 per class, Table 5):
ImageNet-pretrained 65.7 / 70.6 / 72.7 / 74.2; from scratch 9.0 / 22.5 / 31.2 / 38.8.
Table 7 (60/class, linear SVM on layer l): 24.6, 39.6, 46.0, 51.3, 65.6 (layer 5),
71.7 (layer 7); softmax(5) 65.7, softmax(7) 72.6.
"""
import os

from zfnet_jax import configs


def get_config(variant: str = ""):
  caltech101 = configs.load_file(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "transfer_caltech101.py"))
  c = caltech101.get_config(variant)
  c.transfer.dataset = "caltech256"
  c.transfer.train_per_class = (15, 30, 45, 60)
  c.transfer.test_per_class = 25
  return c
