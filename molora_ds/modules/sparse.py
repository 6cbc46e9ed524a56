"""Only the selected experts: the T*k (token, expert) pairs of a top-k router as one sparse matrix.

The dense path (``experts.py``) multiplies every token by all E experts and lets zero gates drop
the unselected ones: ``T * E * r * (in + out)`` multiply-adds. Here the pairs form a CSR matrix
``P [T, E*r]`` with ``k*r`` stored entries per row (token t's columns ``e*r .. e*r+r-1`` for each
selected expert e), and every product is a sparse kernel over it:

    h  = (x @ A_cat^T) sampled at P         (SDDMM)   y  = s * P(h*g) @ B_cat        (SpMM)
    u  = s * (dy @ B_cat) sampled at P      (SDDMM)   dx = P(u*w) @ A_cat            (SpMM)
    dA_cat = P(u*w)^T @ x,  dB_cat = s * P(h*w)^T @ dy  (SpMM with the transpose of P)

with ``A_cat [E*r, in]`` and ``B_cat [E*r, out]`` the experts' rows stacked. These read each token's
row of x, dy once and write y, dx once; the first version (tokens grouped by expert into padded bmm
blocks) copied every pair's ``in + out`` elements, k copies of x and of y, and ran slower than dense
at E=256, top-8 on CPU (bench/README.md). ``P``'s transpose is the pairs sorted by expert: a stable
argsort, so each of its rows lists its tokens in order.

Same contract as the dense path (DESIGN.md section 1), gate rescale included: the backward weights
expert i's gradients to x, A and B by ``w = sqrt(g_i)`` with ``rescale`` (else ``g_i``), and the
gate gradient is ``s * <dy, B_i A_i x>`` in both modes. No atomics: each output row of a CSR SpMM
is one sequential sum (run-to-run identical on CPU, tests/unit/test_sparse.py), so resume stays
bit-exact. MKL's CPU kernels take fp32 and fp64 only: half-precision inputs are computed in fp32 and
the results cast back (one rounding fewer than a bf16 kernel). On CUDA, where ``grouped_fits``, the pairs
go through ``torch.nn.functional.grouped_mm`` instead (``grouped_lora_experts``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KERNEL_DTYPES = (torch.float32, torch.float64)  # what torch's CPU CSR kernels (MKL) implement


@dataclass(frozen=True)
class PairPlan:
    """The pattern of ``P [T, E*r]`` and of its transpose.

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


def _sampled(plan: PairPlan, left: torch.Tensor, right_rows: torch.Tensor) -> torch.Tensor:
    """``(left @ right_rows^T)`` at P's entries, in P's row order."""
    zeros = plan.matrix(left.new_zeros(plan.col.numel()))
    return torch.sparse.sampled_addmm(zeros, left, right_rows.T, beta=0.0).values()


class SparseMixtureOfLoRAExperts(torch.autograd.Function):
    """``y_t = s * sum_p g_p B_e(p) A_e(p) x_t`` over the pairs p of row t (``plan``; ``gates`` one per pair).

    Autocast is off inside: the caller casts the inputs (``selected_lora_experts``), and an active autocast
    would recast the products to bf16, which the CPU CSR kernels do not implement.
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, gates, plan: PairPlan, scaling: float, rescale: bool):  # type: ignore[override]
        with torch.autocast(x.device.type, enabled=False):
            num_experts, rank, in_features = lora_a.shape
            a_cat = lora_a.reshape(num_experts * rank, in_features)
            b_cat = lora_b.transpose(1, 2).reshape(num_experts * rank, -1)
            h = _sampled(plan, x, a_cat)
            g = gates.to(x.dtype).repeat_interleave(rank)
            y = (plan.matrix(h * g) @ b_cat).mul_(scaling)
            ctx.save_for_backward(x, lora_a, b_cat, gates, h)
            ctx.plan, ctx.scaling, ctx.rescale = plan, scaling, rescale
            return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        with torch.autocast(dy.device.type, enabled=False):
            x, lora_a, b_cat, gates, h = ctx.saved_tensors
            plan, s = ctx.plan, ctx.scaling
            num_experts, rank, in_features = lora_a.shape
            u = _sampled(plan, dy, b_cat).mul_(s)  # d loss / d (h * g)
            d_gates = None
            if ctx.needs_input_grad[3]:
                d_gates = (u * h).view(-1, rank).sum(-1).to(gates.dtype)
            g = gates.repeat_interleave(rank)
            w = (g.sqrt() if ctx.rescale else g).to(x.dtype)
            dh = u.mul_(w)
            dx = da = db = None
            if ctx.needs_input_grad[0]:
                dx = plan.matrix(dh) @ lora_a.reshape(num_experts * rank, in_features)
            if ctx.needs_input_grad[1]:
                da = (plan.transposed(dh) @ x).view_as(lora_a)
            if ctx.needs_input_grad[2]:
                db = (plan.transposed(h * w) @ dy).mul_(s).view(num_experts, rank, -1).transpose(1, 2)
            return dx, da, db, d_gates, None, None, None


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
    plan = plan_pairs(rows, experts, x.shape[0], lora_a.shape[0], lora_a.shape[1])
    y = SparseMixtureOfLoRAExperts.apply(x, lora_a, lora_b, selected, plan, scaling, rescale)
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
# (in + out) element at full GEMM speed, the sparse one k*r at the memory-bound speed of the CSR
# kernels (several times slower per multiply-add). CPU: bench/bench_experts.py on this machine
# (bench/README.md) has sparse ahead at E/k = 8 and 10 and behind at E/k = 2.5, so the factor sits
# between 2.5 and 8. CUDA: not measured (no GPU so far); the same rule until it is.
SPARSE_FACTOR = {"cpu": 4.0, "cuda": 4.0}


def use_sparse(num_experts: int, top_k: int, device: torch.device) -> bool:
    """The ``expert_compute="auto"`` rule: sparse iff ``num_experts > SPARSE_FACTOR[device] * top_k``."""
    return num_experts > SPARSE_FACTOR.get(device.type, SPARSE_FACTOR["cuda"]) * top_k
