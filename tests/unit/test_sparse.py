"""The sparse expert path against the dense one (itself checked against a per-expert loop in
test_layer.py): forward values and the gradients of x, A, B and the router, both gate modes,
top_k = 1 and top_k = E, an expert that no token chooses, bf16 within a derived bound, and the
Riemannian gradient hooks on top."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from molora_ds import MoLoRAConfig, MoLoRALinear
from molora_ds.modules.sparse import (
    grouped_lora_experts,
    kernels_fit,
    plan_pairs,
    routed_fits,
    routed_lora_experts,
    selected_lora_experts,
    use_sparse,
)
from molora_ds.optim import GradientPreconditioner

IN, OUT = 24, 20
# (E, r, k, tokens): k=1, k=E, more experts than tokens (most get none), blocks of several rows
SHAPES = [(6, 2, 1, 9), (5, 3, 5, 7), (64, 4, 8, 10), (8, 2, 3, 200)]


def make_pair(num_experts, rank, top_k, rescale, dtype=torch.float64, seed=0):
    """The same layer twice, dense and sparse; B and router non-trivial so every gradient is non-zero."""
    layers = []
    for compute in ("dense", "sparse"):
        torch.manual_seed(seed)
        base = nn.Linear(IN, OUT, dtype=dtype)
        layer = MoLoRALinear(
            base, num_experts, rank, top_k, alpha=8.0, gate_rescale=rescale, expert_compute=compute
        )
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.5)
            layer.router.weight.normal_(0, 1.0)
        layers.append(layer)
    return layers


def run(layer, x, dy):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    grads = [x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.router.weight.grad]
    return y.detach(), grads


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_equals_dense_fp64(shape, rescale):
    num_experts, rank, top_k, tokens = shape
    dense, sparse = make_pair(num_experts, rank, top_k, rescale)
    assert sparse.sparse and not dense.sparse
    torch.manual_seed(1)
    x, dy = torch.randn(tokens, IN, dtype=torch.float64), torch.randn(tokens, OUT, dtype=torch.float64)
    y_d, g_d = run(dense, x, dy)
    y_s, g_s = run(sparse, x, dy)
    # fp64: only the summation order differs
    torch.testing.assert_close(y_s, y_d, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(("x", "A", "B", "router"), g_s, g_d):
        if name == "router" and top_k == 1:  # a renormalised top-1 gate is 1 whatever the logits
            assert not a.any() and not b.any()
            continue
        assert b.abs().max() > 0, f"{name}: the reference gradient is zero, the test would not bite"
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12, msg=f"gradient of {name}")


def test_gate_rescale_changes_the_gradient():
    """The two modes differ in A's gradient (so the rescale comparison above can fail)."""
    grads = [run(make_pair(8, 2, 3, rescale)[1], *_inputs(30))[1][1] for rescale in (False, True)]
    assert (grads[0] - grads[1]).abs().max() > 1e-3


def _inputs(tokens, dtype=torch.float64):
    torch.manual_seed(2)
    return torch.randn(tokens, IN, dtype=dtype), torch.randn(tokens, OUT, dtype=dtype)


def test_expert_without_tokens():
    """An expert no token selects gets exactly zero gradients, in both paths, and nothing hangs on it."""
    dense, sparse = make_pair(8, 2, 2, rescale=True)
    with torch.no_grad():
        for layer in (dense, sparse):
            layer.router.weight[0] = -100 * layer.router.weight[1:].abs().sum(
                0
            )  # expert 0: never in the top 2
    x, dy = _inputs(40)
    x = x.abs()  # so that expert 0's logit is very negative for every token
    (_, g_d), (_, g_s) = run(dense, x, dy), run(sparse, x, dy)
    assert sparse.expert_load[0] == 0
    for a, b in zip(g_s[1:3], g_d[1:3]):
        assert (a[0] == 0).all() and (b[0] == 0).all()
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
    plan = plan_pairs(torch.tensor([0, 0, 1, 1]), torch.tensor([1, 2, 2, 3]), 2, 5, 1)
    assert plan.crow_t.tolist() == [0, 0, 1, 3, 4, 4] and plan.col_t.tolist() == [0, 0, 1, 1]
    plan = plan_pairs(torch.tensor([0, 2, 2]), torch.tensor([3, 0, 1]), 3, 4, 2)  # rows with 1, 0, 2 pairs
    assert plan.crow.tolist() == [0, 2, 2, 6] and plan.col.tolist() == [6, 7, 0, 1, 2, 3]
    assert plan.col_t.tolist() == [2, 2, 2, 2, 0, 0] and plan.crow_t.tolist() == [0, 1, 2, 3, 4, 4, 4, 5, 6]


