# Environment shared by scripts/*.sh; source it, don't run it.
# Everything persistent lives under $MOLORA_CACHE so a re-run (or CI on the same machine) reuses it.

export MOLORA_CACHE="${MOLORA_CACHE:-$HOME/.cache/molora_ds}"
# Without a persistent dir, DeepSpeed's CPU accelerator re-JIT-compiles its shm comm op (~1 min) in
# every fresh /tmp; setup.sh prebuilds it here.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$MOLORA_CACHE/torch_extensions}"
export VIRTUAL_ENV="$MOLORA_CACHE/venv"
case ":$PATH:" in
  "$VIRTUAL_ENV/bin:"*) ;;
  *) export PATH="$VIRTUAL_ENV/bin:$PATH" ;;
esac
# The deepspeed launcher starts one process per CPU box (one NUMA node), so it may use every core;
# multi-process runs (torchrun, tests/distributed) set OMP_NUM_THREADS=1 per rank themselves.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
# Models and data come from installed packages; never wait on a hub this machine cannot reach.
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
# This checkout first: the venv's editable install may point at another clone of the project.
_MOLORA_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$_MOLORA_ROOT${PYTHONPATH:+:$PYTHONPATH}"
