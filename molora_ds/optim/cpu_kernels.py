"""The preconditioner's CPU kernels (``precondition_cpu.cpp``), built on first use.

Built with torch's C++ extension loader into ``TORCH_EXTENSIONS_DIR`` (``scripts/setup.sh`` prebuilds it;
otherwise the first use compiles it, about a minute, once per machine). Where it cannot be built (no C++
compiler), the torch ops in ``riemannian.py`` do the same math, with one warning.
``MOLORA_DS_CPU_KERNELS=0`` turns the kernels off.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("precondition_cpu.cpp")
RANKS = (1, 2, 4, 8, 16)  # compiled in (a template argument); other ranks take the torch ops


@functools.cache
def kernels():
    """The built extension module, or None."""
    if os.environ.get("MOLORA_DS_CPU_KERNELS", "1") == "0":
        return None
    from torch.utils.cpp_extension import load

    try:
        return load("molora_ds_precondition_cpu", [str(SOURCE)], extra_cflags=["-O3", "-fopenmp-simd"])
    except Exception as error:  # no compiler, or a failed build: the torch ops still work
        warnings.warn(
            f"molora_ds: the CPU preconditioner kernels could not be built ({error}); using torch ops, "
            "which are several times slower on CPU",
            stacklevel=2,
        )
        return None


def usable(*tensors: torch.Tensor, rank: int) -> bool:
    """True if the kernels can take these factors or gradients: batches of experts ``[E, ., .]``, fp32,
    contiguous, on CPU, r in RANKS (one expert's ``[r, in]`` matrices take the torch ops)."""
    return (
        all(
            t.dim() == 3 and t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
            for t in tensors
        )
        and rank in RANKS
        and kernels() is not None
    )
