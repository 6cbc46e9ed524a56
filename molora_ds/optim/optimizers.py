"""SGD or AdamW, with two switches: Riemannian preconditioning and gate rescale (DESIGN.md section 2).

Experts and routers are separate param groups. The expert group may be Riemannian-
preconditioned inside ``step`` (plain PyTorch, DDP) or by gradient hooks before ZeRO's
reduction (``molora_ds.optim.zero``). The router group has its own lr and its own grad-norm
clip, computed over all routers together; the experts are never clipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from molora_ds.distributed.expert_parallel import group_label, mark_param_groups
from molora_ds.inject import molora_layers
from molora_ds.optim.riemannian import precondition_

BASE_METHODS = ("sgd", "adamw")
# The paper's names: r = preconditioned, g = preconditioned and gate-rescaled.
# shorthand -> (base method, precondition, gate_rescale)
SHORTHANDS = {
    "rsgd": ("sgd", True, False),
    "radamw": ("adamw", True, False),
    "grsgd": ("sgd", True, True),
    "gradamw": ("adamw", True, True),
}
METHODS = (*BASE_METHODS, *SHORTHANDS)


@dataclass
class OptimConfig:
    """Paper defaults (DESIGN.md section 5); ``lr=None`` takes 3e-5 for the SGD family, 1e-5 for AdamW.

    ``method`` is the base update (``sgd`` | ``adamw``) or a shorthand that also sets both switches.
    ``precondition``: Riemannian preconditioning of the expert gradients. ``gate_rescale``: the layers'
    sqrt(g) backward (DESIGN.md section 1), which ``build_optimizer`` checks the layers agree with.
    ``None`` takes the method's value (off for ``sgd`` / ``adamw``); after construction both are bools,
    so ``dataclasses.asdict`` of a config rebuilds the same config.
    """

    method: str = "gradamw"
    precondition: bool | None = None
    gate_rescale: bool | None = None
    lr: float | None = None
    gate_lr: float = 3e-8
    reg: float = 1e-6
    gate_max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    momentum: float = 0.0
    correct_bias: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown optimizer method {self.method!r}; choose one of {METHODS}")
        # a base method implies nothing (None): its switches default to off
        base, precondition, gate_rescale = SHORTHANDS.get(self.method, (self.method, None, None))
        for switch, implied in (("precondition", precondition), ("gate_rescale", gate_rescale)):
            value = getattr(self, switch)
            if None not in (value, implied) and value != implied:
                raise ValueError(
                    f"{switch}={value} contradicts method={self.method!r}, which sets {switch}={implied}; "
                    f"use method={base!r} with explicit precondition and gate_rescale"
                )
            setattr(self, switch, bool(implied) if value is None else value)
        if self.lr is None:
            self.lr = 1e-5 if self.is_adam else 3e-5
        if self.reg <= 0:
            raise ValueError(f"reg must be > 0 (it keeps the r x r systems invertible), got {self.reg}")
        # `not x >= 0` is also true for NaN, which would otherwise train to NaN losses after the model loads.
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        for name in ("gate_lr", "weight_decay", "eps", "momentum", "gate_max_grad_norm"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        self.betas = tuple(self.betas)

    @property
    def base(self) -> str:
        return SHORTHANDS[self.method][0] if self.method in SHORTHANDS else self.method

    @property
    def is_adam(self) -> bool:
        return self.base == "adamw"

    @property
    def riemannian(self) -> bool:
        return self.precondition

    @property
    def name(self) -> str:
        """The paper's name (``gradamw``, ``rsgd``, ``adamw``); the ablation without preconditioning is ``adamw+sqrt``."""
        if self.gate_rescale and not self.precondition:
            return f"{self.base}+sqrt"
        return ("gr" if self.gate_rescale else "r" if self.precondition else "") + self.base


