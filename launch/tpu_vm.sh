#!/usr/bin/env bash
# Cloud TPU VM (single host or pod slice): the same command on every worker.
#
#   TPU=my-v4-32 ZONE=us-central2-b launch/tpu_vm.sh experiments/zfnet.py gs://BUCKET/zfnet \
#       --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets
#
# Step 1 copies the repository to every worker and installs it; step 2 starts
# training on all workers at once (--worker=all).  On TPU VMs
# jax.distributed.initialize() needs no arguments (--config.distributed=True).
# Each host reads its own 1/num_hosts of every split (tfds.split_for_jax_process);
# config.batch_size is the GLOBAL batch, divided over all TPU cores of the slice.
# The workdir must be storage every host can reach (a gs:// bucket); data_dir too.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
CONFIG=${1:?usage: TPU=.. ZONE=.. $0 CONFIG WORKDIR [--config.x=y ...]}
WORKDIR=${2:?usage: TPU=.. ZONE=.. $0 CONFIG WORKDIR [--config.x=y ...]}
shift 2
PROJECT_ARGS=${PROJECT:+--project=$PROJECT}
cd "$(dirname "$0")/.."
REPO=zfnet_jax

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  tar czf /tmp/zfnet_jax_src.tgz --exclude=.git --exclude=workdirs .
  gcloud compute tpus tpu-vm scp /tmp/zfnet_jax_src.tgz "$TPU":/tmp/ --zone="$ZONE" \
      --worker=all $PROJECT_ARGS
  gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all $PROJECT_ARGS --command="
      mkdir -p ~/$REPO && tar xzf /tmp/zfnet_jax_src.tgz -C ~/$REPO &&
      pip install -q 'jax[tpu]' && pip install -q -e ~/$REPO"
fi

gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all $PROJECT_ARGS --command="
    cd ~/$REPO && python -m zfnet_jax.main --config=$CONFIG --workdir=$WORKDIR \
        --config.distributed=True $*"
