"""Riemannian preconditioning of LoRA factors (Zhang & Pilanci 2024), batched over experts.

For expert i, with the parameters before the step:

    grad_A_i <- (B_i^T B_i + reg I)^-1 grad_A_i
    grad_B_i <- grad_B_i (A_i A_i^T + reg I)^-1

The map is linear in the gradient and depends only on the (replicated) parameters, so it
commutes with data-parallel averaging and gradient accumulation: it may run on each rank's
local gradient before reduction (see ``molora_ds.optim.zero``) or on the reduced one.

Contiguous fp32 tensors on CPU go to C++ kernels (``cpu_kernels``: one pass over each factor for its
Gram and inverse, one for each product); everything else (CUDA, bf16, ranks other than 1, 2, 4, 8, 16)
to the torch ops below. Both compute the inverses in float64.
"""

from __future__ import annotations

import torch

from molora_ds import cpu_kernels


def _regularised_inverse(gram: torch.Tensor, reg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``((gram + reg I)^-1, info)`` for a batch ``[E, r, r]`` of float64 SPD matrices, via Cholesky.

    float64 because reg (1e-6 by default) is tiny next to the Gram's scale once B has grown:
    in fp32 the factorisation would lose most digits of the small eigenvalues. ``info`` is
    ``cholesky_ex``'s (non-zero where a matrix was not positive definite, e.g. NaN parameters):
    returned as a tensor rather than raised, since raising would make the host wait for the device.
    """
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(gram + reg * eye)
    return torch.cholesky_inverse(factor), info


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # bf16 gradients are preconditioned in fp32


_BUFFERS: dict[tuple[torch.Size, torch.dtype, torch.device], torch.Tensor] = {}


def _buffer(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A scratch tensor, the same one for every call with the same shape, dtype and device.

    On CPU a fresh buffer of a few MB comes from mmap and every page faults on first touch: for a
    [20, 4, 4096] matrix that costs 2 ms a step where copying into it takes 0.1 ms. Valid until the
    next call with the same key.
    """
    key = (shape, dtype, device)
    if key not in _BUFFERS:
        _BUFFERS[key] = torch.empty(shape, dtype=dtype, device=device)
    return _BUFFERS[key]


def _float64(t: torch.Tensor) -> torch.Tensor:
    return _buffer(t.shape, torch.float64, t.device).copy_(t.detach())


def preconditioners_ex(
    lora_a: torch.Tensor, lora_b: torch.Tensor, reg: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(P_A, P_B, failed)``, the inverses each ``[E, r, r]`` float64: ``P_A = (B^T B + reg)^-1``,
    ``P_B = (A A^T + reg)^-1``; ``failed`` a bool tensor, true if a factorisation failed.

    ``lora_a`` is ``[E, r, in]``, ``lora_b`` is ``[E, out, r]``. The Gram matrices are float64 too:
    in fp32 their rounding (~1e-7 of the largest eigenvalue) reaches 1e-3 of P_A already after 100
    steps of training, when B^T B's smallest eigenvalue is ~1e-3 of its largest.
    """
    r = lora_a.shape[1]
    if cpu_kernels.usable(lora_a, lora_b, rank=r):  # one pass over each factor, no float64 copy
        kernels = cpu_kernels.kernels()
        (p_a, failed_a), (p_b, failed_b) = (
            kernels.inverse_of_gram(lora_b.detach(), False, reg),
            kernels.inverse_of_gram(lora_a.detach(), True, reg),
        )
        return p_a, p_b, failed_a | failed_b
    b = _float64(lora_b)
    gram_b = b.mT @ b  # computed before the next _float64 call may reuse the buffer
    a = _float64(lora_a)
    (p_a, info_a), (p_b, info_b) = _regularised_inverse(gram_b, reg), _regularised_inverse(a @ a.mT, reg)
    return p_a, p_b, (info_a != 0).any() | (info_b != 0).any()


def preconditioners(
    lora_a: torch.Tensor, lora_b: torch.Tensor, reg: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P_A, P_B)`` of ``preconditioners_ex``; raises if a factorisation failed (a host sync)."""
    p_a, p_b, failed = preconditioners_ex(lora_a, lora_b, reg)
    if failed:
        raise torch.linalg.LinAlgError(
            "Riemannian preconditioner: B^T B + reg I or A A^T + reg I is not positive definite (non-finite "
            "adapter weights?)"
        )
    return p_a, p_b


def precondition_a(grad_a: torch.Tensor, p_a: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``P_A @ grad_A`` per expert; ``grad_a [E, r, in]``; returned in ``grad_a``'s dtype.

    ``out``: an ``[E, r, in]`` tensor of the compute dtype (fp32 or better) for the torch ops' product
    (the CPU kernel, used for contiguous fp32 CPU gradients, returns a new tensor).
    """
    if cpu_kernels.usable(grad_a, rank=p_a.shape[-1]):  # in float64, rounded once
        return cpu_kernels.kernels().apply_(grad_a, p_a, True, torch.empty_like(grad_a))
    dt = _compute_dtype(grad_a)
    return torch.matmul(p_a.to(dt), grad_a.to(dt), out=out).to(grad_a.dtype)


def precondition_b(grad_b: torch.Tensor, p_b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``grad_B @ P_B`` per expert; ``grad_b [E, out, r]``; returned in ``grad_b``'s dtype.

    The torch ops compute it as ``(P_B grad_B^T)^T`` (P_B is symmetric): on CPU the product alone is ~7x
    faster with the long dimension last ([20, 4096, 4]); the result is then a transposed view. ``out``:
    an ``[E, r, out]`` tensor of the compute dtype for that product (not used by the CPU kernel).
    """
    if cpu_kernels.usable(grad_b, rank=p_b.shape[-1]):  # in float64, rounded once
        return cpu_kernels.kernels().apply_(grad_b, p_b, False, torch.empty_like(grad_b))
    dt = _compute_dtype(grad_b)
    return torch.matmul(p_b.to(dt), grad_b.to(dt).mT, out=out).mT.to(grad_b.dtype)


def precondition_(lora_a: torch.Tensor, lora_b: torch.Tensor, reg: float) -> None:
    """Precondition ``lora_a.grad`` and ``lora_b.grad`` in place, from the current parameter values."""
    p_a, p_b = preconditioners(lora_a, lora_b, reg)
    for g, p, rows in ((lora_a.grad, p_a, True), (lora_b.grad, p_b, False)):
        if g is None:
            continue
        if cpu_kernels.usable(g, rank=p.shape[-1]):
            cpu_kernels.kernels().apply_(g, p, rows, g)  # in place, a block at a time
        elif rows:
            g.copy_(precondition_a(g, p, out=_buffer(g.shape, _compute_dtype(g), g.device)))
        else:
            g.copy_(precondition_b(g, p, out=_buffer(g.mT.shape, _compute_dtype(g), g.device)))
