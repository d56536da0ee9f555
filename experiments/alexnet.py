r"""Single-tower AlexNet, trained with ZFNet's recipe: the paper's replication.

Command:
  python -m zfnet_jax.main --config=experiments/alexnet.py --workdir=/tmp/alexnet
Expected runtime: as experiments/zfnet.py.
Expected result (paper Table 2, "our replication"): val top-1 40.5%, top-5 18.1%.
"""
from zfnet_jax import configs


def get_config(variant: str = ""):
  c = configs.default_config()
  c.model.name = "AlexNet"
  c.dataset.name = "imagenet2012"
  return c
