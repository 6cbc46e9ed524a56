"""Expert parallelism on DeepSpeed's expert-parallel groups: the one place that knows DeepSpeed's MoE conventions.

With ``expert_parallel_size = ep``, each layer's E experts are split into ep shards of E/ep along the
expert dimension; rank ``i`` of an expert-parallel (EP) group stores shard ``i`` and keeps its optimizer
state. Each layer computes with them one of two ways (``MoLoRAConfig.expert_parallel_mode``):
- weight gather (``ExpertGroup.gather``): the forward all-gathers the layer's shards inside the EP group,
  the backward all-gathers them again (``MoLoRALinear`` recomputes the adapter there, so no layer holds the
  whole experts between its forward and its backward) and reduce-scatters their gradients, summed;
- token dispatch (``ExpertGroup.dispatch``, ``token_dispatch.py``): each selected (token, expert) pair
  travels to the expert's rank and its result back (all-to-all), and the local experts' gradients are the
  sum over every rank's pairs.
``auto`` picks per layer by the cost model of ``dispatch_wins``. Either way DeepSpeed then reduces each
shard's gradient over its expert-data-parallel (EDP) group and divides by the whole data-parallel size
(as for its own experts), which gives the gradient of the global mean loss. The router stays replicated
and is reduced over all ranks as before.

DeepSpeed's conventions, all kept here:
- groups: ``deepspeed.utils.groups._create_expert_and_data_parallel(ep)``, named ``ep_size_<ep>``
  (EP groups of consecutive ranks, EDP groups strided);
- parameter tags: ``param.allreduce = False`` and ``param.group_name = <group name>``;
- the optimizer's expert param group is named after the group and marked ``"moe": True``;
- the engine turns its MoE handling on only when the model holds a ``deepspeed.moe.layer.MoE``:
  ``shard_experts`` adds an empty one (``_engine_moe_flag``) that holds no parameter and no expert;
- checkpoints: ZeRO-1/2 saves each rank's partition of its groups, the expert group partitioned over
  the EDP group (``shard_ranks``); in a universal checkpoint a tensor tagged ``universal_expert_tags``
  holds all E experts and loads as the loading rank's E/ep (``checkpoint.merge_expert_parallel``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

# deepspeed is imported inside the functions that need it: the optimizer imports this module for the
# parameter tags alone, and importing deepspeed costs seconds.

STAGES = (0, 1, 2)  # ZeRO stages with expert parallelism (DeepSpeed refuses its MoE under ZeRO-3)
MODES = ("auto", "gather", "dispatch")


def dispatch_wins(
    num_experts: int, rank: int, top_k: int, tokens: int, ep: int, reduce_scatter: bool = True
) -> bool:
    """The ``expert_parallel_mode="auto"`` rule: token dispatch iff it moves fewer elements than weight gather.

    Per layer and rank, forward + backward, each volume times ``(ep-1)/ep`` (the share bound for other
    ranks): weight gather all-gathers ``E*r*(in+out)`` weights twice (forward, and the backward's
    recomputation) and reduce-scatters as many gradients, ``3*E*r*(in+out)`` (``4*...`` where the reduction
    is an all-reduce, as on gloo); token dispatch sends a token's x row once to each of the at most
    ``min(k, ep)`` ranks that hold its experts and a summed y row back, and dy, dx the same way,
    ``2*T*min(k, ep)*(in+out)``. So dispatch wins below ``T* = 1.5*E*r/min(k, ep)`` tokens per rank
    (``2*...`` on gloo): bench/bench_ep_comm.py measures both ways beside this prediction.
    """
    return 2 * tokens * min(top_k, ep) < (3 if reduce_scatter else 4) * num_experts * rank


def group_name(size: int) -> str:
    return f"ep_size_{size}"


def check_setup(size: int, world: int, stage: int) -> None:
    """One line per misuse, before the model loads (the expert count is checked by ``MoLoRAConfig``)."""
    if size == 1:
        return
    if world == 1:
        raise ValueError(
            f"molora.expert_parallel_size={size} needs {size} or more processes, this launch has 1: "
            "launch more processes or set molora.expert_parallel_size=1"
        )
    if world % size:
        raise ValueError(
            f"molora.expert_parallel_size={size} does not divide the {world} processes: choose a divisor of {world}"
        )
    if stage not in STAGES:
        raise ValueError(
            f"molora.expert_parallel_size={size} works under ZeRO stages {STAGES}, not {stage} (DeepSpeed "
            "partitions no MoE parameters under ZeRO-3): use ds_configs/zero2.json or set expert_parallel_size=1"
        )


class ExpertGroup:
    """This rank's place in the EP group of ``size`` ranks (created on first use, as DeepSpeed's MoE does)."""

    def __init__(self, size: int) -> None:
        from deepspeed.utils import groups

        self.size, self.name = size, group_name(size)
        if self.name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(size)
        self.group = groups._get_expert_parallel_group(self.name)
        self.rank = groups._get_expert_parallel_rank(self.name)
        # one rank per shard writes it to checkpoints: the first of its expert-data-parallel group
        self.writes_shard = groups._get_expert_data_parallel_rank(self.name) == 0
        # gloo has no reduce-scatter: all-reduce and keep this rank's slice (CPU runs, small adapters)
        self.reduce_scatter = dist.get_backend(self.group) == "nccl"

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of ``full`` along dim 0 (the experts)."""
        return full.chunk(self.size)[self.rank]

    def gather(self, shard: torch.Tensor) -> torch.Tensor:
        """The layer's experts from every rank's shard, differentiable (the backward reduce-scatters)."""
        return _GatherExperts.apply(shard, self)

    def dispatch(self, x, lora_a, lora_b, gates, top_k: int, scaling: float, rescale: bool) -> torch.Tensor:
        """The mixture's delta for this rank's tokens, computed by token dispatch with the shards ``lora_a``,
        ``lora_b`` (``token_dispatch.dispatch_mixture``)."""
        from molora_ds.distributed.token_dispatch import dispatch_mixture

        return dispatch_mixture(x, lora_a, lora_b, gates, top_k, scaling, rescale, self.group)