@pytest.mark.parametrize("compute", ["dense", "sparse"])
def test_bf16_within_rounding_bound(compute):
    """bf16 x, A, B (the layer's own values): against fp64 on the same values, the error of
    ``y = s * sum_j g_j B_j (A_j x)`` comes from four roundings to bf16 (the gate, h = A x, each
    expert's output ``z_j`` in the sparse path or ``h*g`` in the dense one, and y), each at most
    u = 2^-8 relative, fp32 accumulation adding ~1e-6: |err| <= 4u * sum_j s g_j |B_j| |A_j| |x|
    per element, to first order. A wrong expert or gate would miss it by ~1/u."""
    num_experts, rank, top_k, tokens = 16, 4, 3, 64
    layer = make_pair(num_experts, rank, top_k, rescale=True, dtype=torch.float64)[
        0 if compute == "dense" else 1
    ]
    x64, _ = _inputs(tokens)
    x16 = x64.bfloat16()
    a16, b16 = layer.lora_A.detach().bfloat16(), layer.lora_B.detach().bfloat16()
    with torch.no_grad():
        gates, _ = layer.router(x16.double())
        ref = torch.zeros(tokens, OUT, dtype=torch.float64)
        bound = torch.zeros_like(ref)
        for i in range(num_experts):
            a, b, g = a16[i].double(), b16[i].double(), gates[:, i : i + 1]
            ref += layer.scaling * g * (x16.double() @ a.T @ b.T)
            bound += layer.scaling * g * (x16.double().abs() @ a.abs().T @ b.abs().T)
        bf16 = MoLoRALinear(
            nn.Linear(IN, OUT, dtype=torch.bfloat16),
            num_experts,
            rank,
            top_k,
            alpha=8.0,
            expert_compute=compute,
        )
        bf16.lora_A.copy_(a16), bf16.lora_B.copy_(b16), bf16.router.weight.copy_(layer.router.weight)
        bf16.base_layer.weight.zero_(), bf16.base_layer.bias.zero_()
        got = bf16(x16).double()
    u = 2.0**-8
    err = (got - ref).abs()
    assert (err <= 4 * u * bound + 1e-6).all(), f"max err / bound {(err / (4 * u * bound + 1e-6)).max():.2f}"
    assert err.max() > 0  # bf16 did round: the bound is the thing tested


@pytest.mark.parametrize("rescale", [False, True])
def test_sparse_under_riemannian_hooks(rescale):
    """The preconditioner's gradient hooks see the same gradients from either path."""
    dense, sparse = make_pair(8, 2, 3, rescale)
    grads = []
    for layer in (dense, sparse):
        model = nn.Sequential(layer)
        pre = GradientPreconditioner(model, reg=1e-3)
        _, g = run(model[0], *_inputs(50))
        grads.append(g)
        pre.remove()
    raw = run(make_pair(8, 2, 3, rescale)[1], *_inputs(50))[1]
    assert (raw[1] - grads[1][1]).abs().max() > 1e-3  # the hooks did precondition
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_auto_rule_and_config():
    cpu = torch.device("cpu")
    assert not use_sparse(20, 10, cpu)  # the paper's setting stays dense
    # bench/README.md, measured: sparse 1.4-1.6x ahead at E=24 and 32, top-8; level at E=20, top-8
    assert use_sparse(24, 8, cpu) and use_sparse(32, 8, cpu) and not use_sparse(20, 8, cpu)
    layer = MoLoRALinear(nn.Linear(4, 4), 256, 1, 2, alpha=1.0)
    assert layer.sparse and not MoLoRALinear(nn.Linear(4, 4), 4, 1, 2, alpha=1.0).sparse
    with pytest.raises(ValueError, match="expert_compute"):
        MoLoRAConfig(expert_compute="fast")
    with pytest.raises(ValueError, match="does not divide the expert count 6"):
        MoLoRAConfig(num_experts=6, top_k=2, expert_parallel_size=4)


