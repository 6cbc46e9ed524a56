"""Only the selected experts: the T*k (token, expert) pairs of a top-k router.

The dense path (``experts.py``) multiplies every token by all E experts and lets zero gates drop
the unselected ones: ``T * E * r * (in + out)`` multiply-adds. Here every product runs over the pairs
only, through three operations on a pair plan (``w`` an expert's r rows, ``[E, r, D]``):

    project(x, w) -> h [pairs, r]:  h_p = w_e x_t            expand(h, w) -> [T, D]:  sum over t's pairs of h_p w_e
    outer(h, x) -> [E, r, D]:        sum over e's pairs of h_p^T x_t

    h = project(x, A)       y  = s * expand(g h, B^T)     u = s * project(dy, B^T)   (d loss / d (g h))
    dx = expand(w u, A)      dA = outer(w u, x)            dB^T = s * outer(w h, dy)

Two implementations of the plan: our CPU kernels (``ExpertRuns``, ``pairs_cpu.cpp``, fp32), which keep
an expert's rows in cache while its tokens stream by and write each output row once; and torch's CSR
kernels (``PairPlan``: project is an SDDMM, expand an SpMM, outer an SpMM with the transpose), the portable
path for fp64, CUDA without ``grouped_fits`` and machines where the kernels cannot be built. The first
version grouped tokens by expert into padded bmm blocks, copied every pair's ``in + out`` elements and ran
slower than dense at E=256, top-8 on CPU; the CSR kernels reached 3.1-3.5x faster than dense; our kernels
(and the router's sparse backward, ``router.SelectedLogits``) 4.1-5.4x in three runs; with router and experts
in one Function (``RoutedLoRAExperts``: one pass over x for dA and the router's dW) 6.5-7.2x (bench/README.md).

Same contract as the dense path (DESIGN.md section 1), gate rescale included: the backward weights
expert i's gradients to x, A and B by ``w = sqrt(g_i)`` with ``rescale`` (else ``g_i``), and the
gate gradient is ``s * <dy, B_i A_i x>`` in both modes. No atomics: every output element is one sum
in a fixed order in both implementations (run-to-run identical on CPU; our kernels also on any thread
count, tests/unit/test_sparse.py), so resume stays bit-exact. Half-precision inputs are computed in fp32 and
the results cast back (one rounding fewer than a bf16 kernel). On CUDA, where ``grouped_fits``, the pairs
go through ``torch.nn.functional.grouped_mm`` instead (``grouped_lora_experts``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from molora_ds import cpu_kernels

KERNEL_DTYPES = (torch.float32, torch.float64)  # what torch's CPU CSR kernels (MKL) implement


@dataclass(frozen=True)
class PairPlan:
    """The pattern of ``P [T, E*r]`` and of its transpose: the products with the CSR kernels.

    ``crow [T+1]``, ``col [T*k*r]``: P in CSR (row t holds its k experts' r columns, ascending);
    ``perm [T*k*r]``: P's entries in the transpose's order; ``crow_t [E*r+1]``, ``col_t``: P^T in
    CSR (row ``e*r+i`` lists the tokens that chose e, ascending; none for an expert no token chose).
    """

    crow: torch.Tensor
    col: torch.Tensor
    perm: torch.Tensor
    crow_t: torch.Tensor
    col_t: torch.Tensor
    shape: tuple[int, int]

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        """P with ``values`` (one per pair and rank index, in P's row order)."""
        return _csr(self.crow, self.col, values, self.shape)

    def transposed(self, values: torch.Tensor) -> torch.Tensor:
        """P^T with the same ``values`` (given in P's row order)."""
        return _csr(self.crow_t, self.col_t, values.index_select(0, self.perm), self.shape[::-1])

    def project(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``h [pairs, r]``: each pair's expert rows ``w [E, r, D]`` times its token's row of ``x [T, D]`` (SDDMM)."""
        zeros = self.matrix(x.new_zeros(self.col.numel()))
        rows = w.reshape(-1, w.shape[-1])
        return torch.sparse.sampled_addmm(zeros, x, rows.T, beta=0.0).values().view(-1, w.shape[1])

    def expand(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``out [T, D]``: each token's sum over its pairs of ``h[p] @ w[e]`` (SpMM)."""
        return self.matrix(h.reshape(-1)) @ w.reshape(-1, w.shape[-1])

    def outer(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``g [E, r, D]``: each expert's sum over its pairs of ``h[p]^T x[t]`` (SpMM with P^T)."""
        rank = h.shape[-1]
        return (self.transposed(h.reshape(-1)) @ x).view(self.shape[1] // rank, rank, -1)


def _csr(crow, col, values, shape) -> torch.Tensor:
    # The plan builds sorted, in-range indices; torch's invariant check would cost a pass each time.
    return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def plan_pairs(
    rows: torch.Tensor, experts: torch.Tensor, num_rows: int, num_experts: int, rank: int
) -> PairPlan:
    """The pattern of the pairs ``(rows[p], experts[p])``: sorted by row, experts ascending within a row,
    any number per row (k per token on one process; a token's experts on this rank under token dispatch)."""
    device = rows.device
    col = (experts.unsqueeze(-1) * rank + torch.arange(rank, device=device)).reshape(-1)
    crow = torch.zeros(num_rows + 1, dtype=torch.long, device=device)
    crow[1:] = torch.bincount(rows, minlength=num_rows).cumsum(0) * rank
    perm = torch.argsort(col, stable=True)
    crow_t = torch.zeros(num_experts * rank + 1, dtype=torch.long, device=device)
    crow_t[1:] = torch.bincount(col, minlength=num_experts * rank).cumsum(0)
    col_t = rows.repeat_interleave(rank).index_select(0, perm)  # the row of each entry, in P^T's order
    return PairPlan(crow, col, perm, crow_t, col_t, (num_rows, num_experts * rank))


@dataclass(frozen=True)
class ExpertRuns:
    """The same products with our CPU kernels (``pairs_cpu.cpp``, fp32): the pairs sorted by expert
    (``order``, their ``token``, expert e's run ``offsets[e] .. offsets[e+1]``) for ``project`` and
    ``outer``, which keep one expert's rows in cache while its tokens stream by; by token (``experts``,
    ``row_offsets``) for ``expand``, which writes each token's row once. Any rank: r is a tensor dimension."""

    order: torch.Tensor
    token: torch.Tensor
    offsets: torch.Tensor
    experts: torch.Tensor
    row_offsets: torch.Tensor

    def project(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.kernels("pairs").project(x, w, self.order, self.token, self.offsets)

    def expand(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.kernels("pairs").expand(h, w, self.experts, self.row_offsets)

    def outer(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.kernels("pairs").outer(h, x, self.order, self.token, self.offsets)


def expert_runs(rows: torch.Tensor, experts: torch.Tensor, num_rows: int, num_experts: int) -> ExpertRuns:
    """The pairs ``(rows[p], experts[p])`` (sorted by row, any number per row) for the CPU kernels."""
    rows, experts = rows.contiguous(), experts.contiguous()
    order = torch.argsort(experts, stable=True)
    offsets = experts.new_zeros(num_experts + 1)
    offsets[1:] = torch.bincount(experts, minlength=num_experts).cumsum(0)
    row_offsets = rows.new_zeros(num_rows + 1)
    row_offsets[1:] = torch.bincount(rows, minlength=num_rows).cumsum(0)
    return ExpertRuns(order, rows.index_select(0, order), offsets, experts, row_offsets)


def kernels_fit(x: torch.Tensor) -> bool:
    """Whether our CPU kernels take ``x``'s products: fp32 on CPU, the kernels built."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and cpu_kernels.kernels("pairs") is not None


def plan(rows: torch.Tensor, experts: torch.Tensor, x: torch.Tensor, num_experts: int, rank: int):
    """``ExpertRuns`` where ``kernels_fit(x)``, else the CSR ``PairPlan``: both have project, expand, outer."""
    if kernels_fit(x):
        return expert_runs(rows, experts, x.shape[0], num_experts)
    return plan_pairs(rows, experts, x.shape[0], num_experts, rank)


def _pairs_forward(plan, x, lora_a, lora_b, gates, scaling: float):
    """``(y, b_rows, h)``: ``h = project(x, A)``, ``y = expand(s g h, B^T)`` over the pairs (``gates`` one per pair;
    s times the [pairs] gates, not the [T, out] result); ``b_rows = B^T [E, r, out]`` and h kept for the backward."""
    b_rows = lora_b.transpose(1, 2).contiguous()
    h = plan.project(x, lora_a)
    return plan.expand(h * (gates.to(x.dtype) * scaling).unsqueeze(-1), b_rows), b_rows, h


def _pairs_backward(plan, dy, b_rows, gates, h, scaling: float, rescale: bool):
    """``(d_gates, dh, w)`` of ``_pairs_forward``: d loss / d g per pair; d loss / d h with expert weight
    ``w = sqrt(g)`` (``rescale``) or ``g`` in place of g, which dx and dA take; w, which dB takes."""
    u = plan.project(dy, b_rows).mul_(scaling)  # d loss / d (h * g)
    d_gates = (u * h).sum(-1)
    w = (gates.sqrt() if rescale else gates).to(h.dtype).unsqueeze(-1)
    return d_gates, u.mul_(w), w


class SparseMixtureOfLoRAExperts(torch.autograd.Function):
    """``y_t = s * sum_p g_p B_e(p) A_e(p) x_t`` over the pairs p of row t (``plan``; ``gates`` one per pair).

    Autocast is off inside: the caller casts the inputs (``selected_lora_experts``), and an active autocast
    would recast the products to bf16, which neither kernel implements.
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, gates, plan, scaling: float, rescale: bool):  # type: ignore[override]
        with torch.autocast(x.device.type, enabled=False):
            y, b_rows, h = _pairs_forward(plan, x, lora_a, lora_b, gates, scaling)
            ctx.save_for_backward(x, lora_a, b_rows, gates, h)
            ctx.plan, ctx.scaling, ctx.rescale = plan, scaling, rescale
            return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        with torch.autocast(dy.device.type, enabled=False):
            x, lora_a, b_rows, gates, h = ctx.saved_tensors
            plan, s = ctx.plan, ctx.scaling
            dy = dy.contiguous()
            d_gates, dh, w = _pairs_backward(plan, dy, b_rows, gates, h, s, ctx.rescale)
            d_gates = d_gates.to(gates.dtype) if ctx.needs_input_grad[3] else None
            dx = plan.expand(dh, lora_a) if ctx.needs_input_grad[0] else None
            da = plan.outer(dh, x) if ctx.needs_input_grad[1] else None
            db = plan.outer(h * (w * s), dy).transpose(1, 2) if ctx.needs_input_grad[2] else None
            return dx, da, db, d_gates, None, None, None


class RoutedLoRAExperts(torch.autograd.Function):
    """``SparseMixtureOfLoRAExperts`` on our CPU kernels with the router inside: the gates are the softmax of
    the k selected ``logits [T, k]`` (given, computed without grad), and the backward computes the router's
    gradient beside the experts' (``router.SelectedLogits``'s math: ``d logits = g (d g - sum g d g)``).
    Where router and experts see the same x (no dropout), the router's weight rides as an (r+1)-th row of
    every expert: one ``outer`` pass over x gives dA and the router's dW, one ``expand`` both terms of dx
    (separately these passes, memory-bound, cost as much as the experts' own at r = 4).
    """

    @staticmethod
    def forward(ctx, x, x_router, weight, lora_a, lora_b, logits, runs, scaling: float, rescale: bool):  # type: ignore[override]
        gates = logits.softmax(-1).reshape(-1)
        y, b_rows, h = _pairs_forward(runs, x, lora_a, lora_b, gates, scaling)
        ctx.save_for_backward(x, x_router, weight, lora_a, b_rows, gates, h)
        ctx.runs, ctx.scaling, ctx.rescale, ctx.shared = runs, scaling, rescale, x_router is x
        ctx.top_k = logits.shape[1]
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, x_router, weight, lora_a, b_rows, gates, h = ctx.saved_tensors
        runs, s, rank = ctx.runs, ctx.scaling, lora_a.shape[1]
        dy = dy.contiguous()
        d_g, dh, w = _pairs_backward(runs, dy, b_rows, gates, h, s, ctx.rescale)
        g, d_g = gates.view(-1, ctx.top_k), d_g.view(-1, ctx.top_k)
        d_logits = (g * (d_g - (g * d_g).sum(-1, keepdim=True))).reshape(-1, 1)
        db = runs.outer(h * (w * s), dy).transpose(1, 2)
        need_dx, need_dx_router = ctx.needs_input_grad[:2]
        if ctx.shared:
            d_pairs = torch.cat([dh, d_logits], -1)
            dx = runs.expand(d_pairs, torch.cat([lora_a, weight.unsqueeze(1)], 1)) if need_dx else None
            dw = runs.outer(d_pairs, x)
            return dx, None, dw[:, rank], dw[:, :rank], db, None, None, None, None
        dx = runs.expand(dh, lora_a) if need_dx else None
        dx_router = runs.expand(d_logits, weight.unsqueeze(1)) if need_dx_router else None
        da, dw = runs.outer(dh, x), runs.outer(d_logits, x_router).squeeze(1)
        return dx, dx_router, dw, da, db, None, None, None, None


def routed_fits(x: torch.Tensor) -> bool:
    """Whether ``routed_lora_experts`` takes ``x``: on CPU with our kernels built, any dtype but fp64 (the CSR
    path's, for exact references)."""
    return x.device.type == "cpu" and x.dtype != torch.float64 and cpu_kernels.kernels("pairs") is not None


def routed_lora_experts(
    x: torch.Tensor,
    dropped: torch.Tensor,
    router_weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    top_k: int,
    scaling: float,
    rescale: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse layer's adapter, router included, where ``routed_fits``: ``(y [T, out], experts [T, k])``, y in
    x's dtype.
    The router reads ``x`` (at least fp32, as ``router.sparse_top_k_gates``), the experts ``dropped`` (cast as
    ``selected_lora_experts`` casts); all of it computed in fp32 (``RoutedLoRAExperts``)."""
    device = x.device.type
    x_router, weight = x.float().contiguous(), router_weight.float()
    if dropped is x:  # no dropout: one x for both (the fused passes need the same tensor)
        dropped = x_router
    if torch.is_autocast_enabled(device):  # as in the dense path: the experts' operands in autocast's dtype
        dtype = torch.get_autocast_dtype(device)
        dropped, lora_a, lora_b = dropped.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
    dropped, lora_a, lora_b = dropped.float().contiguous(), lora_a.float().contiguous(), lora_b.float()
    with torch.no_grad(), torch.autocast(device, enabled=False):
        logits, experts = (x_router @ weight.T).topk(top_k, dim=-1)
    tokens = x.shape[0]
    runs = expert_runs(
        torch.arange(tokens).repeat_interleave(top_k), experts.reshape(-1), tokens, lora_a.shape[0]
    )
    with torch.autocast(device, enabled=False):
        y = RoutedLoRAExperts.apply(dropped, x_router, weight, lora_a, lora_b, logits, runs, scaling, rescale)
    return y.to(x.dtype), experts


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
    indices = gates.detach().topk(top_k, dim=-1).indices.sort(dim=-1).values  # CSR: ascending columns
    selected = gates.gather(-1, indices)  # differentiable: the router's gradient flows back here
    rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(top_k)
    return selected_lora_experts(
        x, lora_a, lora_b, selected.reshape(-1), rows, indices.reshape(-1), scaling, rescale
    )


def selected_lora_experts(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    selected: torch.Tensor,
    rows: torch.Tensor,
    experts: torch.Tensor,
    scaling: float,
    rescale: bool,
) -> torch.Tensor:
    """``y_t = s * sum_p selected[p] B_e A_e x_t`` over the pairs p with ``rows[p] = t``, ``e = experts[p]``
    (sorted by row, experts ascending within a row): the pairs given explicitly."""
    device = x.device.type
    if torch.is_autocast_enabled(device):  # as in the dense path: cast before the Function
        dtype = torch.get_autocast_dtype(device)
        x, lora_a, lora_b = x.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
    if x.is_cuda and grouped_fits(x, lora_a, lora_b):
        return grouped_lora_experts(x, lora_a, lora_b, selected, rows, experts, scaling, rescale)
    out_dtype = x.dtype
    if x.dtype not in KERNEL_DTYPES:
        x, lora_a, lora_b = x.float(), lora_a.float(), lora_b.float()
    x = x.contiguous()
    pairs = plan(rows, experts, x, lora_a.shape[0], lora_a.shape[1])
    y = SparseMixtureOfLoRAExperts.apply(x, lora_a.contiguous(), lora_b, selected, pairs, scaling, rescale)
    return y.to(out_dtype)


def grouped_fits(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> bool:
    """Whether CUDA's ``grouped_mm`` takes these operands: bf16 on compute capability 8.0 or newer (what torch
    documents) and every stride a multiple of 16 bytes (r >= 8; r = 4 layers keep the CSR kernels)."""
    if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0):
        return False
    return all(n * x.element_size() % 16 == 0 for n in (lora_a.shape[1], lora_a.shape[2], lora_b.shape[1]))


def grouped_lora_experts(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    selected: torch.Tensor,
    rows: torch.Tensor,
    experts: torch.Tensor,
    scaling: float,
    rescale: bool,
) -> torch.Tensor:
    """``selected_lora_experts``' result with ``torch.nn.functional.grouped_mm`` over the pairs sorted by
    expert (torchtitan's MoE layout): the path on CUDA where ``grouped_fits``. Each pair's row of x and
    its ``[out]`` result are materialised (``T*k*(in+out)`` elements), which a GPU's bandwidth affords and a
    CPU's does not (bench/README.md). Gate rescale as the dense path's contract (DESIGN.md section 1):
    autograd of ``c o + (g - c) o.detach()``, ``c = sqrt(g).detach()``, per pair output ``o = B_e A_e x``."""
    from torch.nn.functional import grouped_mm

    order = torch.argsort(experts, stable=True)
    offsets = torch.bincount(experts, minlength=lora_a.shape[0]).cumsum(0).to(torch.int32)
    token = rows.index_select(0, order)
    h = grouped_mm(x.index_select(0, token), lora_a.transpose(1, 2), offs=offsets)  # [pairs, r]
    o = grouped_mm(h, lora_b.transpose(1, 2).contiguous(), offs=offsets)  # [pairs, out]
    g = selected.index_select(0, order).to(o.dtype).unsqueeze(-1)
    if rescale:
        c = g.detach().sqrt()
        o = c * o + (g - c) * o.detach()
    else:
        o = g * o
    return o.new_zeros(x.shape[0], o.shape[-1]).index_add_(0, token, o).mul_(scaling)


# Sparse wins when E > SPARSE_FACTOR * k: the dense path does E*r multiply-adds per token and
# (in + out) element at full GEMM speed, the sparse one k*r at the memory-bound speed of the pair
# kernels (slower per multiply-add). CPU, our kernels with the fused router (bench/README.md, one thread):
# sparse 1.4-1.6x ahead at E/k = 3 and 4, level within the noise (0.8-1.5x) at E/k = 1.6-2.5, so the factor
# is 2.5 (at 4, auto kept dense at E=32, top-8 for layers 1.07-1.09x slower). CUDA: not measured (no GPU so
# far); the CSR kernels' factor (4) until it is.
SPARSE_FACTOR = {"cpu": 2.5, "cuda": 4.0}


def use_sparse(num_experts: int, top_k: int, device: torch.device) -> bool:
    """The ``expert_compute="auto"`` rule: sparse iff ``num_experts > SPARSE_FACTOR[device] * top_k``."""
    return num_experts > SPARSE_FACTOR.get(device.type, SPARSE_FACTOR["cuda"]) * top_k