class _GatherExperts(torch.autograd.Function):
    """Forward: the EP group's shards concatenated along dim 0. Backward: each rank's shard of the summed gradient."""

    @staticmethod
    def forward(ctx, shard: torch.Tensor, ep: ExpertGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.ep = ep
        return gather_full(shard, ep)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        ep = ctx.ep
        grad = grad.contiguous()
        if ep.reduce_scatter:
            out = grad.new_empty(grad.shape[0] // ep.size, *grad.shape[1:])
            dist.reduce_scatter_tensor(out, grad, group=ep.group)
            return out, None
        dist.all_reduce(grad, group=ep.group)
        return ep.shard(grad).clone(), None


def _engine_moe_flag(ep: ExpertGroup) -> nn.Module:
    """Not a layer: a ``deepspeed.moe.layer.MoE`` with no experts, whose presence makes the engine hand
    ZeRO the expert groups, reduce tagged parameters over their EDP group, and save per-rank optimizer
    state. Its ``__init__`` skips ``MoE.__init__``, which would build experts."""
    from deepspeed.moe.layer import MoE

    class EngineMoEFlag(MoE):
        def __init__(self) -> None:
            nn.Module.__init__(self)
            self.expert_group_name, self.ep_size = ep.name, ep.size
            self.num_experts = self.num_local_experts = (
                0  # DeepSpeed's own expert files: none to save or load
            )

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # the groups exist already (ExpertGroup)

        def forward(self, *args, **kwargs):
            raise RuntimeError("a marker for DeepSpeed's engine, not a layer")

    return EngineMoEFlag()


def shard_experts(
    model: nn.Module, layers: dict[str, nn.Module], size: int, mode: str = "auto", tokens: int = 0
) -> ExpertGroup:
    """Keep only this rank's experts in every MoLoRA layer (in place), tag them for DeepSpeed, and flag the model.

    ``mode``: ``gather`` | ``dispatch`` | ``auto`` (per layer, ``dispatch_wins`` for ``tokens``, the most
    tokens a rank's micro-batch holds: the same on every rank, as the choice must be). Call after
    ``apply_molora`` on the same seed on every rank (so the shards are slices of one adapter) and before
    ``deepspeed.initialize``.
    """
    if mode not in MODES:
        raise ValueError(f"expert_parallel_mode={mode!r}; choose one of {MODES}")
    ep = ExpertGroup(size)
    for layer in layers.values():
        dispatch = mode == "dispatch" or (
            mode == "auto"
            and dispatch_wins(layer.num_experts, layer.rank, layer.top_k, tokens, ep.size, ep.reduce_scatter)
        )
        layer.shard_experts(ep, dispatch)
        for p in (layer.lora_A, layer.lora_B):
            p.allreduce = False
            p.group_name = ep.name
    model.add_module("expert_parallel_flag", _engine_moe_flag(ep))
    return ep


def shard_ranks(ep_rank: int, size: int, world: int) -> list[int]:
    """The global ranks that hold expert shard ``ep_rank``, in their EDP group's order (EP groups of
    consecutive ranks, EDP groups strided: ``_create_expert_and_data_parallel``'s layout)."""
    return list(range(ep_rank, world, size))


def universal_expert_tags(num_experts: int) -> dict:
    """The keys that mark a universal checkpoint's tensor as all ``num_experts`` experts stacked on dim 0:
    DeepSpeed's universal load then gives each rank its EP rank's slice (``ExpertGroup.shard``'s)."""
    from deepspeed.checkpoint.constants import EP_IS_EXPERT_PARAM, EP_NUM_EXPERTS

    return {EP_IS_EXPERT_PARAM: True, EP_NUM_EXPERTS: num_experts}


def is_expert_shard(p: torch.Tensor) -> bool:
    return getattr(p, "allreduce", True) is False


def mark_param_groups(param_groups: list[dict]) -> list[dict]:
    """Rename a group of expert shards after its EP group and mark it ``moe``, as ZeRO 1/2 require of a client optimizer."""
    for g in param_groups:
        tagged = [is_expert_shard(p) for p in g["params"]]
        if any(tagged):
            if not all(tagged):
                raise ValueError(f"param group {g['name']!r} mixes expert shards and replicated parameters")
            g.update(name=g["params"][0].group_name, moe=True)
    return param_groups


def group_label(group: dict) -> str:
    """A param group's name for logs and metrics: ``experts`` whether or not DeepSpeed renamed it."""
    return "experts" if group.get("moe") else group["name"]


def gather_full(shard: torch.Tensor, ep: ExpertGroup) -> torch.Tensor:
    """All ranks' shards of an expert tensor, concatenated (collective over the EP group; no autograd)."""
    parts = [torch.empty_like(shard) for _ in range(ep.size)]
    dist.all_gather(parts, shard.contiguous(), group=ep.group)
    return torch.cat(parts)