def test_sparse_repeats_bit_exact():
    """Two runs on the same input give identical bits (resume is promised bit-exact; no atomics), and so
    do runs on 1 and on 2 threads (our CPU kernels split tokens or experts over threads, never one sum)."""
    _, sparse = make_pair(16, 4, 3, rescale=True, dtype=torch.float32)
    assert kernels_fit(sparse.lora_A)
    x, dy = _inputs(300, dtype=torch.float32)
    threads = torch.get_num_threads()
    results = []
    for n in (threads, threads, 1, 2):
        torch.set_num_threads(n)
        try:
            results.append(run(sparse, x, dy))
        finally:
            torch.set_num_threads(threads)
        sparse.zero_grad()
    (y1, g1), *others = results
    for y, g in others:
        assert torch.equal(y1, y)
        for a, b in zip(g1, g):
            assert torch.equal(a, b)


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("path", ["grouped_mm", "cpu_kernels"])
def test_fp32_paths_within_the_fp32_bound(path, shape, rescale):
    """The CUDA path (``grouped_lora_experts``; torch's grouped_mm also runs on CPU in fp32) and our CPU
    kernels (``selected_lora_experts`` on fp32 CPU input, pairs_cpu.cpp) against the CSR path in fp64 on the
    same fp32 values. Every result is nested sums of products over at most n = in + out + r k + T terms in
    all (the weight gradients sum over tokens), so in fp32 each element is off by at most n u (u = 2^-24),
    to first order, times the same sums over absolute values (the CSR path on |x|, |A|, |B|, |g| and |dy|);
    2x for the few elementwise roundings (gate, rescale, scaling) and second-order terms."""
    num_experts, rank, top_k, tokens = shape
    torch.manual_seed(2)
    x, dy = torch.randn(tokens, IN), torch.randn(tokens, OUT)
    a, b = torch.randn(num_experts, rank, IN), torch.randn(num_experts, OUT, rank)
    gates = torch.randn(tokens, num_experts).softmax(-1)
    experts = gates.topk(top_k, dim=-1).indices.sort(dim=-1).values
    selected = gates.gather(-1, experts).reshape(-1)
    rows, experts = torch.arange(tokens).repeat_interleave(top_k), experts.reshape(-1)

    def run(fn, dy, *inputs):
        inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
        y = fn(*inputs, rows, experts, 2.0, rescale)
        y.backward(dy.to(y.dtype))
        return [y.detach(), *(t.grad for t in inputs)]

    if path == "cpu_kernels":
        assert kernels_fit(x), "the CPU kernels are not built here: the test would compare CSR with CSR"
    got = run(grouped_lora_experts if path == "grouped_mm" else selected_lora_experts, dy, x, a, b, selected)
    want = run(selected_lora_experts, dy, *(t.double() for t in (x, a, b, selected)))
    bound = run(selected_lora_experts, dy.abs(), *(t.double().abs() for t in (x, a, b, selected)))
    n, u = IN + OUT + rank * top_k + tokens, 2.0**-24
    for name, g, w, m in zip(("y", "x", "A", "B", "gates"), got, want, bound):
        assert w.abs().max() > 0, f"{name}: zero reference, the test would not bite"
        ratio = ((g.double() - w).abs() / (n * u * m).clamp_min(1e-300)).max()
        assert ratio <= 2, f"{name}: off by {ratio:.2f} n u of the absolute sums"


