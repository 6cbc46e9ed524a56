"""One MoLoRA layer with its experts sharded over 2 gloo processes, for tests/distributed/test_expert_parallel.py.

    torchrun --nproc_per_node 2 tests/distributed/ep_layer_worker.py OUT.pt

The router is set so that no token selects experts 2 and 3, which rank 1 owns: that rank computes
nothing for its own experts (under token dispatch it receives no pair), yet takes part in every
collective. Rank 0 writes, for weight gather with the dense and the sparse path and for token dispatch (also
an fp32 layer under bf16 autocast), the output and the gradients of x, the router and the full A and B (its shard's
and rank 1's, gathered), and the same from an unsharded copy of the layer computed on rank 0 alone (float64; for
the fp32 sparse way, the fused path, fp32), and how many elements autograd saved in the forward.
"""

from __future__ import annotations

import copy
import sys

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from molora_ds import MoLoRALinear
from molora_ds.distributed.expert_parallel import ExpertGroup, gather_full

IN, OUT, EXPERTS, RANK, TOP_K, TOKENS = 16, 12, 4, 2, 2, 24
WAYS = (  # name, expert_compute, token dispatch, the layer's dtype, under bf16 autocast
    ("dense", "dense", False, torch.float64, False),
    ("sparse", "sparse", False, torch.float64, False),
    ("sparse_fp32", "sparse", False, torch.float32, False),  # the fused router-and-experts path
    ("dispatch", "sparse", True, torch.float64, False),
    ("dispatch_bf16", "sparse", True, torch.float32, True),
)


def run(
    layer: MoLoRALinear, x: torch.Tensor, dy: torch.Tensor, ep: ExpertGroup | None, bf16: bool = False
) -> list[torch.Tensor]:
    x = x.to(layer.lora_A.dtype).clone().requires_grad_(True)
    saved = []  # what autograd keeps from the forward for the backward (outside a recomputed region)
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), hooks:
        y = layer(x)
    y.backward(dy.to(y.dtype))
    grads = [layer.lora_A.grad, layer.lora_B.grad]
    if ep is not None:
        grads = [gather_full(g, ep) for g in grads]
    return [y.detach(), x.grad, *grads, layer.router.weight.grad, torch.tensor(sum(saved))]


def main(out: str) -> int:
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.manual_seed(0)
    x, dy = torch.randn(TOKENS, IN, dtype=torch.float64).abs(), torch.randn(TOKENS, OUT, dtype=torch.float64)
    results = {}
    for name, compute, dispatch, dtype, bf16 in WAYS:
        torch.manual_seed(1)
        layer = MoLoRALinear(
            nn.Linear(IN, OUT, dtype=dtype), EXPERTS, RANK, TOP_K, alpha=4.0, expert_compute=compute
        )
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.5)
            layer.router.weight.normal_(0, 1.0)
            layer.router.weight[2:] = -100 * layer.router.weight[:2].abs().sum(0)  # x >= 0: experts 2, 3 lose
        full = copy.deepcopy(layer) if name == "sparse_fp32" else copy.deepcopy(layer).double()
        ep = ExpertGroup(2)
        layer.shard_experts(ep, dispatch)
        results[name] = run(layer, x, dy, ep, bf16)
        results[name + "_reference"] = run(full, x, dy, None)
        results[name + "_load"] = layer.expert_load
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
