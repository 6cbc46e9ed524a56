"""The expert load logged per step counts every training forward since the last log, not the last one."""

from __future__ import annotations

import torch
from torch import nn

from molora_ds import MoLoRALinear


def test_routed_slots_sum_training_forwards_only():
    torch.manual_seed(0)
    layer = MoLoRALinear(nn.Linear(8, 6), 5, 2, 2, alpha=2.0)
    xs = [torch.randn(7, 8) for _ in range(3)]
    want = torch.zeros(5, dtype=torch.long)
    for x in xs:  # three micro-batches of a step
        layer(x)
        gates = layer.router(x)[0]
        want += (gates > 0).sum(0)
    with torch.no_grad():
        layer(torch.randn(9, 8))  # evaluation: not training load
    got = layer.pop_routed_slots()
    assert torch.equal(got, want) and got.sum() == 3 * 7 * 2
    assert torch.equal(layer.pop_routed_slots(), torch.zeros(5, dtype=torch.long))  # reset by the pop
