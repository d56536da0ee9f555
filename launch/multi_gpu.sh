#!/usr/bin/env bash
# One machine, all its GPUs: a single process drives every local device
# (data parallel over the local mesh; no jax.distributed needed).
#
#   launch/multi_gpu.sh experiments/zfnet.py workdirs/zfnet --config.dataset.data_dir=$HOME/tensorflow_datasets
#   CUDA_VISIBLE_DEVICES=0,1 launch/multi_gpu.sh experiments/quickstart.py workdirs/qs2
#
# config.batch_size is the GLOBAL batch (128 = the paper's), split evenly over
# the visible GPUs; it must divide by their number.  bf16 compute:
# --config.model.dtype=bfloat16.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG WORKDIR [--config.x=y ...]}
WORKDIR=${2:?usage: $0 CONFIG WORKDIR [--config.x=y ...]}
shift 2
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
python -m zfnet_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
