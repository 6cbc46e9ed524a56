#!/usr/bin/env bash
# Open MPI launch (mpi4py is a dependency; ranks come from OMPI_COMM_WORLD_*):
#   bash launch/mpirun.sh -np 2 -- --config ds_configs/zero2.json --recipe recipes/tiny.yaml
# Multi-node: add --host a,b (or --hostfile) and export MOLORA_MASTER_ADDR=<rank 0's address>
# MOLORA_MASTER_PORT defaults to a port free on this host (rank 0 runs here unless a hostfile says otherwise).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
source "$root/scripts/env.sh"
mpi_args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do mpi_args+=("$1"); shift; done
shift || true
# A fixed default port would make a second job on the machine die with EADDRINUSE.
export MOLORA_MASTER_PORT="${MOLORA_MASTER_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}"
# Ranks on other hosts see only the variables passed with -x (mpirun warns about unset ones).
for var in MOLORA_MASTER_ADDR MOLORA_MASTER_PORT; do
  if [ -n "${!var:-}" ]; then mpi_args+=(-x "$var"); fi
done
exec mpirun --allow-run-as-root --oversubscribe -x PATH -x PYTHONPATH -x TORCH_EXTENSIONS_DIR -x HF_HUB_OFFLINE \
  -x TRANSFORMERS_OFFLINE -x HF_DATASETS_OFFLINE -x TOKENIZERS_PARALLELISM -x OMP_NUM_THREADS=1 \
  "${mpi_args[@]}" python -u "$root/launch/train.py" "$@"