class _MoLoRAGroups:
    """Mixin run before the base update: precondition expert pairs, clip the router group.

    ``pairs``: each layer's ``(lora_A, lora_B)``, preconditioned in ``step`` with ``reg``; empty when
    nothing is (plain methods, or gradient hooks do it). Paired by layer, not by position in the
    param group: a parameter without a gradient must not shift the pairs after it.

    ``partitioned``: ZeRO (stage >= 1, or its bf16 optimizer) hands this optimizer each rank's
    partition of flat gradients: norms are then summed over all ranks.

    ``skip_step``: set by the trainer when a loss was non-finite (DeepSpeed's engine, not the
    trainer, calls ``step``); the update is then skipped whole (state untouched), and the
    accumulated gradients are dropped by the caller.
    """

    skip_step: bool = False

    def __init__(
        self,
        params,
        *,
        pairs: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
        reg: float = 1e-6,
        partitioned: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(params, **kwargs)
        self.pairs, self.reg, self.partitioned = list(pairs), reg, partitioned

    def _prepare_grads(self) -> None:
        self.grad_norms = getattr(self, "grad_norms", {})
        for a, b in self.pairs:
            if a.grad is not None or b.grad is not None:
                precondition_(a, b, self.reg)
        for group in self.param_groups:
            if not group["params"]:
                # ZeRO-3 calls step once per sub-group, with every other group's list emptied: that
                # group's norm is taken (and all-reduced, on all ranks alike) in its own call.
                continue
            params = [p for p in group["params"] if p.grad is not None]
            norm = self._global_norm([p.grad for p in params])
            self.grad_norms[group_label(group)] = norm.item()
            if group.get("max_grad_norm"):
                torch.nn.utils.clip_grads_with_norm_(params, group["max_grad_norm"], norm)

    def _global_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        if self.partitioned:
            # NCCL reduces only CUDA tensors, and under optimizer offload the gradients (and so this
            # norm, and the empty group's zero) live on the CPU: reduce on the backend's device.
            nccl = dist.get_backend() == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
            squared = norm.to(device, torch.float64).square().reshape(1)
            dist.all_reduce(squared)
            norm = squared.sqrt().reshape(()).to(norm.device, norm.dtype)
        return norm


class MoLoRASGD(_MoLoRAGroups, torch.optim.SGD):
    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("closures are not supported: the gradients are prepared before the update")
        if not self.skip_step:
            self._prepare_grads()
            super().step()


class MoLoRAAdamW(_MoLoRAGroups, torch.optim.AdamW):
    """torch's AdamW; ``correct_bias=False`` gives the reference code's AdamW (no bias correction,
    eps added to sqrt(v)), for faithful reproductions. State keys are torch's either way."""

    def __init__(self, params, correct_bias: bool = True, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.correct_bias = correct_bias

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("closures are not supported: the gradients are prepared before the update")
        if self.skip_step:
            return None
        self._prepare_grads()
        if self.correct_bias:
            return super().step()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                p.addcdiv_(
                    state["exp_avg"], state["exp_avg_sq"].sqrt().add_(group["eps"]), value=-group["lr"]
                )
                p.mul_(1 - group["lr"] * group["weight_decay"])  # after the update, as HF's AdamW does
        return None


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Experts as A0, B0, A1, B1, ... in layer order, then all routers. Under expert parallelism the
    experts' group carries DeepSpeed's name for it (``expert_parallel.mark_param_groups``)."""
    layers = list(molora_layers(model).values())
    if not layers:
        raise ValueError("the model has no MoLoRALinear layers: call apply_molora(model, cfg) first")
    wrong = [n for n, m in molora_layers(model).items() if m.gate_rescale != cfg.gate_rescale]
    if wrong:
        raise ValueError(
            f"optimizer {cfg.name!r} needs gate_rescale={cfg.gate_rescale} in MoLoRAConfig, but {wrong[0]} and "
            f"{len(wrong) - 1} more layers have gate_rescale={not cfg.gate_rescale}: set the same gate_rescale "
            "in both (the g-methods grsgd, gradamw set it to True, the others to False unless given)"
        )
    return mark_param_groups(
        [
            {
                "name": "experts",
                "params": [p for m in layers for p in (m.lora_A, m.lora_B)],
                "lr": cfg.lr,
                "weight_decay": cfg.weight_decay,
            },
            {
                "name": "router",
                "params": [m.router.weight for m in layers],
                "lr": cfg.gate_lr,
                "weight_decay": 0.0,
                "max_grad_norm": cfg.gate_max_grad_norm,
            },
        ]
    )


def build_optimizer(
    model: nn.Module,
    method: str = "gradamw",
    *,
    precondition_in_step: bool = True,
    partitioned: bool = False,
    **kwargs,
) -> torch.optim.Optimizer:
    """An optimizer over the model's MoLoRA parameters; keyword arguments are ``OptimConfig`` fields.

    ``precondition_in_step=False`` leaves the Riemannian preconditioning to gradient hooks
    (``molora_ds.optim.zero.GradientPreconditioner``), as DeepSpeed ZeRO needs; ``partitioned``:
    DeepSpeed will hand it partitioned gradients (see ``_MoLoRAGroups``).
    """
    cfg = OptimConfig(method=method, **kwargs)
    groups = param_groups(model, cfg)
    in_step = cfg.precondition and precondition_in_step
    pairs = [(m.lora_A, m.lora_B) for m in molora_layers(model).values()] if in_step else []
    if cfg.is_adam:
        # torch's fused AdamW (one pass over memory per tensor, not ~8): same math, to float rounding.
        fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
        return MoLoRAAdamW(
            groups,
            pairs=pairs,
            reg=cfg.reg,
            partitioned=partitioned,
            lr=cfg.lr,
            betas=cfg.betas,
            eps=cfg.eps,
            correct_bias=cfg.correct_bias,
            fused=fused,
        )
    return MoLoRASGD(
        groups, pairs=pairs, reg=cfg.reg, partitioned=partitioned, lr=cfg.lr, momentum=cfg.momentum
    )
