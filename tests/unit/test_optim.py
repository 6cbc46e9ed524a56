"""One (and two) optimizer steps of every method against the formulas of DESIGN.md section 2, by hand.

The hand computation inverts each expert's r x r matrix separately with ``torch.linalg.inv``
in float64 and writes SGD / AdamW out element-wise; the library solves all experts in one
batched Cholesky and calls torch's optimizers.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

from molora_ds import MoLoRAConfig, apply_molora
from molora_ds.inject import molora_layers
from molora_ds.optim import BASE_METHODS, METHODS, GradientPreconditioner, OptimConfig, build_optimizer
from molora_ds.optim.riemannian import precondition_

DT = torch.float64
REG = 1e-3
EXPERT_LR, GATE_LR = 0.05, 0.2
# each Riemannian method and the same method without preconditioning
PLAIN = {"rsgd": "sgd", "grsgd": "sgd", "radamw": "adamw", "gradamw": "adamw"}


def make_model(gate_rescale: bool, seed: int = 0) -> nn.Module:
    """Two adapted Linear layers, 3 experts of rank 2, top-2, at a generic (non-init) point."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 6, dtype=DT), nn.Tanh(), nn.Linear(6, 5, dtype=DT))
    cfg = MoLoRAConfig(
        num_experts=3,
        rank=2,
        top_k=2,
        alpha=4.0,
        dropout=0.0,
        target_modules=["0", "2"],
        gate_rescale=gate_rescale,
    )
    apply_molora(model, cfg)
    with torch.no_grad():  # B = 0 at init makes grad_A zero and P_A = I / reg: start from a generic point
        for layer in molora_layers(model).values():
            layer.lora_B.normal_(0, 0.5)
            layer.lora_A.normal_(0, 0.5)
            layer.router.weight.normal_(0, 1.0)
    return model


def backward(model: nn.Module, seed: int, loss_scale: float = 1.0) -> None:
    torch.manual_seed(100 + seed)
    x = torch.randn(16, 8, dtype=DT)
    target = torch.randn(16, 5, dtype=DT)
    (loss_scale * (model(x) - target).square().mean()).backward()


def snapshot(model: nn.Module) -> list[dict[str, torch.Tensor]]:
    """Per layer: parameters and gradients before the step."""
    return [
        {
            "A": m.lora_A.detach().clone(),
            "B": m.lora_B.detach().clone(),
            "R": m.router.weight.detach().clone(),
            "gA": m.lora_A.grad.detach().clone(),
            "gB": m.lora_B.grad.detach().clone(),
            "gR": m.router.weight.grad.detach().clone(),
        }
        for m in molora_layers(model).values()
    ]


def hand_precondition(snap: dict[str, torch.Tensor], reg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B_i^T B_i + reg I)^-1 gA_i`` and ``gB_i (A_i A_i^T + reg I)^-1``, one expert at a time."""
    a, b, ga, gb = snap["A"], snap["B"], snap["gA"], snap["gB"]
    eye = torch.eye(a.shape[1], dtype=DT)
    new_ga = torch.stack([torch.linalg.inv(b[i].T @ b[i] + reg * eye) @ ga[i] for i in range(a.shape[0])])
    new_gb = torch.stack([gb[i] @ torch.linalg.inv(a[i] @ a[i].T + reg * eye) for i in range(a.shape[0])])
    return new_ga, new_gb


def router_clip_coef(snaps: list[dict[str, torch.Tensor]], max_norm: float = 1.0) -> float:
    """torch's clip_grad_norm_: one norm over all routers, coefficient max_norm / (norm + 1e-6), at most 1."""
    norm = math.sqrt(sum(s["gR"].square().sum().item() for s in snaps))
    return min(1.0, max_norm / (norm + 1e-6))


