#!/usr/bin/env bash
# The quickstart: install, train the low-resolution ZFNet on offline
# Fashion-MNIST, then write the visual report.  Usage: launch/quickstart.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
python -m zfnet_jax.main --config=experiments/quickstart.py --workdir="${1:-workdirs/quickstart}"
