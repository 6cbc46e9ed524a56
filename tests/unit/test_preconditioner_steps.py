"""GradientPreconditioner computes the r x r inverses once per optimizer step, without host syncs.

The parameters only change at the optimizer step, so every micro-batch (and every activation
recomputation) of a step can share one set of inverses; a failed factorisation is reported as a
tensor that the trainer folds into its one per-step non-finite check.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from molora_ds import MoLoRALinear
from molora_ds.optim import GradientPreconditioner
from molora_ds.optim.riemannian import preconditioners


def make_layer() -> MoLoRALinear:
    torch.manual_seed(0)
    layer = MoLoRALinear(nn.Linear(8, 6, dtype=torch.float64), 3, 2, 2, alpha=2.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def test_inverses_once_per_step_and_renewed_after_it():
    layer = make_layer()
    pre = GradientPreconditioner(layer, reg=1e-3)
    x = torch.randn(5, 8, dtype=torch.float64)
    layer(x).sum().backward()
    first = pre._inverses[layer]
    with torch.no_grad():
        layer.lora_B.mul_(2.0)  # as an optimizer step would change it
    layer(x).sum().backward()  # a second micro-batch of the same step: same inverses
    assert pre._inverses[layer] is first
    pre.new_step()
    layer(x).sum().backward()
    want = preconditioners(layer.lora_A, layer.lora_B, 1e-3)
    for got, w in zip(pre._inverses[layer], want):
        torch.testing.assert_close(got, w, rtol=1e-12, atol=0)


def test_failed_factorisation_is_a_tensor_not_an_exception():
    layer = make_layer()
    pre = GradientPreconditioner(layer, reg=1e-3)
    x = torch.randn(5, 8, dtype=torch.float64)
    layer(x).sum().backward()
    assert isinstance(pre.failed(), torch.Tensor) and not pre.failed()
    pre.new_step()
    with torch.no_grad():
        layer.lora_B[1, 0, 0] = float("nan")
    layer(x).sum().backward()
    assert pre.failed()
    with pytest.raises(torch.linalg.LinAlgError, match="not positive definite"):
        preconditioners(layer.lora_A, layer.lora_B, 1e-3)
