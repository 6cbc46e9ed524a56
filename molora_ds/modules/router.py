"""Top-k softmax router over E experts."""

from __future__ import annotations

import torch
from torch import nn


def top_k_gates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax in (at least) fp32, keep the k largest, renormalise them to sum 1, zero the rest.

    Returns ``(gates [T, E], probs [T, E])``, both differentiable. bf16 logits are upcast: a bf16
    softmax over 20+ experts loses the small gate differences that top-k has to rank.
    """
    probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)
    if k == probs.shape[-1]:
        return probs, probs
    kept, idx = probs.topk(k, dim=-1)
    gates = torch.zeros_like(probs).scatter(-1, idx, kept / kept.sum(dim=-1, keepdim=True))
    return gates, probs


def switch_balance_loss(gates: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load-balancing loss ``E * sum_i f_i P_i`` (1.0 when perfectly balanced).

    ``f_i`` is the share of the T*k routing slots that went to expert i, ``P_i`` the mean router
    probability of expert i.
    """
    num_experts = probs.shape[-1]
    dispatch = (gates > 0).to(probs.dtype)
    f = dispatch.sum(0) / dispatch.sum()
    return num_experts * (f * probs.mean(0)).sum()


class Router(nn.Linear):
    """``nn.Linear(in, E, bias=False)`` whose forward returns top-k gates (fp32) and probabilities."""

    def __init__(self, in_features: int, num_experts: int, top_k: int, **factory) -> None:
        super().__init__(in_features, num_experts, bias=False, **factory)
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return top_k_gates(super().forward(x), self.top_k)
