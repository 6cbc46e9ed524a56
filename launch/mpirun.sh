#!/usr/bin/env bash
# Open MPI launch (mpi4py is a dependency; ranks come from OMPI_COMM_WORLD_*):
#   bash launch/mpirun.sh -np 2 -- --config ds_configs/zero2.json --recipe recipes/tiny.yaml
# Multi-node: add --host a,b (or --hostfile) and export MOLORA_MASTER_ADDR=<rank 0's address>
# (and MOLORA_MASTER_PORT to run several jobs at once; default 29511).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
source "$root/scripts/env.sh"
mpi_args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do mpi_args+=("$1"); shift; done
shift || true
# Ranks on other hosts see only the variables passed with -x (mpirun warns about unset ones).
for var in MOLORA_MASTER_ADDR MOLORA_MASTER_PORT; do
  if [ -n "${!var:-}" ]; then mpi_args+=(-x "$var"); fi
done
exec mpirun --allow-run-as-root --oversubscribe -x PATH -x PYTHONPATH -x TORCH_EXTENSIONS_DIR -x HF_HUB_OFFLINE \
  -x TRANSFORMERS_OFFLINE -x HF_DATASETS_OFFLINE -x TOKENIZERS_PARALLELISM -x OMP_NUM_THREADS=1 \
  "${mpi_args[@]}" python -u "$root/launch/train.py" "$@"
