#!/usr/bin/env bash
# Set up (a no-op once done), then train the default recipe with ZeRO-2:
# `bash scripts/train.sh [launch/train.py args]`, e.g. `bash scripts/train.sh --set train.max_steps=10`.
#
# On a CPU-only machine the deepspeed launcher starts ONE process: it counts NUMA nodes, and without
# numactl it finds none and falls back to 1. For two ranks run `LOCAL_SIZE=2 OMP_NUM_THREADS=1
# bash scripts/train.sh` (each rank would otherwise use every core).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
# The launcher's default port (29500) is the one every other local torchrun/deepspeed job also takes;
# a second run on the machine would die with EADDRINUSE. Ask the OS for a free one unless given.
port="${MASTER_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
exec deepspeed --master_port "$port" launch/train.py --config ds_configs/zero2.json "$@"
