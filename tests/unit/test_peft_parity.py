"""With one expert and top-1 routing, MoLoRA is plain LoRA: compare with PEFT, layer and optimizer.

Layer: E=1, k=1 gives g = 1 for every token (a softmax over one expert), so
``y = W x + (alpha / r) B A x`` exactly as PEFT's ``LoraLayer`` (``use_rslora=False``), in both
gate modes (sqrt(1) = 1). Weights map as ``lora_A [1, r, in] <-> lora_A.default.weight [r, in]``
and ``lora_B [1, out, r] <-> lora_B.default.weight [out, r]``.

Optimizer: ``peft.optimizers.create_riemannian_optimizer(model, optimizer_cls, lr=, reg=)``
(peft 0.21). Compared with our ``rsgd`` / ``radamw``, read from its source:

- Same formulas: ``g_A <- (B^T B + reg I)^-1 g_A``, ``g_B <- g_B (A A^T + reg I)^-1``; reg is added
  to the r x r Gram matrix in both, the LoRA scaling s only enters through the gradients.
- Same point: both use A and B from *before* the step for both preconditioners (PEFT preconditions
  all gradients, then calls the base ``step``).
- Numerics differ: PEFT inverts with ``torch.linalg.pinv`` in ``promote_types(param dtype, fp32)``;
  we use a Cholesky inverse in float64. Identical up to rounding for reg > 0 (SPD matrices): the
  float64 tests below agree to 1e-10, the fp32 one to fp32 rounding.
- Defaults differ: PEFT ``reg=1e-2``, ours ``1e-6``; PEFT + ``torch.optim.AdamW`` has
  ``weight_decay=0.01``, ours 0. The tests pass reg and weight_decay explicitly.
- Groups differ: PEFT puts every trainable parameter in one group with one lr; we add a router
  group (own lr, grad-norm clip 1.0). With E=1 the router gradient is exactly 0 (the softmax
  over one expert is constant), so the router never moves and A, B are compared.
- Base optimizers coincide: PEFT + ``torch.optim.SGD`` is our ``rsgd`` (momentum 0), PEFT +
  ``torch.optim.AdamW`` our ``radamw`` (bias-corrected; our ``correct_bias=False`` has no PEFT analogue).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_riemannian_optimizer
from torch import nn
from transformers import LlamaForCausalLM

from molora_ds import MoLoRAConfig, apply_molora
from molora_ds.inject import molora_layers
from molora_ds.models import loading
from molora_ds.optim import build_optimizer

RANK, ALPHA = 4, 8.0
TARGETS = ["q_proj", "v_proj"]


class TwoProjections(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(12, 10)
        self.v_proj = nn.Linear(10, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v_proj(torch.tanh(self.q_proj(x)))


def tiny_llama() -> LlamaForCausalLM:
    return loading.tiny_llama(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1
    )


def make_pair(builder, dtype=torch.float64, gate_rescale=False):
    """(ours, peft) on identical base weights with identical random A and B (B != 0)."""
    torch.manual_seed(0)
    base = builder().to(dtype)
    ours = copy.deepcopy(base)
    peft_model = get_peft_model(
        base, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS)
    )
    cfg = MoLoRAConfig(
        num_experts=1,
        rank=RANK,
        top_k=1,
        alpha=ALPHA,
        dropout=0.0,
        target_modules=TARGETS,
        gate_rescale=gate_rescale,
    )
    apply_molora(ours, cfg)
    layers = molora_layers(ours)
    assert len(layers) == (2 if builder is TwoProjections else 4)
    with torch.no_grad():
        for name, layer in layers.items():
            lora = peft_model.base_model.model.get_submodule(name)
            assert lora.scaling["default"] == layer.scaling == ALPHA / RANK
            lora.lora_A["default"].weight.normal_(0, 0.3)
            lora.lora_B["default"].weight.normal_(0, 0.3)
            layer.lora_A.copy_(lora.lora_A["default"].weight.unsqueeze(0))
            layer.lora_B.copy_(lora.lora_B["default"].weight.unsqueeze(0))
    return ours, peft_model


def loss_of(model, builder, dtype=torch.float64):
    torch.manual_seed(1)
    if builder is TwoProjections:
        out = model(torch.randn(3, 5, 12, dtype=dtype))
        return out.square().sum(), out
    ids = torch.randint(1, 64, (2, 7))
    out = model(input_ids=ids, labels=ids)
    return out.loss, out.logits


def pairs(ours, peft_model):
    """(our layer, PEFT's lora_A weight, PEFT's lora_B weight) per adapted module."""
    for name, layer in molora_layers(ours).items():
        lora = peft_model.base_model.model.get_submodule(name)
        yield layer, lora.lora_A["default"].weight, lora.lora_B["default"].weight


@pytest.mark.parametrize("gate_rescale", [False, True])
@pytest.mark.parametrize("builder", [TwoProjections, tiny_llama])
def test_single_expert_equals_peft_lora(builder, gate_rescale):
    ours, peft_model = make_pair(builder, gate_rescale=gate_rescale)
    loss, out = loss_of(ours, builder)
    peft_loss, peft_out = loss_of(peft_model, builder)
    torch.testing.assert_close(out, peft_out, rtol=1e-12, atol=1e-12)
    loss.backward()
    peft_loss.backward()
    for layer, a, b in pairs(ours, peft_model):
        torch.testing.assert_close(layer.lora_A.grad[0], a.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.lora_B.grad[0], b.grad, rtol=1e-10, atol=1e-12)
        assert b.grad.abs().max() > 1e-4
        assert torch.count_nonzero(layer.router.weight.grad) == 0


def step_both(builder, ours_method, peft_cls, reg, steps=1, dtype=torch.float64, **peft_kwargs):
    """Step our optimizer and PEFT's on twin models; per layer (ours, peft A, peft B, A before, B before)."""
    ours, peft_model = make_pair(builder, dtype=dtype)
    lr = 0.05 if ours_method == "rsgd" else 1e-2
    opt = build_optimizer(ours, ours_method, lr=lr, gate_lr=0.1, reg=reg)
    peft_opt = create_riemannian_optimizer(peft_model, peft_cls, lr=lr, reg=reg, **peft_kwargs)
    before = [
        (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
        for layer, _, _ in pairs(ours, peft_model)
    ]
    routers = [layer.router.weight.detach().clone() for layer, _, _ in pairs(ours, peft_model)]
    for _ in range(steps):
        for model, o in ((ours, opt), (peft_model, peft_opt)):
            o.zero_grad()
            loss_of(model, builder, dtype)[0].backward()
            o.step()
    out = []
    for (layer, a, b), (a0, b0), r0 in zip(pairs(ours, peft_model), before, routers, strict=True):
        assert torch.equal(layer.router.weight, r0)  # zero gradient: E=1 has nothing to route
        out.append((layer, a, b, a0, b0))
    return out


@pytest.mark.parametrize("reg", [1e-2, 1e-6])
@pytest.mark.parametrize("builder", [TwoProjections, tiny_llama])
def test_rsgd_step_equals_peft_riemannian_sgd(builder, reg):
    for layer, a, b, a0, b0 in step_both(builder, "rsgd", torch.optim.SGD, reg):
        torch.testing.assert_close(layer.lora_A.detach()[0], a.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.lora_B.detach()[0], b.detach(), rtol=1e-10, atol=1e-12)
        assert (a.detach() - a0[0]).abs().max() > 1e-6 and (b.detach() - b0[0]).abs().max() > 1e-6


def test_radamw_two_steps_equal_peft_riemannian_adamw():
    steps = step_both(
        TwoProjections,
        "radamw",
        torch.optim.AdamW,
        1e-2,
        steps=2,
        betas=(0.9, 0.999),
        eps=1e-6,
        weight_decay=0.0,
    )
    for layer, a, b, _, _ in steps:
        torch.testing.assert_close(layer.lora_A.detach()[0], a.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.lora_B.detach()[0], b.detach(), rtol=1e-10, atol=1e-12)


def test_rsgd_float32_agrees_to_float32_rounding():
    """PEFT inverts in fp32 for fp32 parameters, we in float64: the updates agree to fp32 precision."""
    for layer, a, b, a0, b0 in step_both(TwoProjections, "rsgd", torch.optim.SGD, 1e-2, dtype=torch.float32):
        for ours, theirs, start in ((layer.lora_A[0], a, a0[0]), (layer.lora_B[0], b, b0[0])):
            delta_ours, delta_peft = ours.detach() - start, theirs.detach() - start
            assert (delta_ours - delta_peft).norm() < 1e-4 * delta_peft.norm()
