"""``MoLoRALinear``: a frozen ``nn.Linear`` plus a routed mixture of low-rank experts."""

from __future__ import annotations

import math

import torch
from torch import nn

from molora_ds.modules.experts import mixture_of_lora_experts
from molora_ds.modules.router import Router, switch_balance_loss


class MoLoRALinear(nn.Module):
    """``y = W x + s * sum_i g_i B_i A_i dropout(x)``, ``g = renormalised top-k of softmax(Wg x)``.

    ``s = alpha / r``. With ``gate_rescale`` the backward through expert i is scaled by
    ``sqrt(g_i)`` instead of ``g_i`` (Sun et al. 2025, Algorithm 1); the forward is unchanged.
    After each forward, ``expert_load`` holds the share of routing slots each expert received
    in it, ``routed_slots`` the slot counts summed over the training forwards since
    ``pop_routed_slots()`` (a step's whole load, for logging), and, when ``load_balance_coef > 0``, ``aux_loss`` holds the weighted Switch balance loss.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        num_experts: int,
        rank: int,
        top_k: int,
        alpha: float,
        dropout: float = 0.0,
        gate_rescale: bool = True,
        load_balance_coef: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"MoLoRALinear wraps nn.Linear, got {type(base_layer).__name__}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        self.base_layer = base_layer.requires_grad_(False)
        # Not weight.shape: a ZeRO-3 partitioned weight (a model loaded under zero.Init) is empty here.
        out_features, in_features = base_layer.out_features, base_layer.in_features
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, rank, **factory))
        self.router = Router(in_features, num_experts, top_k, **factory)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.num_experts, self.rank, self.top_k = num_experts, rank, top_k
        self.scaling = alpha / rank
        self.gate_rescale = gate_rescale
        self.load_balance_coef = load_balance_coef
        self.expert_load: torch.Tensor | None = None
        self.routed_slots: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None
        self.reset_adapter()

    def reset_adapter(self) -> None:
        """PEFT's LoRA init per expert: A kaiming-uniform(a=sqrt(5)), B zeros (so the layer starts as W)."""
        with torch.no_grad():
            for a in self.lora_A:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_B.zero_()
            self.router.reset_parameters()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        tokens = x.reshape(-1, x.shape[-1])
        gates, probs = self.router(tokens)
        delta = mixture_of_lora_experts(
            self.dropout(tokens).to(self.lora_A.dtype),
            self.lora_A,
            self.lora_B,
            gates,
            self.scaling,
            self.gate_rescale,
        )
        training = torch.is_grad_enabled()  # evaluation forwards are not training load
        with torch.no_grad():
            slots = (gates > 0).sum(0)
            self.expert_load = slots.float() / (gates.shape[0] * self.top_k)
            if training:
                self.routed_slots = slots if self.routed_slots is None else self.routed_slots + slots
        self.aux_loss = (
            self.load_balance_coef * switch_balance_loss(gates, probs) if self.load_balance_coef else None
        )
        return y + delta.reshape(y.shape).to(y.dtype)

    def pop_routed_slots(self) -> torch.Tensor:
        """Slot counts per expert since the last call (zeros if none), and start counting anew."""
        slots = self.routed_slots
        self.routed_slots = None
        return slots if slots is not None else torch.zeros(self.num_experts, dtype=torch.long)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, rank={self.rank}, "
            f"top_k={self.top_k}, scaling={self.scaling:g}, gate_rescale={self.gate_rescale}"
        )