class HandAdamW:
    """AdamW written out; ``correct_bias=False`` is the HF/reference variant (eps added to sqrt(v))."""

    def __init__(self, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True):
        self.lr, (self.b1, self.b2), self.eps, self.wd, self.correct_bias = (
            lr,
            betas,
            eps,
            weight_decay,
            correct_bias,
        )
        self.m, self.v = {}, {}

    def step(self, key, p, g, t):
        """Parameter ``p`` after step number ``t`` (1-based) with gradient ``g``."""
        m = self.b1 * self.m.get(key, torch.zeros_like(p)) + (1 - self.b1) * g
        v = self.b2 * self.v.get(key, torch.zeros_like(p)) + (1 - self.b2) * g * g
        self.m[key], self.v[key] = m, v
        p = p * (1 - self.lr * self.wd)
        if self.correct_bias:
            return p - self.lr * (m / (1 - self.b1**t)) / ((v / (1 - self.b2**t)).sqrt() + self.eps)
        return p - self.lr * m / (v.sqrt() + self.eps)


def expected_after_step(method, snaps, adam_experts=None, adam_router=None, t=1, reg=REG):
    """Parameters after step ``t`` of ``method`` (an ``OptimConfig.name``) from the pre-step snapshot."""
    coef = router_clip_coef(snaps)
    out = []
    for li, s in enumerate(snaps):
        ga, gb = hand_precondition(s, reg) if method.startswith(("r", "g")) else (s["gA"], s["gB"])
        gr = s["gR"] * coef
        if "adamw" in method:
            out.append(
                {
                    "A": adam_experts.step(("A", li), s["A"], ga, t),
                    "B": adam_experts.step(("B", li), s["B"], gb, t),
                    "R": adam_router.step(("R", li), s["R"], gr, t),
                }
            )
        else:
            out.append(
                {"A": s["A"] - EXPERT_LR * ga, "B": s["B"] - EXPERT_LR * gb, "R": s["R"] - GATE_LR * gr}
            )
    return out


def assert_params(model, expected, rtol=1e-10, atol=1e-12):
    for layer, want in zip(molora_layers(model).values(), expected, strict=True):
        torch.testing.assert_close(layer.lora_A.detach(), want["A"], rtol=rtol, atol=atol)
        torch.testing.assert_close(layer.lora_B.detach(), want["B"], rtol=rtol, atol=atol)
        torch.testing.assert_close(layer.router.weight.detach(), want["R"], rtol=rtol, atol=atol)


@pytest.mark.parametrize("method", METHODS)
def test_one_step_matches_hand_formula(method):
    model = make_model(gate_rescale=method.startswith("g"))
    opt = build_optimizer(model, method, lr=EXPERT_LR, gate_lr=GATE_LR, reg=REG)
    backward(model, 0, loss_scale=50.0)  # large enough that the router clip is active
    snaps = snapshot(model)
    assert router_clip_coef(snaps) < 0.5
    want = expected_after_step(method, snaps, HandAdamW(EXPERT_LR), HandAdamW(GATE_LR))
    opt.step()
    assert_params(model, want)
    # The preconditioner changes the update: the test would notice a missing or misplaced one.
    if method in PLAIN:
        plain = expected_after_step(PLAIN[method], snaps, HandAdamW(EXPERT_LR), HandAdamW(GATE_LR))
        for key in ("A", "B"):
            assert (plain[0][key] - want[0][key]).abs().max() > 1e-4
    assert opt.grad_norms["router"] == pytest.approx(math.sqrt(sum(s["gR"].square().sum() for s in snaps)))


