"""The preconditioner's CPU kernels (``molora_ds/optim/precondition_cpu.cpp``) against float64 references
computed expert by expert with ``torch.linalg.inv``, and the dispatch that sends fp32 CPU tensors to them.

Bounds: the inverses are float64 from the same fp32 inputs, so they differ from the reference only by
float64 rounding of the Gram sums (K terms) and of the factorisation, amplified by the condition number;
the products are accumulated in float64 and rounded to fp32 once, so each element is within half an fp32
ulp of the exact product, plus the float64 accumulation error.
"""

from __future__ import annotations

import pytest
import torch

from molora_ds import cpu_kernels
from molora_ds.optim.riemannian import precondition_, precondition_a, precondition_b, preconditioners_ex

EPS64, HALF_ULP32 = torch.finfo(torch.float64).eps, 2.0**-24
E, REG = 5, 1e-6


@pytest.fixture(scope="module")
def kernels():
    module = cpu_kernels.kernels()
    assert module is not None, (
        "the CPU kernels did not build (scripts/setup.sh prebuilds them; see the warning)"
    )
    return module


def reference_inverse(gram: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(gram.shape[-1], dtype=torch.float64)
    return torch.stack([torch.linalg.inv(g + REG * eye) for g in gram])


def factors(r: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(E, r, k, generator=gen), torch.randn(E, k, r, generator=gen) * 1e-2


@pytest.mark.parametrize("r", cpu_kernels.RANKS)
@pytest.mark.parametrize("k", [1, 37, 4096])
def test_inverses_match_float64_reference(kernels, r, k):
    a, b = factors(r, k, seed=r * k)
    for x, rows, gram in ((a, True, a.double() @ a.double().mT), (b, False, b.double().mT @ b.double())):
        got, failed = kernels.inverse_of_gram(x, rows, REG)
        want = reference_inverse(gram)
        cond = torch.linalg.cond(gram + REG * torch.eye(r, dtype=torch.float64)).max().item()
        error = ((got - want).norm() / want.norm()).item()
        assert error <= (k + r**3) * EPS64 * cond, (rows, error, cond)
        assert not failed


@pytest.mark.parametrize("r", cpu_kernels.RANKS)
def test_products_are_the_float64_product_rounded_once(kernels, r):
    k = 301  # not a multiple of any vector width
    gen = torch.Generator().manual_seed(r)
    m = torch.randn(E, r, 2 * r, generator=gen, dtype=torch.float64)
    p = reference_inverse(m @ m.mT)
    for g, rows in (
        (torch.randn(E, r, k, generator=gen), True),
        (torch.randn(E, k, r, generator=gen), False),
    ):
        got = kernels.apply_(g, p, rows, torch.empty_like(g))
        want, size = (
            (p @ g.double(), p.abs() @ g.double().abs())
            if rows
            else (g.double() @ p, g.double().abs() @ p.abs())
        )
        assert ((got.double() - want).abs() <= HALF_ULP32 * want.abs() + r * EPS64 * size).all()
        in_place = g.clone()
        kernels.apply_(in_place, p, rows, in_place)
        assert torch.equal(in_place, got)


def test_failed_factorisations_are_flagged(kernels):
    a = torch.randn(E, 4, 16)
    assert not kernels.inverse_of_gram(a, True, REG)[1]
    a[3, 1, 5] = float("nan")
    assert kernels.inverse_of_gram(a, True, REG)[1]
    assert kernels.inverse_of_gram(torch.zeros(E, 4, 16), True, 0.0)[1]  # singular: a zero pivot


def test_ranks_not_compiled_are_refused_and_dispatched_to_torch_ops(kernels):
    a, b = factors(3, 64, seed=0)
    with pytest.raises(RuntimeError, match="ranks 1, 2, 4, 8, 16"):
        kernels.inverse_of_gram(a, True, REG)
    assert not cpu_kernels.usable(a, b, rank=3)
    p_a, p_b, failed = preconditioners_ex(a, b, REG)  # the torch ops
    torch.testing.assert_close(p_b, reference_inverse(a.double() @ a.double().mT))
    assert not failed


def test_fp32_cpu_preconditioning_runs_the_kernels(kernels):
    """preconditioners_ex, precondition_a/_b (hooks) and precondition_ (in place) give the kernels'
    results, bit for bit; other layouts take the torch ops."""
    a, b = factors(4, 300, seed=1)
    assert cpu_kernels.usable(a, b, rank=4)
    p_a, p_b, _ = preconditioners_ex(a, b, REG)
    assert torch.equal(p_a, kernels.inverse_of_gram(b, False, REG)[0])
    assert torch.equal(p_b, kernels.inverse_of_gram(a, True, REG)[0])
    ga, gb = torch.randn_like(a), torch.randn_like(b)
    want_a, want_b = (
        kernels.apply_(ga, p_a, True, torch.empty_like(ga)),
        kernels.apply_(gb, p_b, False, torch.empty_like(gb)),
    )
    assert torch.equal(precondition_a(ga, p_a), want_a) and torch.equal(precondition_b(gb, p_b), want_b)
    pa, pb = torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())
    pa.grad, pb.grad = ga.clone(), gb.clone()
    precondition_(pa, pb, REG)
    assert torch.equal(pa.grad, want_a) and torch.equal(pb.grad, want_b)
    # Torch ops for one expert's [r, in] matrices (a per-expert loop) and for a non-contiguous gradient.
    # They round P to fp32 and accumulate in fp32: r + 2 roundings of |P| |g| at most.
    one_expert, strided = ga[0].clone(), torch.randn(a.shape[2], 4, E).permute(2, 1, 0)
    assert not cpu_kernels.usable(one_expert, rank=4) and not cpu_kernels.usable(strided, rank=4)
    for g, p in ((one_expert, p_a[0]), (strided, p_a)):
        got, size = precondition_a(g, p).double(), p.abs() @ g.double().abs()
        assert ((got - p @ g.double()).abs() <= 6 * torch.finfo(torch.float32).eps * size).all()
