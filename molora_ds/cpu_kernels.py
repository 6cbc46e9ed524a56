"""Our C++ CPU kernels, built on first use: the Riemannian preconditioner's (``optim/precondition_cpu.cpp``)
and the sparse experts' pair products (``modules/pairs_cpu.cpp``).

Built with torch's C++ extension loader into ``TORCH_EXTENSIONS_DIR`` (``scripts/setup.sh`` prebuilds them;
otherwise the first use compiles each, about a minute, once per machine). Where they cannot be built (no C++
compiler), torch ops do the same math (``riemannian.py``; the CSR kernels in ``sparse.py``), with one warning.
``MOLORA_DS_CPU_KERNELS=0`` turns them off.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch

PACKAGE = Path(__file__).parent
SOURCES = {
    "precondition": PACKAGE / "optim" / "precondition_cpu.cpp",
    "pairs": PACKAGE / "modules" / "pairs_cpu.cpp",
}
# The preconditioner's compiled ranks (a template argument); others take the torch ops.
RANKS = (1, 2, 4, 8, 16)


@functools.cache
def kernels(name: str = "precondition"):
    """The built extension module ``name`` (a key of SOURCES), or None."""
    if os.environ.get("MOLORA_DS_CPU_KERNELS", "1") == "0":
        return None
    from torch.utils.cpp_extension import load

    try:
        return load(
            f"molora_ds_{name}_cpu",
            [str(SOURCES[name])],
            extra_cflags=["-O3", "-fopenmp-simd"],
            extra_include_paths=[str(PACKAGE)],  # multiversion.h
        )
    except Exception as error:  # no compiler, or a failed build: the torch ops still work
        warnings.warn(
            f"molora_ds: the CPU {name} kernels could not be built ({error}); using torch ops, "
            "which are several times slower on CPU",
            stacklevel=2,
        )
        return None


def usable(*tensors: torch.Tensor, rank: int) -> bool:
    """True if the preconditioner's kernels can take these factors or gradients: batches of experts
    ``[E, ., .]``, fp32, contiguous, on CPU, r in RANKS (one expert's ``[r, in]`` matrices take the torch ops)."""
    return (
        all(
            t.dim() == 3 and t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
            for t in tensors
        )
        and rank in RANKS
        and kernels() is not None
    )
