"""``MoLoRALinear``: a frozen ``nn.Linear`` plus a routed mixture of low-rank experts."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from molora_ds.modules.experts import mixture_of_lora_experts
from molora_ds.modules.router import Router, switch_balance_loss
from molora_ds.modules.sparse import (
    routed_fits,
    routed_lora_experts,
    sparse_mixture_of_lora_experts,
    use_sparse,
)

EXPERT_COMPUTE = ("auto", "dense", "sparse")


class MoLoRALinear(nn.Module):
    """``y = W x + s * sum_i g_i B_i A_i dropout(x)``, ``g = renormalised top-k of softmax(Wg x)``.

    ``s = alpha / r``. With ``gate_rescale`` the backward through expert i is scaled by
    ``sqrt(g_i)`` instead of ``g_i`` (Sun et al. 2025, Algorithm 1); the forward is unchanged.
    After each forward, ``expert_load`` holds the share of routing slots each expert received
    in it, ``routed_slots`` the slot counts summed over the training forwards since
    ``pop_routed_slots()`` (a step's whole load, for logging), and, when ``load_balance_coef > 0``, ``aux_loss`` holds the weighted Switch balance loss.

    ``expert_compute``: ``dense`` multiplies every token by all E experts (one rank-E*r matmul),
    ``sparse`` only by its top_k (``molora_ds.modules.sparse``), ``auto`` picks by
    ``sparse.use_sparse``. The values and gradients are the same either way.
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
        expert_compute: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"MoLoRALinear wraps nn.Linear, got {type(base_layer).__name__}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        if expert_compute not in EXPERT_COMPUTE:
            raise ValueError(f"expert_compute={expert_compute!r}; choose one of {EXPERT_COMPUTE}")
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
        self.expert_compute = expert_compute
        self.expert_group = None  # set by shard_experts: this rank keeps only its experts
        self.dispatch = False  # set by shard_experts: tokens travel to the experts, not the experts here
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
        dropped = self.dropout(tokens).to(self.lora_A.dtype)
        if self.expert_group is not None and not self.dispatch and torch.is_grad_enabled():
            # Weight gather, recomputed in the backward (gather included): a layer's gathered experts live
            # while it runs, not from its forward to its backward, when every layer's would (the unsharded size).
            delta, slots, gates, probs = checkpoint(self._adapter, tokens, dropped, use_reentrant=False)
        else:
            delta, slots, gates, probs = self._adapter(tokens, dropped)
        self.expert_load = slots.float() / (tokens.shape[0] * self.top_k)
        if torch.is_grad_enabled():  # evaluation forwards are not training load
            self.routed_slots = slots if self.routed_slots is None else self.routed_slots + slots
        self.aux_loss = (
            self.load_balance_coef * switch_balance_loss(gates, probs) if self.load_balance_coef else None
        )
        return y.add_(delta.reshape(y.shape).to(y.dtype))  # in place: the base's backward does not need y

    def _adapter(self, tokens: torch.Tensor, dropped: torch.Tensor):
        """``(delta, slots per expert, gates, probs)``; gates and probs are None on the fused sparse path (no
        balance loss: the router runs inside ``sparse.routed_lora_experts``), probs without a balance loss."""
        lora_a, lora_b, coef = self.lora_A, self.lora_B, self.load_balance_coef
        if self.expert_group is not None and not self.dispatch:
            lora_a, lora_b = self.expert_group.gather(lora_a), self.expert_group.gather(lora_b)
        if self.sparse and not self.dispatch and not coef and routed_fits(tokens):
            delta, experts = routed_lora_experts(
                tokens,
                dropped,
                self.router.weight,
                lora_a,
                lora_b,
                self.top_k,
                self.scaling,
                self.gate_rescale,
            )
            return delta, torch.bincount(experts.reshape(-1), minlength=self.num_experts), None, None
        gates, probs = self.router(tokens, need_probs=coef > 0)
        args = (self.scaling, self.gate_rescale)
        if self.dispatch:
            delta = self.expert_group.dispatch(dropped, lora_a, lora_b, gates, self.top_k, *args)
        elif self.sparse:
            delta = sparse_mixture_of_lora_experts(dropped, lora_a, lora_b, gates, self.top_k, *args)
        else:
            delta = mixture_of_lora_experts(dropped, lora_a, lora_b, gates, *args)
        return delta, (gates.detach() > 0).sum(0), gates, probs

    def shard_experts(self, expert_group, dispatch: bool = False) -> None:
        """Keep only this rank's experts (``expert_group.shard``); the forward gathers the others' or, with
        ``dispatch``, sends each selected (token, expert) pair to its expert's rank (always sparse there).

        ``expert_group`` is a ``molora_ds.distributed.expert_parallel.ExpertGroup``.
        """
        self.lora_A = nn.Parameter(expert_group.shard(self.lora_A.detach()).clone())
        self.lora_B = nn.Parameter(expert_group.shard(self.lora_B.detach()).clone())
        self.expert_group, self.dispatch = expert_group, dispatch

    @property
    def sparse(self) -> bool:
        """Whether the forward computes only the selected experts."""
        if self.expert_compute == "auto":
            return use_sparse(self.num_experts, self.top_k, self.lora_A.device)
        return self.expert_compute == "sparse"

    def pop_routed_slots(self) -> torch.Tensor:
        """Slot counts per expert since the last call (zeros if none), and start counting anew."""
        slots = self.routed_slots
        self.routed_slots = None
        return slots if slots is not None else torch.zeros(self.num_experts, dtype=torch.long)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, rank={self.rank}, "
            f"top_k={self.top_k}, scaling={self.scaling:g}, gate_rescale={self.gate_rescale}, "
            f"expert_compute={self.expert_compute}"
        )
