"""Which launcher's variables become RANK/WORLD_SIZE (molora_ds/distributed/env.py)."""

from __future__ import annotations

import os

import pytest
import torch

from molora_ds.distributed.env import LaunchEnv, setup_env, world_size


def test_mpirun_inside_a_slurm_allocation_reads_open_mpi(monkeypatch):
    # What rank 1 of `mpirun -np 2` inside an sbatch script sees: the batch step's Slurm variables too.
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "7",
           "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "MOLORA_MASTER_PORT": "29999"}  # fmt: skip
    monkeypatch.setattr(os, "environ", env)
    assert world_size() == 2
    assert setup_env() == LaunchEnv("mpi", rank=1, world_size=2, local_rank=1)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("1", "2", "1")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("127.0.0.1", "29999")


@pytest.mark.parametrize(
    ("env", "launcher", "size", "local_rank"),
    [
        # torchrun / the deepspeed launcher on the second node of 2 x 4 GPUs
        ({"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "torch", 8, 2),
        ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "12345"}, "slurm", 4, 1),
        ({"SLURM_NTASKS": "2"}, "single", 1, 0),  # a salloc shell: no task of a step, so one process
        ({}, "single", 1, 0),
    ],
)  # fmt: skip
def test_launchers(monkeypatch, env, launcher, size, local_rank):
    monkeypatch.setattr(os, "environ", dict(env))
    assert world_size() == size
    got = setup_env()
    assert (got.launcher, got.world_size, got.local_rank) == (launcher, size, local_rank)
    assert got.rank == int(os.environ["RANK"])
    assert os.environ["WORLD_SIZE"] == str(size)
    assert os.environ["LOCAL_RANK"] == str(local_rank)
    if launcher == "slurm":
        assert os.environ["MASTER_PORT"] == str(20000 + 12345 % 10000)


def test_cpu_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert LaunchEnv("torch", 3, 4, 1).bind_device() == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_follows_local_rank():
    last = torch.cuda.device_count() - 1
    assert LaunchEnv("torch", last, last + 1, last).bind_device() == torch.device("cuda", last)
    assert torch.cuda.current_device() == last
