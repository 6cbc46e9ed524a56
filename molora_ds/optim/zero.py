"""Exact Riemannian preconditioning under DeepSpeed ZeRO 0-3.

ZeRO hands the optimizer flat, partitioned fp32 gradients, where a partition may cut an
expert's matrix in half. The preconditioner is linear in the gradient and depends only on
parameters every data-parallel rank holds identically, so we apply it where the full
per-expert matrices still exist: in a tensor hook on ``lora_A``/``lora_B``, which autograd
runs before the gradient is accumulated and before ZeRO's reduction hooks see it. The r x r
inverses come from a forward pre-hook, where ZeRO-3 has already gathered the full parameters.
Registering both after ``deepspeed.initialize`` puts them after DeepSpeed's own hooks.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from molora_ds.inject import molora_layers
from molora_ds.modules import MoLoRALinear
from molora_ds.optim.riemannian import precondition_a, precondition_b, preconditioners


class GradientPreconditioner:
    """Preconditions every MoLoRA layer's expert gradients as autograd produces them."""

    def __init__(self, model: nn.Module, reg: float) -> None:
        self.reg = reg
        self._inverses: dict[MoLoRALinear, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = []
        for layer in molora_layers(model).values():
            self._handles += [
                layer.register_forward_pre_hook(self._capture),
                layer.lora_A.register_hook(partial(self._grad_a, layer)),
                layer.lora_B.register_hook(partial(self._grad_b, layer)),
            ]

    def _capture(self, layer: MoLoRALinear, args) -> None:
        # Recomputed every forward (micro-batch, activation recomputation): the parameters only
        # change at the optimizer step, so all forwards of one step see the same values.
        if not torch.is_grad_enabled():
            return  # evaluation: no gradient will come
        self._inverses[layer] = preconditioners(layer.lora_A, layer.lora_B, self.reg)

    def _grad_a(self, layer: MoLoRALinear, grad: torch.Tensor) -> torch.Tensor:
        return precondition_a(grad, self._inverses[layer][0])

    def _grad_b(self, layer: MoLoRALinear, grad: torch.Tensor) -> torch.Tensor:
        return precondition_b(grad, self._inverses[layer][1])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
