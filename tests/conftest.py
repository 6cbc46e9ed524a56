"""Shared test set-up: the environment of scripts/env.sh, pinned torch threads, and the test tiers.

Tiers follow the directories: tests/unit (one process, CPU), tests/distributed (several gloo
processes, marked ``distributed``) and tests/gpu (marked ``gpu``, skipped without CUDA). A test
elsewhere can carry either marker itself.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

# One thread per process: the two ranks of a distributed test share the machine's 2 cores, and a
# fixed thread count keeps CPU reductions (and so losses compared across runs) reproducible.
TEST_THREADS = int(os.environ.get("MOLORA_TEST_THREADS", "1"))
TESTS_DIR = Path(__file__).resolve().parent
# A test under tests/<tier>/ gets the marker of that name.
TIERS = ("gpu", "distributed")


def _export_env() -> None:
    """Set what scripts/env.sh sets, so tests run the same under plain `pytest` and their
    subprocesses (torchrun, deepspeed) inherit it. Runs at import, before anything imports torch."""
    cache = Path(os.environ.setdefault("MOLORA_CACHE", str(Path.home() / ".cache" / "molora_ds")))
    # Without it each run JIT-compiles DeepSpeed's shm comm op (~1 min) into a fresh dir.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache / "torch_extensions"))
    # Subprocess tests start `torchrun` and `deepspeed` by name: use this interpreter's.
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "").split(os.pathsep)
    if path[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, *path])
    os.environ.update(
        {
            "OMP_NUM_THREADS": str(TEST_THREADS),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )


_export_env()


def _tier(path: Path) -> str | None:
    try:
        top = path.resolve().relative_to(TESTS_DIR).parts[0]
    except ValueError:
        return None
    return top if top in TIERS else None


def pytest_configure(config: pytest.Config) -> None:
    import torch

    torch.set_num_threads(TEST_THREADS)
    torch.set_num_interop_threads(TEST_THREADS)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = _tier(item.path)
        if tier is not None:
            item.add_marker(tier)

    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same RNG state, whatever ran before it."""
    import torch

    random.seed(0)
    torch.manual_seed(0)