def test_cpu_kernels_token_result_independent_of_the_batch():
    """A token's output from our CPU kernels is the same bits whether other tokens share its experts or not
    (each dot product has a fixed lane structure, each row its pairs in order): so token dispatch, which sends
    each rank a different subset of tokens, computes every token as the unsharded layer would."""
    torch.manual_seed(3)
    tokens, num_experts, rank, top_k = 301, 12, 4, 3
    x, a, b = torch.randn(tokens, IN), torch.randn(num_experts, rank, IN), torch.randn(num_experts, OUT, rank)
    assert kernels_fit(x)
    gates = torch.randn(tokens, num_experts).softmax(-1)
    experts = gates.topk(top_k, dim=-1).indices.sort(dim=-1).values
    selected = gates.gather(-1, experts)
    rows = torch.arange(tokens).repeat_interleave(top_k)
    full = selected_lora_experts(x, a, b, selected.reshape(-1), rows, experts.reshape(-1), 2.0, True)
    for part in (slice(0, 1), slice(7, 8), slice(100, 177)):
        n = part.stop - part.start
        sub_rows = torch.arange(n).repeat_interleave(top_k)
        got = selected_lora_experts(
            x[part], a, b, selected[part].reshape(-1), sub_rows, experts[part].reshape(-1), 2.0, True
        )
        assert torch.equal(got, full[part])


def _routed_reference(x, x_router, weight, a, b, experts, dy, scaling, rescale, absolute):
    """``routed_lora_experts``' results written out in fp64 over the given selection, gathers and einsums:
    ``(y, dx, dx_router, dW, dA, dB)``. With ``absolute``, every product and sum runs over absolute values
    and every difference becomes a sum (``g (|d_g| + sum g |d_g|)``): what rounding errors scale with."""
    f = (lambda t: t.abs()) if absolute else (lambda t: t)
    x, x_router, weight, a, b, dy = (f(t.double()) for t in (x, x_router, weight, a, b, dy))
    logits = torch.einsum("ti,tki->tk", x_router, weight[experts])  # exact: dyadic inputs
    g = logits.softmax(-1)
    h = torch.einsum("tkri,ti->tkr", f(a[experts]), x)
    y = scaling * torch.einsum("tk,tkr,tkor->to", g, h, b[experts])
    u = scaling * torch.einsum("to,tkor->tkr", dy, b[experts])
    d_g = (u * h).sum(-1)
    d_logits = g * (
        d_g + (g * d_g).sum(-1, keepdim=True) if absolute else d_g - (g * d_g).sum(-1, keepdim=True)
    )
    w = g.sqrt() if rescale else g
    dh = u * w.unsqueeze(-1)
    dx = torch.einsum("tkr,tkri->ti", dh, a[experts])
    dx_router = torch.einsum("tk,tki->ti", d_logits, weight[experts])
    da = torch.zeros_like(a).index_put_((experts,), torch.einsum("tkr,ti->tkri", dh, x), accumulate=True)
    dw = torch.zeros_like(weight).index_put_(
        (experts,), torch.einsum("tk,ti->tki", d_logits, x_router), accumulate=True
    )
    hw = scaling * h * w.unsqueeze(-1)
    db = torch.zeros_like(b).index_put_((experts,), torch.einsum("tkr,to->tkor", hw, dy), accumulate=True)
    return y, dx, dx_router, dw, da, db


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_routed_path_within_the_fp32_bound(shape, rescale, shared):
    """The fused router-and-experts Function (``routed_lora_experts``, fp32 on our CPU kernels; the router's
    weight an (r+1)-th expert row when router and experts read the same x, else its own passes) against the
    same math in fp64 (``_routed_reference``) over the selection it made, which must be the top k in fp64
    too. Inputs are dyadic, so the logits are exact in fp32; then every result is a chain of roundings: the
    softmax and its backward (3k + 7, test_layer.py's router test), the products' sums (in, out, r k, up to T
    tokens) and a few elementwise ones. So each element is off by at most n u, n = in + out + r k + T + 4k +
    10, times the reference over absolute values; 2x for second-order terms."""
    num_experts, rank, top_k, tokens = shape
    torch.manual_seed(4)
    dyadic = lambda *size, d: torch.randint(-8, 9, size) / d  # noqa: E731
    x, weight = dyadic(tokens, IN, d=8), dyadic(num_experts, IN, d=64)
    x_experts = x if shared else dyadic(tokens, IN, d=8)
    a, b, dy = (
        torch.randn(num_experts, rank, IN),
        torch.randn(num_experts, OUT, rank),
        torch.randn(tokens, OUT),
    )
    leaves = [t.clone().requires_grad_(True) for t in (x, weight, a, b)]
    x_in = leaves[0] if shared else x_experts.clone().requires_grad_(True)
    y, experts = routed_lora_experts(leaves[0], x_in, *leaves[1:], top_k, 2.0, rescale)
    y.backward(dy)
    dx = leaves[0].grad if shared else x_in.grad  # shared: both terms in one gradient
    dx_router = torch.zeros_like(dx) if shared else leaves[0].grad
    got = [y, dx, dx_router, leaves[1].grad, leaves[2].grad, leaves[3].grad]
    logits = x.double() @ weight.double().T
    chosen = logits.gather(-1, experts)
    assert (chosen.min(-1, keepdim=True).values >= logits.scatter(-1, experts, -torch.inf)).all(), "not top k"
    args = (x_experts, x, weight, a, b, experts, dy, 2.0, rescale)
    want = list(_routed_reference(*args, absolute=False))
    bound = list(_routed_reference(*args, absolute=True))
    if shared:
        want[1], want[2] = want[1] + want[2], torch.zeros_like(want[2])
        bound[1], bound[2] = bound[1] + bound[2], torch.zeros_like(bound[2])
    n, u = IN + OUT + rank * top_k + tokens + 4 * top_k + 10, 2.0**-24
    names = ("y", "dx", "dx_router", "router dW", "dA", "dB")
    for name, g, w, m in zip(names, got, want, bound):
        if name in ("dx_router", "router dW") and (top_k == 1 or shared and name == "dx_router"):
            assert not g.any(), f"{name}: a renormalised top-1 gate is 1 whatever the logits"
            continue
        assert w.abs().max() > 0, f"{name}: zero reference, the test would not bite"
        ratio = ((g.double() - w).abs() / (n * u * m).clamp_min(1e-300)).max()
        assert ratio <= 2, f"{name}: off by {ratio:.2f} n u of the absolute sums"


