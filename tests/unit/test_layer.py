"""MoLoRALinear against a per-expert Python loop written from DESIGN.md section 1.

The reference below never touches the library's batched path: it loops over experts, builds
the top-k mask by sorting, and gets the gate-rescaled backward from plain autograd of
``W x + s * sum_i [c_i o_i + (g_i - c_i) o_i.detach()]``, ``c_i = sqrt(g_i).detach()``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from molora_ds import MoLoRALinear
from molora_ds.modules import Router, top_k_gates

IN, OUT = 12, 10
SHAPES = [(1, 1, 1), (4, 2, 1), (5, 3, 2), (8, 4, 8)]  # (E, r, k): k=1 and k=E included
INPUT_SHAPES = [(7, IN), (2, 4, IN)]


def reference_gates(x2d: torch.Tensor, wg: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g, p)``: softmax probabilities, the k largest kept (found by sorting) and renormalised."""
    p = (x2d @ wg.t()).softmax(dim=-1)
    keep = torch.zeros_like(p).scatter(-1, p.argsort(dim=-1, descending=True)[:, :k], 1.0)
    g = p * keep
    return g / g.sum(dim=-1, keepdim=True), p


def reference_forward(x, w, bias, a, b, wg, *, k, scaling, rescale, x_dropped=None):
    """``y = W x + s * sum_i g_i B_i A_i dropout(x)``, one expert at a time."""
    x2d = x.reshape(-1, x.shape[-1])
    xd = x2d if x_dropped is None else x_dropped.reshape(-1, x.shape[-1])
    g, _ = reference_gates(x2d, wg, k)
    y = x2d @ w.t() + bias
    for i in range(a.shape[0]):
        o = xd @ a[i].t() @ b[i].t()
        gi = g[:, i : i + 1]
        if rescale:
            c = gi.sqrt().detach()
            y = y + scaling * (c * o + (gi - c) * o.detach())
        else:
            y = y + scaling * gi * o
    return y.reshape(*x.shape[:-1], w.shape[0])


def make_layer(num_experts, rank, top_k, *, rescale, dtype=torch.float64, dropout=0.0, seed=0, **kw):
    torch.manual_seed(seed)
    base = nn.Linear(IN, OUT, dtype=dtype)
    layer = MoLoRALinear(
        base, num_experts, rank, top_k, alpha=6.0, dropout=dropout, gate_rescale=rescale, **kw
    )
    with torch.no_grad():  # B is zero at init; make every expert contribute
        layer.lora_B.normal_(0, 0.5)
        layer.router.weight.normal_(0, 1.0)
    return layer


def layer_params(layer, dtype):
    """Leaf copies of the layer's tensors in ``dtype`` for the reference."""
    names = ("base_layer.weight", "base_layer.bias", "lora_A", "lora_B", "router.weight")
    state = dict(layer.named_parameters())
    return [state[n].detach().to(dtype).clone().requires_grad_() for n in names]


def run_both(layer, x, ref_dtype, upstream, x_dropped=None):
    """Outputs and gradients (A, B, router, x) of the layer and of the reference on ``x``."""
    x_layer = x.clone().requires_grad_()
    y = layer(x_layer)
    (y.to(ref_dtype) * upstream).sum().backward()
    got = [y, layer.lora_A.grad, layer.lora_B.grad, layer.router.weight.grad, x_layer.grad]

    w, bias, a, b, wg = layer_params(layer, ref_dtype)
    x_ref = x.detach().to(ref_dtype).clone().requires_grad_()
    xd = None if x_dropped is None else x_dropped.to(ref_dtype)
    y_ref = reference_forward(
        x_ref,
        w,
        bias,
        a,
        b,
        wg,
        k=layer.top_k,
        scaling=layer.scaling,
        rescale=layer.gate_rescale,
        x_dropped=xd,
    )
    (y_ref * upstream).sum().backward()
    return got, [y_ref, a.grad, b.grad, wg.grad, x_ref.grad]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("x_shape", INPUT_SHAPES)
