"""Token dispatch: each selected (token, expert) pair is computed on the rank that stores the expert.

The other way of expert parallelism (``expert_parallel.ExpertGroup.gather`` moves the weights). Per layer,
on every rank of the EP group, with this rank's tokens and the replicated router's gates:

1. the ``T*k`` pairs are grouped by the rank that owns their expert (expert ``e`` lives on rank
   ``e // (E/ep)``, as ``ExpertGroup.shard`` slices); the per-rank counts are exchanged (a rank may send
   or receive none: every rank still takes part in every collective, so nothing waits forever);
2. a token's row of x goes once to each rank that holds any of its experts (at most ``min(k, ep)`` rows
   per token, not ``k``), with each pair's gate, expert and row index (all-to-all);
3. there each row is computed with its pairs' local experts only (``sparse.selected_lora_experts``, the
   same kernels as one process's sparse path), and the ``[rows, out]`` results come back the same way;
4. each token sums its returned rows.

Steps 2 and 3 are differentiable: ``_AllToAll``'s backward is the reverse all-to-all, so dy's rows
travel to the experts' ranks and dx's and the gates' gradients back, and the local A and B receive the
gradient of every rank's pairs routed to them (the sum the weight gather's reduce-scatter forms). Gate
rescale acts inside the pair computation, as on one process. Under autocast the rows travel in the
autocast dtype, x's and the results' alike (half the bytes): each rank's partial sum is rounded before a
token's are added, where one process rounds the sum once, a difference within that dtype's precision.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from molora_ds.modules.sparse import selected_lora_experts


def _all_to_all(rows: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    out = rows.new_empty(sum(recv), *rows.shape[1:])
    dist.all_to_all_single(out, rows.contiguous(), recv, send, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """``send[i]`` rows to group rank i, ``recv[i]`` rows from it; the backward sends the gradients back."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:  # type: ignore[override]
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _all_to_all(rows, send, recv, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _all_to_all(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def dispatch_mixture(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    gates: torch.Tensor,
    top_k: int,
    scaling: float,
    rescale: bool,
    group,
) -> torch.Tensor:
    """``mixture_of_lora_experts``' result for this rank's tokens ``x [T, in]`` and ``gates [T, E]``, with
    ``lora_a [E/ep, r, in]``, ``lora_b [E/ep, out, r]`` this rank's experts (collective over ``group``)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):  # send the rows in the dtype they are computed in
        x = x.to(torch.get_autocast_dtype(device))
    tokens, local, size = x.shape[0], lora_a.shape[0], dist.get_world_size(group)
    indices = gates.detach().topk(top_k, dim=-1).indices.sort(dim=-1).values  # a row's experts ascending
    selected = gates.gather(-1, indices).reshape(-1)  # differentiable: the router's gradient comes back here
    expert = indices.reshape(-1)  # pair t*k + j: token t's j-th expert
    owner = expert.div(local, rounding_mode="floor")
    token = torch.arange(tokens, device=x.device).repeat_interleave(top_k)
    # One row of x per (rank, token) that has pairs there, in (rank, token) order; each pair names its row.
    keys, row = torch.unique(owner * tokens + token, return_inverse=True)
    row_token = keys % tokens
    counts = torch.stack([torch.bincount(keys.div(tokens, rounding_mode="floor"), minlength=size),
                          torch.bincount(owner, minlength=size)], dim=1)  # fmt: skip
    recv_counts = torch.empty_like(counts)  # [rank, (rows, pairs)]
    dist.all_to_all_single(recv_counts, counts, group=group)
    (send_rows, send_pairs), (recv_rows, recv_pairs) = counts.T.tolist(), recv_counts.T.tolist()
    rows = _AllToAll.apply(x.index_select(0, row_token), send_rows, recv_rows, group)
    order = torch.argsort(owner, stable=True)
    gate = _AllToAll.apply(selected[order].unsqueeze(-1), send_pairs, recv_pairs, group)
    first_row = counts[:, 0].cumsum(0) - counts[:, 0]  # where each rank's rows start, here and there
    pair = torch.stack([expert % local, row - first_row[owner]], dim=1)[order]
    pair = _all_to_all(pair, send_pairs, recv_pairs, group)  # (local expert, row within its sender's rows)
    recv_first = recv_counts[:, 0].cumsum(0) - recv_counts[:, 0]
    pair_row = pair[:, 1] + recv_first.repeat_interleave(recv_counts[:, 1])
    # Pairs arrive by sender, each sender's by token, then expert: sorted by row, as the plan needs.
    y = selected_lora_experts(rows, lora_a, lora_b, gate.reshape(-1), pair_row, pair[:, 0], scaling, rescale)
    y = _AllToAll.apply(y, recv_rows, send_rows, group)  # each row: the sum of its pairs here
    return y.new_zeros(tokens, y.shape[-1]).index_add_(0, row_token, y)
