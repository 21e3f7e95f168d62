#!/usr/bin/env bash
# Run MGIE training on every worker of a Cloud TPU pod slice. JAX discovers the pod itself.
#   launch/tpu_pod.sh TPU_NAME ZONE WORKDIR [extra flags, e.g. --config.train.batch_size=128]
#
# This checkout (its files git does not ignore, uncommitted changes included) is copied to
# ~/mgie_jax on every worker and
# installed there with `pip install -e ".[tpu]"`; set MGIE_SKIP_COPY=1 when the workers already
# hold the code, MGIE_SKIP_INSTALL=1 when it is installed. CONFIG (default configs/ipr2pr.py)
# names the config file. Every argument reaches the trainer exactly as given (quoted for the
# remote shell), spaces and quotes included. WORKDIR should be a gs:// path all workers share.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE WORKDIR [flags...]" >&2
  exit 2
fi
tpu=$1 zone=$2 workdir=$3
shift 3
config=${CONFIG:-configs/ipr2pr.py}
here=$(cd "$(dirname "$0")/.." && pwd)
gcloud=${GCLOUD:-gcloud}

if [[ -z "${MGIE_SKIP_COPY:-}" ]]; then
  bundle=$(mktemp -d)/mgie_jax.tgz
  if git -C "$here" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
    (cd "$here" && git ls-files -z --cached --others --exclude-standard \
       | xargs -0 -I{} sh -c 'test -e "{}" && printf "%s\0" "./{}"' \
       | tar -czf "$bundle" --null -T -)
  else
    tar -czf "$bundle" -C "$here" --exclude=.git --exclude='__pycache__' --exclude='*.egg-info' .
  fi
  "$gcloud" compute tpus tpu-vm scp "$bundle" "$tpu":mgie_jax.tgz --zone "$zone" --worker=all
  unpack='rm -rf ~/mgie_jax && mkdir -p ~/mgie_jax && tar -xzf ~/mgie_jax.tgz -C ~/mgie_jax && '
else
  unpack=''
fi
install=''
if [[ -z "${MGIE_SKIP_INSTALL:-}" ]]; then
  install='python -m pip install -q -e ".[tpu]" && '
fi
# printf %q quotes each argument for the remote bash: nothing is split or expanded twice.
args=$(printf '%q ' "--config=$config" "--workdir=$workdir" "$@")
"$gcloud" compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all \
  --command "set -e; ${unpack}cd ~/mgie_jax && ${install}python -m mgie_jax.train ${args}"
