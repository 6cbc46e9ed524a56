"""Process-group environment for every launcher: deepspeed/torchrun, Slurm srun, mpirun, or none.

DeepSpeed reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT only; Slurm and Open MPI
name these differently, and a plain ``python train.py`` sets none of them.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch

# Open MPI first: mpirun inside a Slurm allocation (sbatch, salloc) hands every rank the batch
# step's SLURM_PROCID=0 and SLURM_NTASKS, which would make each rank a rank 0 of its own.
_LAUNCHERS = {
    "mpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    "slurm": ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_master() -> str:
    """One node: loopback. Several: the job script must export MASTER_ADDR (node names may not resolve)."""
    if int(os.environ.get("SLURM_NNODES", "1")) == 1:
        return "127.0.0.1"
    raise RuntimeError(
        "multi-node Slurm job without MASTER_ADDR: export MASTER_ADDR=<first node's address> in the job script "
        "(see launch/slurm.sbatch)"
    )


def world_size() -> int:
    """The process count the launcher announces, read as ``setup_env`` reads it (1 without one);
    cheap, so that the batch arithmetic is checked before any process group exists."""
    if "RANK" in os.environ and os.environ.get("WORLD_SIZE", "").isdigit():
        return int(os.environ["WORLD_SIZE"])
    for rank, size, _ in _LAUNCHERS.values():
        if rank in os.environ and os.environ.get(size, "").isdigit():
            return int(os.environ[size])
    return 1


def rank() -> int:
    """This process's global rank as the launcher announces it (0 without one), read like ``world_size``."""
    if "RANK" in os.environ and os.environ["RANK"].isdigit():
        return int(os.environ["RANK"])
    for name, _, _ in _LAUNCHERS.values():
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process: the one source of truth for its rank and device."""

    launcher: str  # torch (torchrun, the deepspeed launcher), slurm, mpi or single
    rank: int
    world_size: int
    local_rank: int

    def bind_device(self) -> torch.device:
        """This process's device, made current: ``cuda:LOCAL_RANK`` on GPUs, else the CPU.

        Called before anything touches CUDA: otherwise every rank's first tensor, and
        ``torch.cuda.current_device()``, land on cuda:0 while DeepSpeed puts the model on
        cuda:LOCAL_RANK.
        """
        if not torch.cuda.is_available():
            return torch.device("cpu")
        if self.local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={self.local_rank} but this node has {torch.cuda.device_count()} GPUs: start at most "
                "that many processes per node"
            )
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)


def setup_env() -> LaunchEnv:
    """Fill the torch.distributed variables from the launcher's; returns what they say."""
    name = _fill_env()
    e = os.environ
    return LaunchEnv(name, int(e["RANK"]), int(e["WORLD_SIZE"]), int(e.get("LOCAL_RANK", "0")))


def _fill_env() -> str:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        # torchrun and the deepspeed launcher set LOCAL_RANK; a hand-made RANK/WORLD_SIZE may not.
        os.environ.setdefault("LOCAL_RANK", "0")
        return "torch"
    for name, (rank, size, local) in _LAUNCHERS.items():
        if rank in os.environ:
            os.environ.update(
                RANK=os.environ[rank], WORLD_SIZE=os.environ[size], LOCAL_RANK=os.environ.get(local, "0")
            )
            if name == "slurm":
                if "MASTER_ADDR" not in os.environ:
                    os.environ["MASTER_ADDR"] = _slurm_master()
                os.environ.setdefault(
                    "MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 10000)
                )
            else:
                os.environ.setdefault("MASTER_ADDR", os.environ.get("MOLORA_MASTER_ADDR", "127.0.0.1"))
                os.environ.setdefault("MASTER_PORT", os.environ.get("MOLORA_MASTER_PORT", "29511"))
            return name
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    return "single"
