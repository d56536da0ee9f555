#!/usr/bin/env bash
# The quickstart: install, train the low-resolution ZFNet on offline
# Fashion-MNIST, then write the visual report.  Usage: launch/quickstart.sh [WORKDIR]
# 9 min 34 s - 9 min 47 s from a fresh clone on a 2-core AMD EPYC, packages cached
# (benchmarks/results/quickstart_runs.json).
set -euo pipefail
cd "$(dirname "$0")/.."
export ZFNET_JAX_STARTED="$(date +%s)"   # the summary's total includes the install step
echo "quickstart: install the package and Debian's Fashion-MNIST if missing, then train and report"
bash launch/install.sh
python -m zfnet_jax.main --config=experiments/quickstart.py --workdir="${1:-workdirs/quickstart}"
