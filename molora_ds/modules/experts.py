"""All experts of a layer in two batched matmuls, with the gate-rescaled backward of Sun et al.

Experts are stacked, ``A_cat [E*r, in]`` and ``B_cat [out, E*r]``, so the forward is

    h = x @ A_cat^T            [T, E*r]
    y = s * (h * g_rep) @ B_cat^T

with ``g_rep`` the gates repeated r times. Nothing of size ``[T, E, out]`` is ever built.
"""

from __future__ import annotations

import torch


class MixtureOfLoRAExperts(torch.autograd.Function):
    """``y = s * sum_i g_i B_i A_i x``; with ``rescale`` the backward weights expert i by ``sqrt(g_i)``.

    With ``rescale=True`` the backward equals the autograd of
    ``s * sum_i [c_i o_i + (g_i - c_i) o_i.detach()]``, ``c_i = sqrt(g_i).detach()``: A, B and x
    receive gradients through expert i scaled by ``sqrt(g_i)`` instead of ``g_i``; the gate
    gradient ``dg_i = s * <dy, o_i>`` is the same in both modes.
    """

    @staticmethod
    def forward(ctx, x, a_cat, b_cat, gates, scaling: float, rescale: bool):  # type: ignore[override]
        rank = a_cat.shape[0] // gates.shape[-1]
        g_rep = gates.to(x.dtype).repeat_interleave(rank, dim=-1)
        h = x @ a_cat.t()
        y = (h * g_rep) @ b_cat.t()
        y = y.mul_(scaling)
        ctx.save_for_backward(x, a_cat, b_cat, gates, h)
        ctx.scaling, ctx.rescale, ctx.rank = scaling, rescale, rank
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, a_cat, b_cat, gates, h = ctx.saved_tensors
        s, rank = ctx.scaling, ctx.rank
        weights = gates.sqrt() if ctx.rescale else gates
        w_rep = weights.to(x.dtype).repeat_interleave(rank, dim=-1)
        dhg = (dy @ b_cat).mul_(s)  # d loss / d (h * g_rep)
        d_gates = None
        if ctx.needs_input_grad[3]:
            d_gates = (dhg.to(gates.dtype) * h.to(gates.dtype)).unflatten(-1, (-1, rank)).sum(-1)
        dh = dhg.mul_(w_rep)
        dx = dh @ a_cat if ctx.needs_input_grad[0] else None
        da = dh.t() @ x if ctx.needs_input_grad[1] else None
        db = (dy.t() @ (h * w_rep)).mul_(s) if ctx.needs_input_grad[2] else None
        return dx, da, db, d_gates, None, None


def mixture_of_lora_experts(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    gates: torch.Tensor,
    scaling: float,
    rescale: bool,
) -> torch.Tensor:
    """``x [T, in]``, ``lora_a [E, r, in]``, ``lora_b [E, out, r]``, ``gates [T, E]`` -> ``[T, out]``.

    Under ``torch.autocast`` the experts run in the autocast dtype, as ``nn.Linear`` does: x, A and B
    are cast before the function (the casts' backward returns the gradients in the parameters'
    dtype). Inside a custom Function autocast would cast the forward's matmuls but not the
    backward's, which then mixes bf16 gradients with fp32 weights.
    """
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x, lora_a, lora_b = x.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
    num_experts, rank, in_features = lora_a.shape
    a_cat = lora_a.reshape(num_experts * rank, in_features)
    b_cat = lora_b.permute(1, 0, 2).reshape(lora_b.shape[1], num_experts * rank)
    return MixtureOfLoRAExperts.apply(x, a_cat, b_cat, gates, scaling, rescale)