def test_float64_matches_reference(shape, rescale, x_shape):
    layer = make_layer(*shape, rescale=rescale)
    torch.manual_seed(1)
    x = torch.randn(x_shape, dtype=torch.float64)
    upstream = torch.randn(*x_shape[:-1], OUT, dtype=torch.float64)
    got, want = run_both(layer, x, torch.float64, upstream)
    assert got[0].shape == want[0].shape == (*x_shape[:-1], OUT)
    for name, g, w in zip(("y", "lora_A", "lora_B", "router", "x"), got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_float32_matches_float64_reference(shape, rescale):
    layer = make_layer(*shape, rescale=rescale, dtype=torch.float32)
    torch.manual_seed(2)
    x = torch.randn(2, 5, IN)
    upstream = torch.randn(2, 5, OUT, dtype=torch.float64)
    got, want = run_both(layer, x, torch.float64, upstream)
    assert all(g.dtype == torch.float32 for g in got)
    for name, g, w in zip(("y", "lora_A", "lora_B", "router", "x"), got, want, strict=True):
        if name == "router" and shape[2] == 1:
            # A single renormalised gate is identically 1: the exact router gradient is 0,
            # and fp32 leaves only rounding noise (the gradients above are O(1)).
            assert w.abs().max() < 1e-12 and g.abs().max() < 1e-6
            continue
        assert rel_err(g, w) < 1e-5, name


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("shape", [(4, 2, 1), (5, 3, 2), (8, 4, 8)])
def test_bfloat16_close_to_float32_reference(shape, rescale):
    layer = make_layer(*shape, rescale=rescale, dtype=torch.bfloat16, seed=3)
    torch.manual_seed(4)
    x = torch.randn(3, 4, IN).to(torch.bfloat16)
    # Precondition: the k-th and (k+1)-th logits are far apart, so bf16 rounding cannot change
    # which experts are selected (a flip would be a legitimate difference, not an error).
    logits = x.float().reshape(-1, IN) @ layer.router.weight.float().t()
    num_experts, _, k = shape
    if k < num_experts:
        top = logits.sort(dim=-1, descending=True).values
        assert (top[:, k - 1] - top[:, k]).min() > 0.05
    upstream = torch.randn(3, 4, OUT)
    got, want = run_both(layer, x, torch.float32, upstream)
    assert got[0].dtype == torch.bfloat16
    for name, g, w in zip(("y", "lora_A", "lora_B", "router", "x"), got, want, strict=True):
        if name == "router" and k == 1:  # exactly 0 (see the fp32 test)
            assert g.abs().max() < 1e-2
            continue
        assert rel_err(g, w) < 2e-2, name


def test_bfloat16_router_softmax_in_float32():
    layer = make_layer(6, 2, 3, rescale=True, dtype=torch.bfloat16)
    captured = {}
    layer.router.register_forward_hook(lambda m, i, out: captured.update(gates=out[0]))
    x = torch.randn(5, 7, IN).to(torch.bfloat16)
    layer(x)  # the sparse router (no balance loss): no probabilities
    gates, probs = layer.router(x.reshape(35, IN), need_probs=True)  # the dense one
    # The same fp32 logits, two softmaxes (exp within 1 ulp = 2u, then a multiply by 1 / sum). Dense: p_i off by
    # 3u (the common 1 / sum_E cancels), the kept sum k - 1 more, the renormalising division 1: k + 6. Sparse:
    # exp 2, the sum of k (k - 1 + 2), its reciprocal 1, the multiply 1: k + 5. Apart by at most 2k + 11 u.
    torch.testing.assert_close(captured["gates"], gates, rtol=(2 * 3 + 11) * 2**-24, atol=0)
    assert gates.dtype == probs.dtype == captured["gates"].dtype == torch.float32
    ones = torch.ones(35)
    torch.testing.assert_close(gates.sum(-1), ones, rtol=0, atol=1e-6)
    torch.testing.assert_close(probs.sum(-1), ones, rtol=0, atol=1e-6)
    assert ((gates > 0).sum(-1) == 3).all()


def bf16_router_case(tokens: int = 4096) -> tuple[MoLoRALinear, torch.Tensor]:
    """A bf16 layer of the paper's router shape (E=20, top-10, in=4096) with default init, and inputs.

    Seeded on CPU: 4096 tokens, of which 13 get another top-10 set from bf16 logits on the machine
    where this was written (1024 tokens: 2); the tests below assert that at least one does.
    """
    torch.manual_seed(0)
    layer = MoLoRALinear(nn.Linear(4096, 8, dtype=torch.bfloat16), 20, 4, 10, alpha=16.0)
    x = torch.randn(tokens, 4096, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    return layer, x


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros_like(logits, dtype=torch.bool).scatter(-1, logits.topk(k, dim=-1).indices, True)


def test_bfloat16_router_logits_in_float32():
    """The top-10 set equals the one from fp32 logits of the same bf16 weights and inputs, exactly.

    Exact because the reference is the same fp32 product of the same bf16 values, on the same
    kernel. Failed before the logits were fp32: they were bf16 (only the softmax was upcast).
    """
    layer, x = bf16_router_case()
    captured = {}
    layer.router.register_forward_hook(lambda m, i, out: captured.update(gates=out[0]))
    layer(x)
    w = layer.router.weight.detach()
    want = top_k_mask(x.float() @ w.float().T, 10)
    assert captured["gates"].dtype == torch.float32
    assert torch.equal(captured["gates"] > 0, want)
    # The case can fail: bf16 logits (softmax upcast or not) pick another set on some tokens.
    assert (top_k_mask((x @ w.T).float(), 10) != want).any(-1).sum() >= 1


def test_router_ignores_autocast_and_saves_no_float32_copy_of_x():
    """Under bf16 autocast an fp32 router gives the same gates as without; the backward keeps x as given.

    Plain autograd of ``x.float() @ W.float().T`` would save an fp32 copy of every layer's bf16 input.
    """
    layer, x = bf16_router_case()
    router = Router(4096, 20, top_k=10)
    with torch.no_grad():
        router.weight.copy_(layer.router.weight)
    want, _ = router(x.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = router(x.float())
    assert torch.equal(got, want)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        gates, _ = layer.router(x)
    assert [tuple(t.shape) for t in saved if t.dtype == torch.float32 and t.shape == x.shape] == []
    # The gradients are the fp32 ones of the same bf16 values, rounded once to bf16.
    upstream = torch.randn(gates.shape, generator=torch.Generator().manual_seed(2))
    (gates * upstream).sum().backward()
    xr = x.float().requires_grad_()
    wr = layer.router.weight.detach().float().requires_grad_()
    (top_k_gates(xr @ wr.T, 10)[0] * upstream).sum().backward()
    # one bf16 rounding of an fp32 value: relative error <= 2^-8 (plus fp32 summation-order noise)
    torch.testing.assert_close(
        layer.router.weight.grad.float(), wr.grad, rtol=2**-8, atol=1e-6 * wr.grad.abs().max().item()
    )


def test_no_linear_inside_the_layer_but_its_base():
    """Tools that find linears by type (PEFT "all-linear", quantisers) must not wrap the router.

    Failed before: Router subclassed nn.Linear.
    """
    layer = make_layer(4, 2, 2, rescale=True)
    assert [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)] == ["base_layer"]
    assert dict(layer.named_parameters()).keys() >= {"router.weight"}
    # nn.Linear's default init, drawn the same way (same generator state gives the same weight)
    torch.manual_seed(5)
    router = Router(IN, 6, top_k=2)
    torch.manual_seed(5)
    assert torch.equal(router.weight, nn.Linear(IN, 6, bias=False).weight)


@pytest.mark.parametrize("rescale", [False, True])
def test_dropout_one_mask_shared_by_all_experts(rescale):
    layer = make_layer(4, 2, 2, rescale=rescale, dropout=0.4)
    x = torch.randn(2, 6, IN, dtype=torch.float64)
    upstream = torch.randn(2, 6, OUT, dtype=torch.float64)

    torch.manual_seed(123)
    layer.train()
    x_layer = x.clone().requires_grad_()
    y = layer(x_layer)
    (y * upstream).sum().backward()
    got = [y, layer.lora_A.grad, layer.lora_B.grad, layer.router.weight.grad, x_layer.grad]

    torch.manual_seed(123)
    x_dropped = nn.functional.dropout(x.reshape(-1, IN), p=0.4, training=True)
    assert (x_dropped == 0).any() and (x_dropped != 0).any()
    w, bias, a, b, wg = layer_params(layer, torch.float64)
    x_ref = x.clone().requires_grad_()
    # The mask is a constant, so d(dropout(x))/dx = mask / (1 - p): apply it to x_ref to keep x's gradient.
    mask_scale = x_dropped / x.reshape(-1, IN)
    y_ref = reference_forward(
        x_ref,
        w,
        bias,
        a,
        b,
        wg,
        k=2,
        scaling=layer.scaling,
        rescale=rescale,
        x_dropped=x_ref.reshape(-1, IN) * mask_scale,
    )
    (y_ref * upstream).sum().backward()
    for name, g, want in zip(
        ("y", "lora_A", "lora_B", "router", "x"), got, [y_ref, a.grad, b.grad, wg.grad, x_ref.grad]
    ):
        torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")

    # The dropout changed the output (so this test would notice a missing dropout) ...
    no_drop = reference_forward(x, w, bias, a, b, wg, k=2, scaling=layer.scaling, rescale=rescale)
    assert (y - no_drop).abs().max() > 1e-3
    # ... and eval mode switches it off.
    layer.eval()
    torch.testing.assert_close(layer(x), no_drop, rtol=1e-10, atol=1e-10)


def test_init_b_zero_output_is_base_and_a_kaiming_uniform():
    torch.manual_seed(0)
    in_features = 256
    base = nn.Linear(in_features, 9)
    layer = MoLoRALinear(base, num_experts=6, rank=8, top_k=2, alpha=16.0)
    assert layer.base_layer is base
    assert not any(p.requires_grad for p in base.parameters())
    assert layer.lora_A.shape == (6, 8, in_features) and layer.lora_B.shape == (6, 9, 8)
    assert layer.router.weight.shape == (6, in_features)
    assert layer.scaling == 16.0 / 8
    assert torch.count_nonzero(layer.lora_B) == 0
    x = torch.randn(3, 5, in_features)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)

    # kaiming_uniform(a=sqrt(5)): gain sqrt(2 / (1 + 5)), bound = gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in).
    bound = math.sqrt(2 / 6) * math.sqrt(3 / in_features)
    assert bound == pytest.approx(1 / math.sqrt(in_features))
    a = layer.lora_A.detach()
    assert a.abs().max() <= bound
    assert a.abs().max() > 0.95 * bound  # uniform over the whole interval, not a narrower init
    assert a.mean().abs() < 0.05 * bound
    # uniform(-b, b) has variance b^2 / 3
    assert a.var().item() == pytest.approx(bound**2 / 3, rel=0.05)
    assert not torch.equal(a[0], a[1])  # experts are initialised independently


def test_expert_load_sums_to_one_and_counts_slots():
    layer = make_layer(5, 2, 2, rescale=True)
    x = torch.randn(4, 6, IN, dtype=torch.float64)
    layer(x)
    g, _ = reference_gates(x.reshape(-1, IN), layer.router.weight.detach(), 2)
    want = (g > 0).double().sum(0) / (24 * 2)
    torch.testing.assert_close(layer.expert_load.double(), want)
    assert layer.expert_load.sum().item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("shape", [(5, 2, 2), (4, 2, 4)])
def test_load_balance_loss_matches_switch_formula(shape):
    num_experts, _, k = shape
    coef = 0.3
    layer = make_layer(*shape, rescale=True, load_balance_coef=coef)
    x = torch.randn(20, IN, dtype=torch.float64)
    layer(x)

    wg = layer.router.weight.detach().clone().requires_grad_()
    g, p = reference_gates(x, wg, k)
    f = torch.tensor([(g[:, i] > 0).sum().item() / (20 * k) for i in range(num_experts)], dtype=torch.float64)
    big_p = torch.stack([p[:, i].mean() for i in range(num_experts)])
    want = coef * num_experts * sum(f[i] * big_p[i] for i in range(num_experts))
    # f_i is a share of slots counted in fp32 by the library, hence 1e-6 and not float64-tight.
    torch.testing.assert_close(layer.aux_loss, want, rtol=1e-6, atol=0)

    layer.aux_loss.backward()
    want.backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.norm() > 0
    torch.testing.assert_close(layer.router.weight.grad, wg.grad, rtol=1e-6, atol=1e-9)
    assert layer.lora_A.grad is None and layer.lora_B.grad is None  # the balance loss is the router's alone


def test_no_load_balance_loss_by_default():
    layer = make_layer(4, 2, 2, rescale=True)
    layer(torch.randn(3, IN, dtype=torch.float64))
    assert layer.aux_loss is None


def test_top_k_larger_than_num_experts_raises():
    with pytest.raises(ValueError, match="top_k=5 must be between 1 and num_experts=4"):
        MoLoRALinear(nn.Linear(4, 4), num_experts=4, rank=2, top_k=5, alpha=1.0)
    with pytest.raises(ValueError, match="top_k=0"):
        MoLoRALinear(nn.Linear(4, 4), num_experts=4, rank=2, top_k=0, alpha=1.0)
    with pytest.raises(TypeError, match="wraps nn.Linear"):
        MoLoRALinear(nn.Conv1d(4, 4, 1), num_experts=4, rank=2, top_k=1, alpha=1.0)


@pytest.mark.parametrize("need_probs", [True, False])
def test_router_returns_renormalised_top_k(need_probs):
    """Values and gradients against the reference, fp64: with probabilities (autograd through the full
    softmax) and without (the sparse backward through the k selected logits only: in fp64, its dense
    scatter-and-GEMM fallback)."""
    torch.manual_seed(0)
    router = Router(IN, 6, top_k=2).double()
    x = torch.randn(9, IN, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(9, 6, dtype=torch.float64)
    gates, probs = router(x, need_probs=need_probs)
    (gates * upstream).sum().backward()
    xr, wr = x.detach().clone().requires_grad_(), router.weight.detach().clone().requires_grad_()
    want_g, want_p = reference_gates(xr, wr, 2)
    (want_g * upstream).sum().backward()
    torch.testing.assert_close(gates, want_g)
    if need_probs:
        torch.testing.assert_close(probs, want_p)
    else:
        assert probs is None
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(router.weight.grad, wr.grad)


@pytest.mark.parametrize("top_k", [1, 3, 8])
def test_sparse_router_backward_fp32_kernels_within_rounding(top_k):
    """fp32 on CPU takes our pair kernels (r = 1) for the sparse router backward, against the fp64 reference.
    Inputs are small dyadic numbers, so the logits are exact in fp32 too and only the softmax and the pair
    sums round. A gate is off by k + 5 u (exp 2, the sum of k, reciprocal, multiply: see the bf16 test
    above). d_j = g_j (up_j - sum_m g_m up_m) is off by (3k + 7) u times d_abs_j = g_j (|up_j| +
    sum_m g_m |up_m|): the gates' k + 5 in g_j, 2k + 4 in the sum (its gates, products and k - 1
    additions), 1 each for the subtraction and the product. Then a sum of k (dx) or up to T (dW) products
    adds k or T: first-order bounds, far below a wrong expert or a missing term."""
    torch.manual_seed(0)
    tokens, experts = 50, 16
    router = Router(IN, experts, top_k=top_k)
    with torch.no_grad():  # dyadic: every product and sum of IN of them is exact in fp32
        router.weight.copy_(torch.randint(-8, 9, (experts, IN)) / 64)
    x = (torch.randint(-8, 9, (tokens, IN)) / 8).requires_grad_()
    upstream = torch.randn(tokens, experts)
    gates, _ = router(x)
    (gates * upstream).sum().backward()
    xr = x.detach().double().requires_grad_()
    wr = router.weight.detach().double().requires_grad_()
    want_g, _ = reference_gates(xr, wr, top_k)
    (want_g * upstream.double()).sum().backward()
    u = 2**-24
    torch.testing.assert_close(gates.double(), want_g, rtol=(top_k + 5) * u, atol=0)
    if top_k == 1:  # a renormalised top-1 gate is 1 whatever the logits
        assert not x.grad.any() and not router.weight.grad.any()
        return
    up = upstream.double().abs() * (want_g > 0)  # the selected entries: the others give no gradient
    d_abs = want_g * (up + (want_g * up).sum(-1, keepdim=True))
    bound_x = (3 * top_k + 7 + top_k) * u * (d_abs @ wr.detach().abs())
    bound_w = (3 * top_k + 7 + tokens) * u * (d_abs.T @ xr.detach().abs())
    assert xr.grad.abs().max() > 0 and wr.grad.abs().max() > 0
    assert ((x.grad.double() - xr.grad).abs() <= bound_x).all()
    assert ((router.weight.grad.double() - wr.grad).abs() <= bound_w).all()


def test_trap_detach_on_h_only_is_caught():
    """The wrong rescale (detach trick on ``h = A x`` only, then B) gives B a g-weighted gradient.

    Our layer must match the correct reference and differ from the wrong one; the wrong one's
    B gradient is exactly the plain (non-rescaled) one.
    """
    layer = make_layer(4, 2, 2, rescale=True)
    x = torch.randn(10, IN, dtype=torch.float64)
    upstream = torch.randn(10, OUT, dtype=torch.float64)
    got, want = run_both(layer, x, torch.float64, upstream)

    w, bias, a, b, wg = layer_params(layer, torch.float64)
    g, _ = reference_gates(x, wg, 2)
    y = x @ w.t() + bias
    for i in range(4):
        h = x @ a[i].t()
        gi = g[:, i : i + 1]
        c = gi.sqrt().detach()
        y = y + layer.scaling * (c * h + (gi - c) * h.detach()) @ b[i].t()
    (y * upstream).sum().backward()

    torch.testing.assert_close(got[2], want[2], rtol=1e-10, atol=1e-10)
    assert (b.grad - want[2]).norm() > 0.1 * want[2].norm()
    assert (got[2] - b.grad).norm() > 0.1 * want[2].norm()
    plain = make_layer(4, 2, 2, rescale=False)
    plain(x).mul(upstream).sum().backward()
    torch.testing.assert_close(b.grad, plain.lora_B.grad, rtol=1e-10, atol=1e-10)
