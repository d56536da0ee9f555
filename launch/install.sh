#!/usr/bin/env bash
# Installs what zfnet_jax needs on a fresh machine: Debian's Fashion-MNIST
# package (the offline default dataset) and, with --test, Chromium for the
# browser test of the report; then the Python package (editable), with the
# versions pinned in constraints.txt (launch/pin_versions.py says how to update)
# and TensorFlow's CPU build where no TensorFlow is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
if [ "${1:-}" = "--test" ]; then
  command -v chromium >/dev/null || need+=(chromium)
fi
if [ ${#need[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
  elif command -v apt-get >/dev/null && command -v sudo >/dev/null; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "note: could not install ${need[*]} (no apt); Fashion-MNIST will come from TFDS" >&2
  fi
fi
# TensorFlow's CPU build (tf.data, TensorBoard logs) unless a TensorFlow is already there.
extras=()
python -c "import importlib.util as u, sys; sys.exit(u.find_spec('tensorflow') is None)" ||
  extras+=(cpu)
[ "${1:-}" = "--test" ] && extras+=(test)
spec=.
[ ${#extras[@]} -gt 0 ] && spec=".[$(IFS=,; echo "${extras[*]}")]"
python -m pip install -q --root-user-action=ignore -c constraints.txt -e "$spec"
