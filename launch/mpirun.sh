#!/usr/bin/env bash
# Open MPI launch (mpi4py is a dependency; ranks come from OMPI_COMM_WORLD_*):
#   bash launch/mpirun.sh -np 2 -- --config ds_configs/zero2.json --recipe recipes/tiny.yaml
# Multi-node: add --host a,b (or --hostfile) and export MOLORA_MASTER_ADDR=<rank 0's address>.
set -euo pipefail
source "$(dirname "$0")/../scripts/env.sh"
mpi_args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do mpi_args+=("$1"); shift; done
shift || true
exec mpirun --allow-run-as-root --oversubscribe -x PATH -x TORCH_EXTENSIONS_DIR -x HF_HUB_OFFLINE \
  -x TRANSFORMERS_OFFLINE -x HF_DATASETS_OFFLINE -x OMP_NUM_THREADS=1 "${mpi_args[@]}" \
  python -u launch/train.py "$@"