def test_routed_path_counts_the_same_load():
    """The layer's load statistics from the fused path (fp32 on CPU: the selection's counts) equal the dense
    path's (the gates' non-zeros): the same fp32 logits, so the same selection."""
    dense, sparse = make_pair(16, 2, 3, rescale=True, dtype=torch.float32)
    x, dy = _inputs(64, dtype=torch.float32)
    for layer in (dense, sparse):
        run(layer, x, dy)
    assert sparse.sparse and routed_fits(x)
    assert torch.equal(sparse.expert_load, dense.expert_load)
    assert torch.equal(sparse.pop_routed_slots(), dense.pop_routed_slots())


@pytest.mark.parametrize("separate", [False, True])
def test_routed_path_takes_any_layout_and_no_tokens(separate):
    """The fused path on a transposed (non-contiguous) input gives the bits of the same input made contiguous,
    with one x for router and experts and with two (under bf16 autocast the experts read a bf16 copy; dropout
    would too, but its mask depends on the layout); an empty batch gives an empty output and zero gradients."""
    _, layer = make_pair(16, 2, 3, rescale=True, dtype=torch.float32)
    columns = torch.randn(IN, 30)
    results = []
    for x in (columns.T, columns.T.contiguous()):
        assert routed_fits(x)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=separate):
            results.append(run(layer, x, torch.ones(30, OUT)))
        layer.zero_grad()
    (y1, g1), (y2, g2) = results
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    y, grads = run(layer, torch.randn(0, IN), torch.ones(0, OUT))
    assert y.shape == (0, OUT) and all(not g.any() for g in grads[1:])
