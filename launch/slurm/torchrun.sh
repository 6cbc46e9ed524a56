# Body of the per-model sbatch scripts (glm4_9b.sbatch, llava_7b.sbatch): sourced, not run. They set
# RECIPE and CONFIG, then this starts one torchrun per node (GPUS_PER_NODE ranks each) with c10d
# rendezvous on the first node, and requeues the job when it was preempted.
#
# Environment: sbatch passes the submitting shell's environment on (Slurm's default --export=ALL),
# so activate your own conda env or venv (with torch, deepspeed and this project's requirements) and
# submit from the repository root; this checkout goes first on PYTHONPATH. To activate on the nodes
# instead, set MOLORA_ENV to a script to source there (e.g. one that runs `conda activate molora`).
#
# NCCL: TORCH_NCCL_ASYNC_ERROR_HANDLING=1 turns a hung collective into an error (and the job's exit)
# instead of a stall until the time limit; NCCL_DEBUG=WARN logs only problems (INFO shows the chosen
# transport: check it says IB/NET, not Socket, on multi-node runs). Site-specific settings are left
# to the environment: NCCL_SOCKET_IFNAME (the inter-node interface, e.g. ib0 or eth0) and NCCL_IB_HCA
# when the nodes have several NICs.
#
# Preemption: Slurm sends SIGUSR1 (--signal=USR1@600) to each node's torchrun, which forwards it to
# its ranks (--signals-to-handle: torch 2.13 has it; an older torchrun rejects the flag, then use
# launch/slurm.sbatch, one task per rank) and waits up to SHUTDOWN_TIMEOUT
# for them; the trainer checkpoints at the end of the current step and writes status "preempted";
# the job then requeues itself and the next segment continues with --resume auto.
set -euo pipefail
if [ -n "${MOLORA_ENV:-}" ]; then
  # shellcheck disable=SC1090
  source "$MOLORA_ENV"
fi
if ! command -v torchrun >/dev/null; then
  echo "error: torchrun is not on PATH; activate the environment that has torch and deepspeed before sbatch, or set MOLORA_ENV" >&2
  exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="runs/slurm-$SLURM_JOB_ID"
args=("$@")
for i in "${!args[@]}"; do
  case "${args[i]}" in
    --output-dir) out="${args[i + 1]:-$out}" ;;
    --output-dir=*) out="${args[i]#--output-dir=}" ;;
  esac
done
# Node names need not resolve (emulated nodes, some clusters): rendezvous on the first node's address.
first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
addr="${MASTER_ADDR:-$(scontrol show node "$first" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')}"
port="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
rm -f "$out/results.json"  # a crash must not leave the last segment's "preempted" to decide
rc=0
srun --kill-on-bad-exit=1 --ntasks-per-node=1 \
  torchrun --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "${GPUS_PER_NODE:-8}" \
  --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$addr:$port" \
  --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "${SHUTDOWN_TIMEOUT:-600}" \
  launch/train.py --config "$CONFIG" --recipe "$RECIPE" --output-dir "$out" --resume auto "$@" || rc=$?
# torchrun exits non-zero after forwarding a signal, so the run's own status decides.
if grep -q '"status": "preempted"' "$out/results.json" 2>/dev/null; then
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$rc"
