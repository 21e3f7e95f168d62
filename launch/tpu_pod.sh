#!/usr/bin/env bash
# Run MGIE training on every worker of a Cloud TPU pod slice. JAX discovers the pod itself.
#   launch/tpu_pod.sh TPU_NAME ZONE WORKDIR [extra --config.* flags...]
set -euo pipefail
tpu=$1 zone=$2 workdir=$3
shift 3
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  cd ~/mgie_jax && python -m mgie_jax.train --config=configs/ipr2pr.py --workdir=$workdir $*"
