"""fp32 adapters under ``torch.autocast(bfloat16)`` train as an ``nn.Linear`` does there.

The reference is the same layer in float64 without autocast (test_layer.py proves that one equal
to a per-expert loop). Under autocast the matmuls take bf16 inputs (unit roundoff u = 2^-8) with
fp32 accumulation; each output below passes through at most five such roundings (x, A, B, the
upstream gradient, the intermediate h), so its norm-wise relative error is about 5u = 0.02 at
first order: the bound is that, the same one test_layer.py uses for a bf16 layer.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from molora_ds import MoLoRALinear

BF16_REL = 5 * 2.0**-8


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.parametrize("compute", ["dense", "sparse"])
@pytest.mark.parametrize("rescale", [False, True])
def test_fp32_adapter_trains_under_bf16_autocast(rescale: bool, compute: str) -> None:
    """The sparse path failed under CPU autocast ("addmm_out_sparse_csr_impl_mkl" not implemented for
    'BFloat16'): autocast recast its fp32 CSR products to bf16."""
    torch.manual_seed(0)
    layer = MoLoRALinear(nn.Linear(32, 24), 6, 2, 3, alpha=4.0, gate_rescale=rescale, expert_compute=compute)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
    ref = copy.deepcopy(layer).double()
    x = torch.randn(4, 5, 32)
    upstream = torch.randn(4, 5, 24)

    xa = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(xa)
    assert y.dtype == torch.bfloat16  # as nn.Linear under autocast
    (y.float() * upstream).sum().backward()  # failed before: "expected ... BFloat16 but found Float"

    xr = x.double().requires_grad_()
    (ref(xr) * upstream.double()).sum().backward()
    pairs = {
        "y": (y, ref(xr).detach()),
        "x": (xa.grad, xr.grad),
        "lora_A": (layer.lora_A.grad, ref.lora_A.grad),
        "lora_B": (layer.lora_B.grad, ref.lora_B.grad),
        "router": (layer.router.weight.grad, ref.router.weight.grad),
    }
    for name, (got, want) in pairs.items():
        if name != "y":
            assert got.dtype == torch.float32, f"{name}: gradients keep the parameter's dtype"
        assert rel_err(got, want) < BF16_REL, name