@pytest.mark.parametrize("base", BASE_METHODS)
def test_gate_rescale_without_preconditioning(base):
    """The paper's ablation (the sqrt(g) backward, plain base update) trains: one step by hand.

    Failed before the explicit switches: build_optimizer(model, "sgd", gate_rescale=True) was a TypeError.
    """
    model = make_model(gate_rescale=True)
    opt = build_optimizer(model, base, gate_rescale=True, lr=EXPERT_LR, gate_lr=GATE_LR, reg=REG)
    assert opt.pairs == []
    backward(model, 0, loss_scale=50.0)
    snaps = snapshot(model)
    want = expected_after_step(f"{base}+sqrt", snaps, HandAdamW(EXPERT_LR), HandAdamW(GATE_LR))
    opt.step()
    assert_params(model, want)
    # The layers did rescale: without it the same point has other expert gradients.
    plain = make_model(gate_rescale=False)
    backward(plain, 0, loss_scale=50.0)
    assert (snapshot(plain)[0]["gA"] - snaps[0]["gA"]).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"method": "sgd"}, "sgd"),
        ({"method": "adamw", "gate_rescale": True}, "adamw+sqrt"),
        ({"method": "sgd", "gate_rescale": True, "precondition": False}, "sgd+sqrt"),
        ({"method": "adamw", "precondition": True}, "radamw"),
        ({"method": "sgd", "precondition": True, "gate_rescale": True}, "grsgd"),
        ({"method": "rsgd"}, "rsgd"),
        ({"method": "gradamw", "precondition": True, "gate_rescale": True}, "gradamw"),
        ({"method": "radamw", "gate_rescale": False}, "radamw"),
    ],
)
def test_switches_resolve_and_round_trip(kwargs, name):
    cfg = OptimConfig(**kwargs)
    assert cfg.name == name
    assert cfg.precondition is cfg.riemannian is name.startswith(("r", "g"))
    assert cfg.gate_rescale is (name.startswith("g") or name.endswith("+sqrt"))
    assert cfg.is_adam is ("adamw" in name)
    assert OptimConfig(**dataclasses.asdict(cfg)) == cfg  # what a saved recipe reloads to


@pytest.mark.parametrize(
    ("method", "switch", "value"),
    [("gradamw", "precondition", False), ("grsgd", "gate_rescale", False), ("rsgd", "gate_rescale", True)],
)
def test_switch_contradicting_the_shorthand_raises(method, switch, value):
    with pytest.raises(
        ValueError, match=f"^{switch}={value} contradicts method='{method}', which sets {switch}="
    ):
        OptimConfig(method=method, **{switch: value})


@pytest.mark.parametrize("method", ["adamw", "radamw", "gradamw"])
@pytest.mark.parametrize("correct_bias", [True, False])
def test_two_adamw_steps_carry_moments(method, correct_bias):
    model = make_model(gate_rescale=method.startswith("g"))
    opt = build_optimizer(
        model,
        method,
        lr=EXPERT_LR,
        gate_lr=GATE_LR,
        reg=REG,
        eps=1e-6,
        betas=(0.8, 0.95),
        correct_bias=correct_bias,
    )
    hand_e = HandAdamW(EXPERT_LR, betas=(0.8, 0.95), correct_bias=correct_bias)
    hand_r = HandAdamW(GATE_LR, betas=(0.8, 0.95), correct_bias=correct_bias)
    for step in (1, 2):
        opt.zero_grad()
        backward(model, step, loss_scale=50.0)
        snaps = snapshot(model)
        want = expected_after_step(method, snaps, hand_e, hand_r, t=step)
        opt.step()
        assert_params(model, want)
    states = [opt.state[p] for p in molora_layers(model)["0"].parameters() if p.requires_grad]
    assert all(int(s["step"]) == 2 for s in states)


