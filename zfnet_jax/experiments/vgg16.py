r"""torchvision's pretrained VGG16, imported: report and visualize without training.

The weights are the user's file (nothing is downloaded), e.g. saved once with
  python -c "import torch, torchvision; torch.save(torchvision.models.vgg16(
      weights='IMAGENET1K_V1').state_dict(), 'vgg16.pth')"
Command:
  python -m zfnet_jax.main --config=experiments/vgg16.py --config.pretrained=vgg16.pth \
      --workdir=/tmp/vgg16 --mode=visualize --images=photos/
Preprocessing as torchvision's (experiments/torchvision_alexnet.py).
"""
from zfnet_jax import configs


def get_config(variant: str = ""):
  del variant
  return configs.torchvision_imported(
      "VGG16", ("conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3"), "conv5_3")
