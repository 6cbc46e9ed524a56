"""Token dispatch: each selected (token, expert) pair is computed on the rank that stores the expert.

The other way of expert parallelism (``expert_parallel.ExpertGroup.gather`` moves the weights). Per layer,
on every rank of the EP group, with this rank's tokens and the replicated router's gates:

1. the ``T*k`` pairs are sorted by the rank that owns their expert (expert ``e`` lives on rank
   ``e // (E/ep)``, as ``ExpertGroup.shard`` slices); the per-rank counts are exchanged (a rank may send
   or receive none: every rank still takes part in every collective, so nothing waits forever);
2. each pair's row of x, its gate and its expert's local index go to that rank (all-to-all);
3. there the pairs are computed with the local experts only (``sparse.selected_lora_experts``, one pair
   per row), and the ``[pairs, out]`` results come back the same way (all-to-all);
4. each token sums its k returned rows.

Steps 2 and 3 are differentiable: ``_AllToAll``'s backward is the reverse all-to-all, so dy's rows
travel to the experts' ranks and dx's and the gates' gradients back, and the local A and B receive the
gradient of every rank's pairs routed to them (the sum the weight gather's reduce-scatter forms). Gate
rescale acts inside the pair computation, as on one process. Under autocast the rows travel in the
autocast dtype, x's and the results' alike (half the bytes): each pair's result is rounded before a
token's k are summed, where one process rounds the sum once, a difference within that dtype's precision.
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
    local, size = lora_a.shape[0], dist.get_world_size(group)
    indices = gates.detach().topk(top_k, dim=-1).indices
    selected = gates.gather(-1, indices).reshape(-1)  # differentiable: the router's gradient comes back here
    expert = indices.reshape(-1)  # pair t*k + j: token t's j-th expert
    owner = expert.div(local, rounding_mode="floor")
    order = torch.argsort(owner, stable=True)
    token = order.div(top_k, rounding_mode="floor")
    send_counts = torch.bincount(owner, minlength=size)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    rows = _AllToAll.apply(x.index_select(0, token), send, recv, group)
    gate = _AllToAll.apply(selected[order].unsqueeze(-1), send, recv, group)
    local_expert = _all_to_all((expert[order] % local).unsqueeze(-1), send, recv, group)
    y = selected_lora_experts(rows, lora_a, lora_b, gate, local_expert, scaling, rescale)
    y = _AllToAll.apply(y, recv, send, group)
    return y.new_zeros(x.shape[0], y.shape[-1]).index_add_(0, token, y)
