"""Which launcher's variables become RANK/WORLD_SIZE (molora_ds/distributed/env.py)."""

from __future__ import annotations

import os

import pytest

from molora_ds.distributed.env import setup_env, world_size


def test_mpirun_inside_a_slurm_allocation_reads_open_mpi(monkeypatch):
    # What rank 1 of `mpirun -np 2` inside an sbatch script sees: the batch step's Slurm variables too.
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "7",
           "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "MOLORA_MASTER_PORT": "29999"}  # fmt: skip
    monkeypatch.setattr(os, "environ", env)
    assert world_size() == 2
    assert setup_env() == "mpi"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("1", "2", "1")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("127.0.0.1", "29999")


@pytest.mark.parametrize(
    ("env", "launcher", "size"),
    [
        ({"RANK": "0", "WORLD_SIZE": "4", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "torch", 4),
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "12345"}, "slurm", 2),
        ({"SLURM_NTASKS": "2"}, "single", 1),  # a salloc shell: no task of a step, so one process
        ({}, "single", 1),
    ],
)
def test_launchers(monkeypatch, env, launcher, size):
    monkeypatch.setattr(os, "environ", dict(env))
    assert world_size() == size
    assert setup_env() == launcher
    assert os.environ["WORLD_SIZE"] == str(size)
    if launcher == "slurm":
        assert os.environ["MASTER_PORT"] == str(20000 + 12345 % 10000)
