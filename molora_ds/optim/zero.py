"""Exact Riemannian preconditioning under DeepSpeed ZeRO 0-3.

ZeRO hands the optimizer flat, partitioned fp32 gradients, where a partition may cut an
expert's matrix in half. The preconditioner is linear in the gradient and depends only on
parameters every data-parallel rank holds identically, so we apply it where the full
per-expert matrices still exist: in a tensor hook on ``lora_A``/``lora_B``, which autograd
runs before the gradient is accumulated and before ZeRO's reduction hooks see it. The r x r
inverses come from the first forward pre-hook of a step, where ZeRO-3 has already gathered the
full parameters, and serve every micro-batch (and activation recomputation) of that step: the
parameters only change at the optimizer step. Registering both after ``deepspeed.initialize``
puts them after DeepSpeed's own hooks.

The Gram matrices come from the parameters the forward sees: under bf16 those are the bf16
working copies, not the fp32 master weights that ZeRO keeps partitioned in the optimizer. That
is deliberate: the gradient is evaluated at the bf16 point, and the Riemannian metric belongs
to the point where the gradient was taken; the master copy would also need a gather per layer
and step (a collective), where the working copy is already whole here.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from molora_ds.inject import molora_layers
from molora_ds.modules import MoLoRALinear
from molora_ds.optim.riemannian import precondition_a, precondition_b, preconditioners_ex


class GradientPreconditioner:
    """Preconditions every MoLoRA layer's expert gradients as autograd produces them."""

    def __init__(self, model: nn.Module, reg: float) -> None:
        self.reg = reg
        self._inverses: dict[MoLoRALinear, tuple[torch.Tensor, torch.Tensor]] = {}
        self._failed: list[torch.Tensor] = []
        self._handles = []
        for layer in molora_layers(model).values():
            self._handles += [
                layer.register_forward_pre_hook(self._capture),
                layer.lora_A.register_hook(partial(self._grad_a, layer)),
                layer.lora_B.register_hook(partial(self._grad_b, layer)),
            ]

    def _capture(self, layer: MoLoRALinear, args) -> None:
        if not torch.is_grad_enabled() or layer in self._inverses:
            return  # evaluation (no gradient will come), or already computed in this step
        p_a, p_b, failed = preconditioners_ex(layer.lora_A, layer.lora_B, self.reg)
        self._inverses[layer] = (p_a, p_b)
        self._failed.append(failed)

    def new_step(self) -> None:
        """Call after each optimizer step: the next forward recomputes the inverses."""
        self._inverses.clear()
        self._failed.clear()

    def failed(self) -> torch.Tensor:
        """A bool tensor (no host sync): true if a factorisation of this step failed, so that its
        preconditioned gradients are garbage and the step must be skipped."""
        return torch.stack(self._failed).any() if self._failed else torch.tensor(False)

    def _grad_a(self, layer: MoLoRALinear, grad: torch.Tensor) -> torch.Tensor:
        return precondition_a(grad, self._inverses[layer][0])

    def _grad_b(self, layer: MoLoRALinear, grad: torch.Tensor) -> torch.Tensor:
        return precondition_b(grad, self._inverses[layer][1])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
