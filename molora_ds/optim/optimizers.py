"""The six training methods: sgd, adamw, rsgd, radamw and the gate-rescaled grsgd, gradamw.

Experts and routers are separate param groups. The expert group may be Riemannian-
preconditioned inside ``step`` (plain PyTorch, DDP) or by gradient hooks before ZeRO's
reduction (``molora_ds.optim.zero``). The router group has its own lr and its own grad-norm
clip, computed over all routers together; the experts are never clipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from molora_ds.inject import molora_layers
from molora_ds.optim.riemannian import precondition_

METHODS = ("sgd", "adamw", "rsgd", "radamw", "grsgd", "gradamw")


@dataclass
class OptimConfig:
    """Paper defaults (DESIGN.md section 5); ``lr=None`` takes 3e-5 for the SGD family, 1e-5 for AdamW."""

    method: str = "gradamw"
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
        if self.lr is None:
            self.lr = 1e-5 if self.is_adam else 3e-5
        if self.reg <= 0:
            raise ValueError(f"reg must be > 0 (it keeps the r x r systems invertible), got {self.reg}")
        self.betas = tuple(self.betas)

    @property
    def is_adam(self) -> bool:
        return self.method.endswith("adamw")

    @property
    def riemannian(self) -> bool:
        return self.method.startswith(("r", "g"))

    @property
    def gate_rescale(self) -> bool:
        return self.method.startswith("g")


class _MoLoRAGroups:
    """Mixin run before the base update: precondition expert pairs, clip the router group.

    ``grad_norm_group``: when ZeRO hands this optimizer partitions of flat gradients, set it to
    the data-parallel process group so that norms are summed over all partitions.

    ``skip_step``: set by the trainer when a loss was non-finite; the update is then skipped
    whole (state untouched), and the accumulated gradients are dropped by the caller.
    """

    grad_norm_group: dist.ProcessGroup | None = None
    partitioned: bool = False
    skip_step: bool = False

    def _prepare_grads(self) -> None:
        self.grad_norms = getattr(self, "grad_norms", {})
        for group in self.param_groups:
            if not group["params"]:
                # ZeRO-3 calls step once per sub-group, with every other group's list emptied: that
                # group's norm is taken (and all-reduced, on all ranks alike) in its own call.
                continue
            params = [p for p in group["params"] if p.grad is not None]
            if group.get("precondition_in_step"):
                for a, b in zip(params[0::2], params[1::2], strict=True):
                    precondition_(a, b, group["reg"])
            norm = self._global_norm([p.grad for p in params])
            self.grad_norms[group["name"]] = norm.item()
            if group.get("max_grad_norm"):
                torch.nn.utils.clip_grads_with_norm_(params, group["max_grad_norm"], norm)

    def _global_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        if self.partitioned:
            squared = norm.double().square().reshape(1)
            dist.all_reduce(squared, group=self.grad_norm_group)
            norm = squared.sqrt().reshape(()).to(norm.dtype)
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


def param_groups(model: nn.Module, cfg: OptimConfig, precondition_in_step: bool) -> list[dict]:
    """Experts as (A, B) pairs in layer order, then all routers."""
    layers = list(molora_layers(model).values())
    if not layers:
        raise ValueError("the model has no MoLoRALinear layers: call apply_molora(model, cfg) first")
    wrong = [n for n, m in molora_layers(model).items() if m.gate_rescale != cfg.gate_rescale]
    if wrong:
        raise ValueError(
            f"method {cfg.method!r} needs gate_rescale={cfg.gate_rescale} in MoLoRAConfig, but {wrong[0]} and "
            f"{len(wrong) - 1} more layers have gate_rescale={not cfg.gate_rescale}: the g-methods (grsgd, gradamw) "
            "are the others with gate_rescale=True"
        )
    experts = [p for m in layers for p in (m.lora_A, m.lora_B)]
    return [
        {
            "name": "experts",
            "params": experts,
            "lr": cfg.lr,
            "weight_decay": cfg.weight_decay,
            "reg": cfg.reg,
            "precondition_in_step": cfg.riemannian and precondition_in_step,
        },
        {
            "name": "router",
            "params": [m.router.weight for m in layers],
            "lr": cfg.gate_lr,
            "weight_decay": 0.0,
            "max_grad_norm": cfg.gate_max_grad_norm,
        },
    ]


def build_optimizer(
    model: nn.Module, method: str = "gradamw", *, precondition_in_step: bool = True, **kwargs
) -> torch.optim.Optimizer:
    """An optimizer over the model's MoLoRA parameters; keyword arguments are ``OptimConfig`` fields.

    ``precondition_in_step=False`` leaves the Riemannian preconditioning to gradient hooks
    (``molora_ds.optim.zero.GradientPreconditioner``), as DeepSpeed ZeRO needs.
    """
    cfg = OptimConfig(method=method, **kwargs)
    groups = param_groups(model, cfg, precondition_in_step)
    if cfg.is_adam:
        # torch's fused AdamW (one pass over memory per tensor, not ~8): same math, to float rounding.
        fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
        return MoLoRAAdamW(
            groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, correct_bias=cfg.correct_bias, fused=fused
        )
    return MoLoRASGD(groups, lr=cfg.lr, momentum=cfg.momentum)
