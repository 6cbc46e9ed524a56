"""Only the selected experts: the T*k (token, expert) pairs of a top-k router, grouped by expert.

The dense path (``experts.py``) multiplies every token by all E experts and lets zero gates drop
the unselected ones: ``T * E * r * (in + out)`` multiply-adds. Here the pairs are sorted by
expert (a stable argsort), cut into blocks of ``block`` rows that each belong to one expert
(an expert's last block is padded with rows whose gate is 0), and every product is one
``torch.bmm`` over the blocks: ``T * k * r * (in + out)`` multiply-adds, plus moving the pairs'
rows (``T * k * (in + out)`` elements). Padding a group only to a multiple of ``block``, never
to the largest group, bounds the waste by ``E * block`` rows whatever the load imbalance.

Same contract as the dense path (DESIGN.md section 1), gate rescale included: the backward
weights expert i's gradients to x, A and B by ``sqrt(g_i)`` with ``rescale``, and the gate
gradient is ``s * <dy, B_i A_i x>`` in both modes. Sums over pairs are gathers and segment
sums, not ``index_add_``: CUDA's atomics would make the result depend on thread timing, and
resume is promised bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_BLOCK = 64  # rows per bmm block: measured fastest on CPU among 32/64/128 (bench_experts.py)


@dataclass(frozen=True)
class ExpertBlocks:
    """Where each (token, slot) pair sits once grouped by expert.

    ``token [R]``: the token of each padded row (0 on padding rows, whose gate is 0);
    ``row [T*k]``: the padded row of pair ``t * k + j``; ``expert [nb]``: the expert of each block;
    ``blocks [E]``: blocks per expert (0 for an expert no token chose).
    """

    token: torch.Tensor
    row: torch.Tensor
    expert: torch.Tensor
    blocks: torch.Tensor
    block: int

    @property
    def num_blocks(self) -> int:
        return self.expert.numel()


def plan_blocks(indices: torch.Tensor, num_experts: int) -> ExpertBlocks:
    """Group the pairs of ``indices [T, k]`` (each token's selected experts) by expert.

    The block size is a power of two no larger than the mean pairs per expert (so padding adds at
    most as many rows as there are pairs) and at most ``MAX_BLOCK``. One host sync: the row count.
    """
    pairs = indices.numel()
    k = indices.shape[-1]
    mean = max(1, pairs // num_experts)
    block = min(MAX_BLOCK, 1 << (mean.bit_length() - 1))
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    blocks = (counts + block - 1) // block
    ends = blocks.cumsum(0)
    first_row = (ends - blocks) * block
    first_pair = counts.cumsum(0) - counts
    expert_sorted = flat[order]
    position = torch.arange(pairs, device=flat.device)
    row_sorted = first_row[expert_sorted] + position - first_pair[expert_sorted]
    num_blocks = int(ends[-1])
    row = torch.empty_like(row_sorted).scatter_(0, order, row_sorted)
    token = torch.zeros(num_blocks * block, dtype=torch.long, device=flat.device)
    token.index_copy_(0, row_sorted, order // k)
    expert = torch.repeat_interleave(
        torch.arange(num_experts, device=flat.device), blocks, output_size=num_blocks
    )
    return ExpertBlocks(token=token, row=row, expert=expert, blocks=blocks, block=block)


def _sum_pairs(rows: torch.Tensor, plan: ExpertBlocks, k: int) -> torch.Tensor:
    """``[R, n]`` padded rows -> ``[T, n]``: each token's k pair rows summed (padding rows dropped)."""
    return rows.index_select(0, plan.row).unflatten(0, (-1, k)).sum(1)


def _sum_blocks(per_block: torch.Tensor, plan: ExpertBlocks) -> torch.Tensor:
    """``[nb, ...]`` -> ``[E, ...]``: each expert's blocks summed (zeros for an expert without blocks)."""
    flat = per_block.reshape(plan.num_blocks, -1)
    summed = torch.segment_reduce(flat, "sum", lengths=plan.blocks, axis=0)
    return summed.reshape(-1, *per_block.shape[1:])


class SparseMixtureOfLoRAExperts(torch.autograd.Function):
    """``y_t = s * sum_j g_tj B_e A_e x_t`` over each token's k selected experts ``e = idx[t, j]``."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, gates, plan: ExpertBlocks, scaling: float, rescale: bool):  # type: ignore[override]
        nb, block = plan.num_blocks, plan.block
        k = gates.shape[-1]
        xs = x.index_select(0, plan.token).view(nb, block, -1)
        a_blk, b_blk = lora_a.index_select(0, plan.expert), lora_b.index_select(0, plan.expert)
        # Products with a dimension of r (4) are written as (small @ big^T)^T: measured 2-3x faster on CPU
        # than big @ small^T (bench/README.md).
        h = torch.bmm(a_blk, xs.mT).mT  # [nb, block, r]
        g_rows = _rows(gates, plan).to(x.dtype)
        z = torch.bmm(b_blk, (h * g_rows).mT).mT  # [nb, block, out]
        y = _sum_pairs(z.reshape(nb * block, -1), plan, k).mul_(scaling)
        ctx.save_for_backward(x, lora_a, lora_b, gates, h)
        ctx.plan, ctx.scaling, ctx.rescale = plan, scaling, rescale
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, lora_a, lora_b, gates, h = ctx.saved_tensors
        plan, s = ctx.plan, ctx.scaling
        nb, block, k = plan.num_blocks, plan.block, gates.shape[-1]
        a_blk, b_blk = lora_a.index_select(0, plan.expert), lora_b.index_select(0, plan.expert)
        dys = dy.index_select(0, plan.token).view(nb, block, -1)  # padding rows read token 0; weight 0
        u = torch.bmm(b_blk.mT, dys.mT).mT.mul_(s)  # d loss / d (h * g)
        d_gates = None
        if ctx.needs_input_grad[3]:
            per_row = (u.to(gates.dtype) * h.to(gates.dtype)).sum(-1).flatten()
            d_gates = per_row.index_select(0, plan.row).view_as(gates)
        g_rows = _rows(gates, plan)
        w_rows = (g_rows.sqrt() if ctx.rescale else g_rows).to(x.dtype)
        dh = u.mul_(w_rows)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _sum_pairs(torch.bmm(a_blk.mT, dh.mT).mT.reshape(nb * block, -1), plan, k)
        da = db = None
        if ctx.needs_input_grad[1]:
            xs = x.index_select(0, plan.token).view(nb, block, -1)  # gathered again, not kept: [T*k, in]
            da = _sum_blocks(torch.bmm(dh.mT, xs), plan)
        if ctx.needs_input_grad[2]:
            db = _sum_blocks(torch.bmm((h * w_rows).mT, dys).mT, plan).mul_(s)
        return dx, da, db, d_gates, None, None, None


def _rows(gates: torch.Tensor, plan: ExpertBlocks) -> torch.Tensor:
    """``[T, k]`` per-pair values -> ``[nb, block, 1]`` in padded row order, 0 on padding rows."""
    rows = gates.new_zeros(plan.token.numel())
    rows.index_copy_(0, plan.row, gates.reshape(-1))
    return rows.view(plan.num_blocks, plan.block, 1)


def sparse_mixture_of_lora_experts(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    gates: torch.Tensor,
    top_k: int,
    scaling: float,
    rescale: bool,
) -> torch.Tensor:
    """Same arguments and result as ``mixture_of_lora_experts`` (dense ``gates [T, E]``, zeros off the
    top k), computing only the top_k selected experts per token."""
    device = x.device.type
    if torch.is_autocast_enabled(device):  # as in the dense path: cast before the Function
        dtype = torch.get_autocast_dtype(device)
        x, lora_a, lora_b = x.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
    indices = gates.detach().topk(top_k, dim=-1).indices
    plan = plan_blocks(indices, lora_a.shape[0])
    selected = gates.gather(-1, indices)  # differentiable: the router's gradient flows back here
    return SparseMixtureOfLoRAExperts.apply(x, lora_a, lora_b, selected, plan, scaling, rescale)


# Sparse wins when E > SPARSE_FACTOR * k: the dense path does E*r multiply-adds per token and
# (in + out) element, the sparse one k*r in bmm blocks of r=4 columns (several times slower per
# multiply-add than one wide matmul) plus moving each pair's in + out elements. CPU: the crossover
# bench/bench_experts.py measured (its "fit" column, 55-100 at E >= 256; bench/README.md). CUDA: not
# measured (no GPU so far); the same rule until it is.
SPARSE_FACTOR = {"cpu": 64.0, "cuda": 64.0}


def use_sparse(num_experts: int, top_k: int, device: torch.device) -> bool:
    """The ``expert_compute="auto"`` rule: sparse iff ``num_experts > SPARSE_FACTOR[device] * top_k``."""
    return num_experts > SPARSE_FACTOR.get(device.type, SPARSE_FACTOR["cuda"]) * top_k
