r"""Colour at mid scale: full-size ZFNet (Fig. 3) at 224x224 on Imagenette, with the report.

Command:
  python -m zfnet_jax.main --config=experiments/imagenette.py --workdir=workdirs/imagenette \
      --config.dataset.data_dir=$HOME/tensorflow_datasets
TFDS downloads and prepares imagenette/320px-v2 (325 MB) on the first run, or beforehand
with `tfds build imagenette/320px-v2`: 10 easily told apart ImageNet classes, natural
colour photographs (9,469 train, 3,925 validation) -- between Fashion-MNIST (quickstart) and ImageNet (experiments/zfnet.py).
The labels are WordNet ids: tench, English springer, cassette player, chain saw, church,
French horn, garbage truck, gas pump, golf ball, parachute (n01440764 ... n03888605).

The paper's recipe (Sec. 3), adapted to 9,469 images:
  kept     ZFNet of Fig. 3 (62.3M parameters with a 10-way fc8), weights N(0, 1e-2^2),
           biases 0; SGD batch 128, momentum 0.9, learning rate 1e-2; feature scale
           clipping of conv filters at RMS 0.1; dropout 0.5; resize to 256, centre
           256x256, per-pixel mean subtracted, random 224 crops and flips; 10-crop test.
  changed  100 epochs (7,400 steps) instead of 70: 70 epochs of ImageNet are 10^5 times
           more images; the rate is divided by 10 at epochs 60 and 85 on a fixed schedule,
           because the paper's "by hand when validation error plateaued" is noisy on a
           validation set of 3,925 images (evaluated every 5 epochs); weight decay 5e-4
           is AlexNet's value (the paper gives none).  Correspondence (Table 1) is off: its
           box file is Fashion-MNIST's.  The atlas scans the whole validation split.

Expected runtime on one GPU (estimated, not measured): ZFNet's forward pass at 224 px is
2.33 GFLOPs (1.16 G multiply-adds: conv1 0.17, conv2 0.42, conv3-5 0.52, fc 0.05), a
training step ~3x that, so one epoch is 66 TFLOP and the run 6.6 PFLOP.  Assuming 60
TFLOP/s achieved in float32 (TF32 convolutions; ~12% of an H100/H200's dense TF32 peak,
usual for a small-channel conv net with pooling and LRN), that is ~1.1 s of compute per
epoch; decoding and cropping 320 px JPEGs with tf.data on 16 cores (~3,000 images/s) makes
an epoch ~4 s, so training with evaluations takes ~10 min, the report (atlas over 3,925
images, evolution at 8 epochs, occlusion, invariance) a few minutes more: ~15-20 min in
all.  --config.model.dtype=bfloat16 halves the compute.

What the report should show (no measured result yet): conv1 -- oriented edges at several
frequencies and colour-opponent blobs, a few filters left noisy (only 9,469 images), none
dominating thanks to clipping (compare Fig. 6(c)); conv2 -- corners, colour-edge
conjunctions and textures (Fig. 2, layer 2); conv3-5 -- parts of the ten classes (fish
with the fingers that hold them, church windows and spires, golf-ball dimples, parachute
canopies, dog faces, horn bells, truck wheels).  Evolution (Fig. 4): conv1-2 settle in
the first few epochs, conv4-5 much later.  Validation error: expect it far below the 90%
of chance but above a pretrained net's, as 62M parameters on 9,469 images overfit.
"""
from zfnet_jax import configs


def get_config(variant: str = ""):
  del variant
  c = configs.default_config()
  c.model.name = "ZFNet"
  c.dataset.name = "imagenette/320px-v2"   # shorter side 320 >= resize 256
  c.dataset.train_split = "train"
  c.dataset.eval_split = "validation"
  c.dataset.resize_size = 256
  c.dataset.crop_size = 224
  c.num_epochs = 100.0
  c.schedule = "step"
  c.step_epochs = (60, 85)
  c.eval_every_epochs = 5.0
  c.evolution_epochs = (1, 2, 5, 10, 20, 40, 60, 100)
  c.evolution_reference_epochs = 0.0   # the epochs above are this run's own
  c.checkpoint_every_steps = 1000
  c.log_every_steps = 50
  c.report.max_examples = -1           # the whole validation split (3,925 images)
  c.analyses.correspondence.enabled = False
  return c
