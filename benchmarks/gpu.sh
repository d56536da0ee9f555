#!/usr/bin/env bash
# The GPU run, one command (about 4-6 minutes on an H100/H200; at most 8):
#
#   bash benchmarks/gpu.sh [OUT_DIR]        # default: $OUT if set, else benchmarks/results
#
# On the lent machine (device tool: run command "bash benchmarks/gpu.sh", nothing to
# carry): its preinstalled CUDA JAX, flax, optax, orbax, PIL and scikit-learn are all the
# project needs for these rows; without TensorFlow the input-pipeline row says it was
# skipped.  Writes OUT_DIR/gpu.json and OUT_DIR/gpu.log.  `bash benchmarks/gpu.sh --smoke`
# runs the same code at toy sizes on any machine (CPU too).
set -euo pipefail
cd "$(dirname "$0")/.."
SMOKE=""
if [[ "${1:-}" == "--smoke" ]]; then SMOKE="--smoke"; shift; fi
DIR="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$DIR"
PY="$(command -v python3 || command -v python)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # leave the card's memory to the allocator
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version \
  --format=csv 2>/dev/null | tee "$DIR/gpu.log" || true
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee -a "$DIR/gpu.log"
timeout 470 "$PY" benchmarks/gpu.py $SMOKE --json "$DIR/gpu${SMOKE:+_smoke}.json" 2>&1 \
  | tee -a "$DIR/gpu.log"
