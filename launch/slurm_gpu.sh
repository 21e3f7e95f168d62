#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node, all local GPUs per process.
# jax.distributed.initialize() reads the SLURM environment (coordinator, process ids).
#   sbatch --nodes=4 --gpus-per-node=8 launch/slurm_gpu.sh WORKDIR [extra --config.* flags...]
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
workdir=$1
shift
srun python -m mgie_jax.train --config=configs/ipr2pr.py --workdir="$workdir" "$@"
