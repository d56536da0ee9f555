"""Regenerate the model shipped inside the package from a finished quickstart run.

  bash launch/quickstart.sh workdirs/quickstart          # or any finished run
  python launch/ship_weights.py workdirs/quickstart      # -> zfnet_jax/shipped/quickstart/
  python launch/ship_weights.py WORKDIR OUT_DIR          # another folder (config.pretrained=OUT_DIR)

Writes params.npz (the latest checkpoint's parameters, float32), config.json,
dataset_info.json, pixel_mean.npy and results.json (with where and when it was shipped).
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv):
  if len(argv) not in (2, 3):
    print(__doc__, file=sys.stderr)
    return 2
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.ERROR)   # Orbax's read-only notices
  from zfnet_jax.training import weights
  out = argv[2] if len(argv) == 3 else os.path.join(weights.SHIPPED, "quickstart")
  try:
    weights.save_shipped(argv[1], out)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
  print(f"shipped {argv[1]} -> {out} ({size / 1e6:.1f} MB)")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
