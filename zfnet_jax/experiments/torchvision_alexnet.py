r"""torchvision's pretrained AlexNet, imported: report and visualize without training.

The weights are the user's file (nothing is downloaded), e.g. saved once with
  python -c "import torch, torchvision; torch.save(torchvision.models.alexnet(
      weights='IMAGENET1K_V1').state_dict(), 'alexnet.pth')"
(or as .safetensors: no PyTorch needed to read it).  Commands:
  python -m zfnet_jax.main --config=experiments/torchvision_alexnet.py \
      --config.pretrained=alexnet.pth --workdir=/tmp/tv_alexnet --mode=visualize --images=photos/
  python -m zfnet_jax.main --config=experiments/torchvision_alexnet.py \
      --config.pretrained=alexnet.pth --workdir=/tmp/tv_alexnet --mode=report \
      --config.dataset.name=folder --config.dataset.folder=photos/
Preprocessing as torchvision's: smaller side to 256, centre crop 224, pixels / 255,
minus mean, divided by std (folded into conv1; the figures add the mean back).
"""
from zfnet_jax import configs


def get_config(variant: str = ""):
  del variant
  return configs.torchvision_imported(
      "TorchvisionAlexNet", ("conv1", "conv2", "conv3", "conv4", "conv5"), "conv5")
