"""Top-k softmax router over E experts."""

from __future__ import annotations

import math

import torch
from torch import nn

from molora_ds.modules import sparse


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


class RouterLogits(torch.autograd.Function):
    """``x @ weight^T`` in (at least) fp32 whatever the inputs' dtypes and any autocast; gradients too.

    bf16 logits carry ~3 significant digits: at E=20, in=4096 about 0.3% of tokens get another
    top-10 set than from fp32 logits of the same bf16 values. Plain autograd of
    ``x.float() @ weight.float().T`` would keep an fp32 copy of x for the backward (twice the bf16
    activation, in every MoLoRA layer); this saves x as given and upcasts again in the backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        dtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            return x.to(dtype) @ weight.to(dtype).T

    @staticmethod
    def backward(ctx, d_logits: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        dtype = d_logits.dtype
        with torch.autocast(x.device.type, enabled=False):
            dx = (d_logits @ weight.to(dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
            dw = (d_logits.T @ x.to(dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw


class SelectedLogits(torch.autograd.Function):
    """The logits at ``indices [T, k]`` (given: ``values``, computed without grad), with their sparse gradients.

    A top-k renormalised softmax is the softmax of the k selected logits: the others get no gradient (without
    a balance loss, which needs every probability). So ``d logits`` has k entries per row, and the backward
    is two sparse products over the (token, expert) pairs (``sparse.py``'s kernels where they fit, r = 1)
    instead of two dense GEMMs over all E experts: at E=256, top-8 they were most of the router's time.
    Computed in (at least) fp32, as ``RouterLogits``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor):  # type: ignore[override]
        ctx.save_for_backward(x, weight, indices)
        return values

    @staticmethod
    def backward(ctx, d_selected: torch.Tensor):  # type: ignore[override]
        x, weight, indices = ctx.saved_tensors
        (tokens, num_experts), dtype = (x.shape[0], weight.shape[0]), d_selected.dtype
        with torch.autocast(x.device.type, enabled=False):
            xs, ws = x.to(dtype).contiguous(), weight.to(dtype).contiguous()
            if sparse.kernels_fit(xs):
                rows = torch.arange(tokens, device=x.device).repeat_interleave(indices.shape[1])
                runs = sparse.expert_runs(rows, indices.reshape(-1), tokens, num_experts)
                d = d_selected.reshape(-1, 1).contiguous()
                dx, dw = runs.expand(d, ws.unsqueeze(1)), runs.outer(d, xs).squeeze(1)
            else:
                d_logits = d_selected.new_zeros(tokens, num_experts).scatter_(-1, indices, d_selected)
                dx, dw = d_logits @ ws, d_logits.T @ xs
        dx = dx.to(x.dtype) if ctx.needs_input_grad[0] else None
        dw = dw.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


def sparse_top_k_gates(x: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    """``top_k_gates(x @ weight^T, k)[0]`` (the same math: the softmax of the k largest logits), with the
    router's backward touching only the selected logits (``SelectedLogits``)."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        logits = x.to(dtype) @ weight.to(dtype).T
        values, indices = logits.topk(k, dim=-1)
    selected = SelectedLogits.apply(x, weight, indices, values)
    return torch.zeros_like(logits).scatter(-1, indices, selected.softmax(dim=-1))


class Router(nn.Module):
    """Top-k gates (fp32) and probabilities from ``softmax(x @ weight^T)``, ``weight [E, in]``.

    Stores and initialises ``weight`` as ``nn.Linear(in, E, bias=False)`` would, but is not one: it
    returns a tuple, and tools that find linears by type (PEFT's "all-linear", quantisers) must not
    wrap it.
    """

    def __init__(self, in_features: int, num_experts: int, top_k: int, **factory) -> None:
        super().__init__()
        self.in_features, self.num_experts, self.top_k = in_features, num_experts, top_k
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default

    def forward(self, x: torch.Tensor, need_probs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(gates, probs)``; without ``need_probs`` (no balance loss) and with top_k < E, probs is None and
        the backward is sparse (``sparse_top_k_gates``)."""
        if need_probs or self.top_k == self.num_experts:
            return top_k_gates(RouterLogits.apply(x, self.weight), self.top_k)
        return sparse_top_k_gates(x, self.weight, self.top_k), None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_experts={self.num_experts}, top_k={self.top_k}"
