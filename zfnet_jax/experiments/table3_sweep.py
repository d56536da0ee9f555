r"""Table 3 (and Table 2's single nets) as one sweep: every ablation, trained from scratch.

  python launch/sweep.py --sweep=experiments/table3_sweep.py --root=workdirs/table3 --dry_run
  python launch/sweep.py --sweep=experiments/table3_sweep.py --root=workdirs/table3 \
      -- --config.dataset.data_dir=$HOME/tensorflow_datasets

12 ImageNet runs of 70 epochs each; the summary table carries the paper's
numbers (train top-1 / val top-1 / val top-5 error %) beside the measured ones
(train_top1_error: centre crop on 50,000 seeded training images; top1_error, top5_error).
"""
import os

from zfnet_jax import configs

HERE = os.path.dirname(os.path.abspath(__file__))


def _variants(name):
  return configs.load_file(os.path.join(HERE, f"{name}.py"), name).VARIANTS


def get_sweep():
  runs = []
  for name in ("alexnet", "zfnet"):
    for variant, (_, paper) in _variants(name).items():
      if paper is None:      # removal variants of ZFNet: not in the paper
        continue
      runs.append({"config": f"experiments/{name}.py" + (f":{variant}" if variant else ""),
                   "_paper_train_top1": paper[0], "_paper_val_top1": paper[1],
                   "_paper_val_top5": paper[2]})
  return runs
