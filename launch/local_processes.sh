#!/usr/bin/env bash
# N local processes on one machine over loopback (CPU devices): a multi-host rehearsal.
#   launch/local_processes.sh 2 /tmp/mgie_mp [extra flags]
# PJRT_NPROC: a process's CPU devices share one thread pool and a waiting collective holds a
# thread; about one thread per device (the default on small machines) can deadlock a step
# (tests/conftest.py says how).
set -euo pipefail
n=$1 workdir=$2
shift 2
port=$((20000 + RANDOM % 20000))
for ((i = 0; i < n; i++)); do
  XLA_FLAGS=--xla_force_host_platform_device_count=4 PJRT_NPROC=${PJRT_NPROC:-16} python -m mgie_jax.train --config=configs/tiny.py \
    --workdir="$workdir" --coordinator_address=127.0.0.1:$port --num_processes="$n" --process_id=$i "$@" &
done
wait