def test_without_bias_correction_first_step_is_larger():
    """HF-style AdamW at step 1: m = (1-b1) g, v = (1-b2) g^2: the update is (1-b1)/sqrt(1-b2) (3.16x) torch's."""
    a, b = make_model(False), make_model(False)
    opt_a = build_optimizer(a, "adamw", lr=1e-3, gate_lr=1e-3, eps=1e-12)
    opt_b = build_optimizer(b, "adamw", lr=1e-3, gate_lr=1e-3, eps=1e-12, correct_bias=False)
    for model, opt in ((a, opt_a), (b, opt_b)):
        backward(model, 0)
        before = model[0].lora_B.detach().clone()
        opt.step()
        model.delta = model[0].lora_B.detach() - before
    torch.testing.assert_close(b.delta, a.delta * (0.1 / math.sqrt(0.001)), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("method", ["sgd", "adamw"])
def test_weight_decay_is_decoupled_on_experts_and_off_for_routers(method):
    model = make_model(False)
    opt = build_optimizer(model, method, lr=EXPERT_LR, gate_lr=GATE_LR, weight_decay=0.1)
    backward(model, 0)
    snaps = snapshot(model)
    layer = model[0]
    opt.step()
    s = snaps[0]
    coef = router_clip_coef(snaps)
    if method == "sgd":  # torch SGD: L2 added to the gradient
        want_a = s["A"] - EXPERT_LR * (s["gA"] + 0.1 * s["A"])
        want_r = s["R"] - GATE_LR * coef * s["gR"]
    else:
        want_a = HandAdamW(EXPERT_LR, weight_decay=0.1).step("A", s["A"], s["gA"], 1)
        want_r = HandAdamW(GATE_LR).step("R", s["R"], coef * s["gR"], 1)
    torch.testing.assert_close(layer.lora_A.detach(), want_a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.router.weight.detach(), want_r, rtol=1e-10, atol=1e-12)


def test_router_clipped_globally_experts_never():
    """Two layers' routers share one norm; a huge expert gradient passes through unclipped."""
    model = make_model(False)
    opt = build_optimizer(model, "sgd", lr=EXPERT_LR, gate_lr=GATE_LR)
    backward(model, 0, loss_scale=1e4)
    snaps = snapshot(model)
    per_layer = [s["gR"].norm().item() for s in snaps]
    total = math.sqrt(sum(n * n for n in per_layer))
    assert min(per_layer) > 1.0 and snaps[0]["gB"].norm() > 10.0
    opt.step()
    for layer, s in zip(molora_layers(model).values(), snaps, strict=True):
        # one global coefficient 1 / (total + 1e-6), not one per layer
        torch.testing.assert_close(layer.router.weight.detach(), s["R"] - GATE_LR * s["gR"] / (total + 1e-6))
        torch.testing.assert_close(
            layer.lora_B.detach(), s["B"] - EXPERT_LR * s["gB"], rtol=1e-12, atol=1e-12
        )
    clipped = torch.cat([layer.router.weight.grad.flatten() for layer in molora_layers(model).values()])
    assert clipped.norm().item() == pytest.approx(1.0, rel=1e-5)


def test_small_router_gradient_not_clipped():
    model = make_model(False)
    opt = build_optimizer(model, "sgd", lr=EXPERT_LR, gate_lr=GATE_LR)
    backward(model, 0, loss_scale=1e-3)
    snaps = snapshot(model)
    assert router_clip_coef(snaps) == 1.0
    opt.step()
    for layer, s in zip(molora_layers(model).values(), snaps, strict=True):
        torch.testing.assert_close(
            layer.router.weight.detach(), s["R"] - GATE_LR * s["gR"], rtol=1e-12, atol=1e-15
        )


def test_param_groups_and_defaults():
    model = make_model(True)
    opt = build_optimizer(model)  # gradamw with the paper's defaults
    experts, router = opt.param_groups
    assert (experts["name"], router["name"]) == ("experts", "router")
    assert experts["lr"] == 1e-5 and router["lr"] == 3e-8 and opt.reg == 1e-6
    assert router["max_grad_norm"] == 1.0 and "max_grad_norm" not in experts
    assert opt.defaults["eps"] == 1e-6 and opt.defaults["betas"] == (0.9, 0.999)
    layers = list(molora_layers(model).values())
    assert experts["params"] == [p for m in layers for p in (m.lora_A, m.lora_B)]
    assert router["params"] == [m.router.weight for m in layers]
    assert opt.pairs == [(m.lora_A, m.lora_B) for m in layers]
    assert build_optimizer(make_model(True), precondition_in_step=False).pairs == []
    assert build_optimizer(make_model(True), "grsgd").param_groups[0]["lr"] == 3e-5


@pytest.mark.parametrize("method", ["grsgd", "gradamw"])
def test_g_method_needs_gate_rescale(method):
    with pytest.raises(ValueError, match="needs gate_rescale=True"):
        build_optimizer(make_model(gate_rescale=False), method)


def test_plain_method_on_gate_rescaled_model_raises():
    with pytest.raises(ValueError, match="needs gate_rescale=False"):
        build_optimizer(make_model(gate_rescale=True), "rsgd")
    with pytest.raises(ValueError, match="optimizer 'adamw\\+sqrt' needs gate_rescale=True"):
        build_optimizer(make_model(gate_rescale=False), "adamw", gate_rescale=True)


@pytest.mark.parametrize("method", ["rsgd", "radamw"])
def test_pairs_by_layer_when_a_gradient_is_missing(method):
    """Layer 0's A has no gradient: every other factor is preconditioned with its own layer's A and B.

    Failed before pairing by layer: the filtered list [B0, A1, B1] was paired by position.
    """
    model = make_model(gate_rescale=False)
    opt = build_optimizer(model, method, lr=EXPERT_LR, gate_lr=GATE_LR, reg=REG)
    backward(model, 0, loss_scale=50.0)
    snaps = snapshot(model)
    a0 = model[0].lora_A.detach().clone()
    model[0].lora_A.grad = None
    want = expected_after_step(method, snaps, HandAdamW(EXPERT_LR), HandAdamW(GATE_LR))
    want[0]["A"] = a0  # no gradient: torch's optimizers leave it alone
    opt.step()
    assert_params(model, want)


def test_unknown_method_raises():
    with pytest.raises(ValueError, match=r"unknown optimizer method 'adam'; choose one of \('sgd'"):
        build_optimizer(make_model(False), "adam")


@pytest.mark.parametrize("reg", [0.0, -1e-6])
def test_non_positive_reg_raises(reg):
    with pytest.raises(ValueError, match="reg must be > 0"):
        build_optimizer(make_model(False), "rsgd", reg=reg)


def test_model_without_adapters_raises():
    with pytest.raises(ValueError, match="call apply_molora"):
        build_optimizer(nn.Linear(3, 3), "sgd")


def test_gradient_hooks_equal_in_step_preconditioning_with_accumulation():
    """Hooks precondition each micro-batch's gradient; the optimizer preconditions the sum. Equal by linearity."""
    in_step = make_model(True)
    hooked = copy.deepcopy(in_step)
    raw = copy.deepcopy(in_step)
    opt_in_step = build_optimizer(in_step, "grsgd", lr=EXPERT_LR, gate_lr=GATE_LR, reg=REG)
    preconditioner = GradientPreconditioner(hooked, reg=REG)
    opt_hooked = build_optimizer(
        hooked, "grsgd", lr=EXPERT_LR, gate_lr=GATE_LR, reg=REG, precondition_in_step=False
    )
    for micro in (0, 1):
        for model in (in_step, hooked, raw):
            backward(model, micro)

    # hooked grads == precondition_(accumulated raw grads) == per-expert inverse by hand
    for name, layer in molora_layers(raw).items():
        snap = snapshot(raw)[list(molora_layers(raw)).index(name)]
        want_a, want_b = hand_precondition(snap, REG)
        precondition_(layer.lora_A, layer.lora_B, REG)
        h = molora_layers(hooked)[name]
        torch.testing.assert_close(layer.lora_A.grad, want_a, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.lora_B.grad, want_b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(h.lora_A.grad, want_a, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(h.lora_B.grad, want_b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(h.router.weight.grad, layer.router.weight.grad, rtol=0, atol=0)

    opt_in_step.step()
    opt_hooked.step()
    preconditioner.new_step()  # as the trainer does after every optimizer step
    assert not preconditioner.failed()
    for a, b in zip(in_step.parameters(), hooked.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

    # the hooks follow the parameters after new_step(), and come off on remove()
    opt_hooked.zero_grad()
    backward(hooked, 2)
    snap = snapshot(hooked)  # grads already preconditioned, params are post-step
    preconditioner.remove()
    opt_hooked.zero_grad()
    backward(hooked, 2)
    raw_snap = snapshot(hooked)
    for s, r in zip(snap, raw_snap, strict=True):
        want_a, want_b = hand_precondition(r, REG)
        torch.testing.assert_close(s["gA"], want_a, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(s["gB"], want_b, rtol=1e-10, atol=1e-12)
        assert (r["gB"] - want_b).abs().max() > 1e-6
