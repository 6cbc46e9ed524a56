"""Riemannian preconditioning of LoRA factors (Zhang & Pilanci 2024), batched over experts.

For expert i, with the parameters before the step:

    grad_A_i <- (B_i^T B_i + reg I)^-1 grad_A_i
    grad_B_i <- grad_B_i (A_i A_i^T + reg I)^-1

The map is linear in the gradient and depends only on the (replicated) parameters, so it
commutes with data-parallel averaging and gradient accumulation: it may run on each rank's
local gradient before reduction (see ``molora_ds.optim.zero``) or on the reduced one.
"""

from __future__ import annotations

import torch


def _regularised_inverse(gram: torch.Tensor, reg: float) -> torch.Tensor:
    """``(gram + reg I)^-1`` for a batch ``[E, r, r]`` of SPD matrices, via Cholesky in float64.

    float64 because reg (1e-6 by default) is tiny next to the Gram's scale once B has grown:
    in fp32 the factorisation would lose most digits of the small eigenvalues.
    """
    g = gram.double()
    eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
    return torch.cholesky_inverse(torch.linalg.cholesky(g + reg * eye))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # bf16 gradients are preconditioned in fp32


def preconditioners(
    lora_a: torch.Tensor, lora_b: torch.Tensor, reg: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P_A, P_B)``, each ``[E, r, r]`` float64: ``P_A = (B^T B + reg)^-1``, ``P_B = (A A^T + reg)^-1``.

    ``lora_a`` is ``[E, r, in]``, ``lora_b`` is ``[E, out, r]``.
    """
    a, b = lora_a.detach().double(), lora_b.detach().double()
    return _regularised_inverse(b.mT @ b, reg), _regularised_inverse(a @ a.mT, reg)


def precondition_a(grad_a: torch.Tensor, p_a: torch.Tensor) -> torch.Tensor:
    """``P_A @ grad_A`` per expert; ``grad_a [E, r, in]``; returned in ``grad_a``'s dtype."""
    dt = _compute_dtype(grad_a)
    return (p_a.to(dt) @ grad_a.to(dt)).to(grad_a.dtype)


def precondition_b(grad_b: torch.Tensor, p_b: torch.Tensor) -> torch.Tensor:
    """``grad_B @ P_B`` per expert; ``grad_b [E, out, r]``; returned in ``grad_b``'s dtype."""
    dt = _compute_dtype(grad_b)
    return (grad_b.to(dt) @ p_b.to(dt)).to(grad_b.dtype)


def precondition_(lora_a: torch.Tensor, lora_b: torch.Tensor, reg: float) -> None:
    """Precondition ``lora_a.grad`` and ``lora_b.grad`` in place, from the current parameter values."""
    p_a, p_b = preconditioners(lora_a, lora_b, reg)
    if lora_a.grad is not None:
        lora_a.grad.copy_(precondition_a(lora_a.grad, p_a))
    if lora_b.grad is not None:
        lora_b.grad.copy_(precondition_b(lora_b.grad, p_b))
