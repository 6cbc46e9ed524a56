"""apply_molora on real transformers architectures built from tiny configs (no downloads)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    CLIPVisionConfig,
    GlmConfig,
    GlmForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from molora_ds import MoLoRAConfig, MoLoRALinear, apply_molora, load_adapter, save_adapter
from molora_ds.inject import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DEFAULT_TARGETS,
    adapter_state_dict,
    molora_layers,
)
from molora_ds.modules import Router
from molora_ds.optim import build_optimizer

VOCAB = 64
IMAGE_TOKEN = VOCAB - 1
DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
    pad_token_id=0,
)
ADAPTER_SUFFIXES = (".lora_A", ".lora_B", ".router.weight")


def tiny_llama(num_layers: int = 2) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(**{**DECODER, "num_hidden_layers": num_layers}))


def tiny_llava() -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=8,
        patch_size=4,
    )
    # vision_feature_layer=-1: with -2 (LLaVA-1.5's choice) the last CLIP layer's output is unused,
    # so adapters there could never receive a gradient.
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**DECODER),
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-1,
    )
    return LlavaForConditionalGeneration(cfg)


def tiny_bert() -> BertForSequenceClassification:
    return BertForSequenceClassification(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=32,
            num_labels=3,
        )
    )


BUILDERS = {
    "llama": tiny_llama,
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**DECODER)),
    "glm": lambda: GlmForCausalLM(GlmConfig(**DECODER)),
    "llava": tiny_llava,
    "bert": tiny_bert,
}


def batch(model: nn.Module) -> dict[str, torch.Tensor]:
    torch.manual_seed(7)
    model_type = model.config.model_type
    if model_type == "bert":
        return {"input_ids": torch.randint(1, VOCAB, (2, 6)), "labels": torch.tensor([0, 2])}
    ids = torch.randint(1, IMAGE_TOKEN, (2, 8))
    if model_type == "llava":
        ids[:, 1:5] = IMAGE_TOKEN  # (8 / 4)^2 = 4 patch features per image, CLS dropped
        return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 8, 8), "labels": ids}
    return {"input_ids": ids, "labels": ids}


def expected_targets(model: nn.Module, suffixes: tuple[str, ...], within: str = "") -> list[str]:
    """Linear layers whose last name component is one of ``suffixes`` (and whose name contains ``within``)."""
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in suffixes and within in n
    ]


def perturb_adapters(model: nn.Module) -> None:
    """B = 0 at init gives zero gradients to A and the router: make every adapter tensor live."""
    with torch.no_grad():
        for layer in molora_layers(model).values():
            layer.lora_B.normal_(0, 0.1)


def check_trains(model: nn.Module, expected: list[str]) -> None:
    assert sorted(molora_layers(model)) == sorted(expected)
    perturb_adapters(model)
    model(**batch(model)).loss.backward()
    for name, p in model.named_parameters():
        if name.endswith(ADAPTER_SUFFIXES):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    n_adapter = sum(1 for n, _ in model.named_parameters() if n.endswith(ADAPTER_SUFFIXES))
    assert n_adapter == 3 * len(expected)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "glm", "bert"])
def test_default_targets_train_only_adapters(model_type):
    torch.manual_seed(0)
    model = BUILDERS[model_type]()
    assert model.config.model_type == model_type
    expected = expected_targets(model, tuple(DEFAULT_TARGETS[model_type]))
    assert len(expected) == 4  # two layers, two projections
    replaced = apply_molora(model, MoLoRAConfig(num_experts=4, rank=2, top_k=2, dropout=0.0))
    assert sorted(replaced) == sorted(expected)
    check_trains(model, expected)


@pytest.mark.parametrize("include_vision", [False, True])
def test_llava_language_model_by_default_vision_on_request(include_vision):
    torch.manual_seed(0)
    model = tiny_llava()
    expected = expected_targets(model, ("q_proj", "v_proj"), "language_model")
    vision = expected_targets(model, ("q_proj", "v_proj"), "vision_tower")
    assert len(expected) == 4 and len(vision) == 4
    if include_vision:
        expected += vision
    cfg = MoLoRAConfig(num_experts=4, rank=2, top_k=2, dropout=0.0, include_vision=include_vision)
    apply_molora(model, cfg)
    check_trains(model, expected)
    projector = model.model.multi_modal_projector
    assert isinstance(projector.linear_1, nn.Linear) and not projector.linear_1.weight.requires_grad


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        # exact name
        (["model.layers.0.self_attn.q_proj"], ["model.layers.0.self_attn.q_proj"]),
        # dotted suffix, one or several
        (["self_attn.o_proj"], [f"model.layers.{i}.self_attn.o_proj" for i in (0, 1)]),
        (
            ["up_proj", "k_proj"],
            [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.k_proj", "mlp.up_proj")],
        ),
        # regex over the full name
        (r"model\.layers\.1\.mlp\..*_proj", [f"model.layers.1.mlp.{m}_proj" for m in ("gate", "up", "down")]),
        (r".*\.[qk]_proj", [f"model.layers.{i}.self_attn.{m}_proj" for i in (0, 1) for m in "qk"]),
    ],
)
def test_target_matching(targets, expected):
    model = tiny_llama()
    replaced = apply_molora(model, MoLoRAConfig(num_experts=2, rank=2, top_k=1, target_modules=targets))
    assert sorted(replaced) == sorted(expected)
    assert sorted(molora_layers(model)) == sorted(expected)


@pytest.mark.parametrize(
    "targets",
    [
        ["proj"],  # a suffix matches whole dotted components only: not "q_proj"
        ["layers.0.self_attn.q"],
        "q_proj",  # a string is a regex over the full name, so this needs ".*q_proj"
        ["nonexistent"],
    ],
)
def test_no_match_raises_before_modifying(targets):
    model = tiny_llama()
    before = {n: (p.requires_grad, p.clone()) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="matched no module; Linear layers include"):
        apply_molora(model, MoLoRAConfig(num_experts=2, rank=2, top_k=1, target_modules=targets))
    assert_untouched(model, before)


@pytest.mark.parametrize("targets", [["self_attn"], ["embed_tokens"], r".*layers\.0\..*"])
def test_non_linear_target_raises_before_modifying(targets):
    model = tiny_llama()
    before = {n: (p.requires_grad, p.clone()) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="matched non-Linear modules .*; narrow the targets"):
        apply_molora(model, MoLoRAConfig(num_experts=2, rank=2, top_k=1, target_modules=targets))
    assert_untouched(model, before)


def assert_untouched(model: nn.Module, before: dict) -> None:
    assert not molora_layers(model)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for n, (requires_grad, value) in before.items():
        assert after[n].requires_grad == requires_grad and torch.equal(after[n], value), n


def test_unknown_model_type_needs_explicit_targets():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no default MoLoRA targets for model_type=None; set target_modules"):
        apply_molora(model, MoLoRAConfig(num_experts=2, rank=2, top_k=1))


def test_layer_experts_per_quarter():
    model = tiny_llama(num_layers=8)
    cfg = MoLoRAConfig(rank=2, top_k=2, layer_experts=[2, 4, 6, 8], target_modules=["q_proj", "v_proj"])
    apply_molora(model, cfg)
    layers = molora_layers(model)
    assert len(layers) == 16
    for i, count in enumerate([2, 2, 4, 4, 6, 6, 8, 8]):
        for proj in ("q_proj", "v_proj"):
            layer = layers[f"model.layers.{i}.self_attn.{proj}"]
            assert layer.num_experts == count
            assert layer.lora_A.shape[0] == layer.lora_B.shape[0] == layer.router.weight.shape[0] == count


def test_layer_experts_needs_numbered_layers():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="layer_experts needs numbered layers"):
        apply_molora(model, MoLoRAConfig(top_k=1, layer_experts=[2, 4], target_modules=["0"]))


# ---------------------------------------------------------------------------------------------
# adapter files

ROUND_TRIP_CFG = MoLoRAConfig(num_experts=4, rank=2, top_k=2, alpha=8.0, dropout=0.1)


def trained_llama(cfg: MoLoRAConfig = ROUND_TRIP_CFG) -> LlamaForCausalLM:
    """Seeded base, adapters injected, two steps so that B, A and the router all left their init.

    (Step 1 only moves B: with B = 0, A and the router get zero gradients.)
    """
    torch.manual_seed(0)
    model = tiny_llama()
    apply_molora(model, cfg)
    init = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    opt = build_optimizer(model, "gradamw", lr=1e-2, gate_lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(**batch(model)).loss.backward()
        opt.step()
    for k, v in adapter_state_dict(model).items():
        assert not torch.equal(v, init[k]), k
    return model.eval()


def fresh_llama(num_layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)  # same base weights as trained_llama
    return tiny_llama(num_layers).eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch(model)["input_ids"]).logits


def test_adapter_round_trip_reproduces_outputs(tmp_path):
    model = trained_llama()
    save_adapter(tmp_path, adapter_state_dict(model), ROUND_TRIP_CFG)
    assert (tmp_path / ADAPTER_WEIGHTS).is_file()
    assert json.loads((tmp_path / ADAPTER_CONFIG).read_text()) == ROUND_TRIP_CFG.to_dict()

    fresh = fresh_llama()
    base_logits = logits(fresh)
    assert not torch.allclose(base_logits, logits(model))
    cfg = load_adapter(fresh, tmp_path)
    assert cfg == ROUND_TRIP_CFG
    assert sorted(molora_layers(fresh)) == sorted(molora_layers(model))
    loaded, saved = adapter_state_dict(fresh), adapter_state_dict(model)
    assert loaded.keys() == saved.keys()
    assert any(k.endswith(".router.weight") for k in loaded)
    for k in saved:
        assert torch.equal(loaded[k], saved[k]), k
    assert torch.equal(logits(fresh.eval()), logits(model))
    # only adapters are trainable after loading
    trainable = [n for n, p in fresh.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(ADAPTER_SUFFIXES) for n in trainable)


def test_load_into_model_already_injected_with_same_config(tmp_path):
    model = trained_llama()
    save_adapter(tmp_path, adapter_state_dict(model), ROUND_TRIP_CFG)
    fresh = fresh_llama()
    apply_molora(fresh, ROUND_TRIP_CFG)
    load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh.eval()), logits(model))


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_experts", 5), ("rank", 3), ("top_k", 3), ("alpha", 16.0), ("gate_rescale", False)],
)
def test_load_adapter_into_layers_of_another_config_raises(tmp_path, field, value):
    """The file says ROUND_TRIP_CFG; the model was injected with one field changed.

    Failed before: top_k, alpha and gate_rescale loaded silently (the shapes agree), rank and
    num_experts raised a shape mismatch that named neither field.
    """
    model = trained_llama()
    save_adapter(tmp_path, adapter_state_dict(model), ROUND_TRIP_CFG)
    fresh = fresh_llama()
    apply_molora(fresh, dataclasses.replace(ROUND_TRIP_CFG, **{field: value}))
    want = ROUND_TRIP_CFG.to_dict()[field]
    layer = "model.layers.0.self_attn.q_proj"
    with pytest.raises(
        ValueError,
        match=re.escape(f"has {field}={want}, but the model's layer {layer} has {field}={value}: load it"),
    ):
        load_adapter(fresh, tmp_path)


def test_load_adapter_with_inconsistent_config_file_raises(tmp_path):
    """The weights say rank 2, the JSON says rank 3: the injected layers cannot hold the weights."""
    model = trained_llama()
    save_adapter(tmp_path, adapter_state_dict(model), ROUND_TRIP_CFG)
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({**ROUND_TRIP_CFG.to_dict(), "rank": 3}))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_adapter(fresh_llama(), tmp_path)


def test_load_adapter_with_other_targets_raises(tmp_path):
    model = trained_llama()
    save_adapter(tmp_path, adapter_state_dict(model), ROUND_TRIP_CFG)
    fresh = fresh_llama()
    apply_molora(fresh, MoLoRAConfig(num_experts=4, rank=2, top_k=2, target_modules=["q_proj", "k_proj"]))
    missing = re.escape("missing ['model.layers.0.self_attn.k_proj.lora_A'")
    unexpected = re.escape("unexpected ['model.layers.0.self_attn.v_proj.lora_A'")
    with pytest.raises(ValueError, match=f"does not fit this model: {missing}.*{unexpected}"):
        load_adapter(fresh, tmp_path)


def test_load_adapter_into_other_architecture_raises(tmp_path):
    model = trained_llama()
    save_adapter(tmp_path, adapter_state_dict(model), ROUND_TRIP_CFG)
    with pytest.raises(ValueError, match="does not fit this model"):
        load_adapter(fresh_llama(num_layers=3), tmp_path)


def test_load_adapter_missing_folder_or_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="is .* an adapter folder written by save_adapter"):
        load_adapter(fresh_llama(), tmp_path / "nowhere")
    model = trained_llama()
    save_adapter(tmp_path, adapter_state_dict(model), ROUND_TRIP_CFG)
    (tmp_path / ADAPTER_CONFIG).unlink()
    with pytest.raises(FileNotFoundError, match=ADAPTER_CONFIG):
        load_adapter(fresh_llama(), tmp_path)


def test_adapter_state_dict_holds_only_adapters():
    model = trained_llama()
    state = adapter_state_dict(model)
    assert len(state) == 3 * 4
    assert all(k.endswith(ADAPTER_SUFFIXES) for k in state)
    assert all(isinstance(m, MoLoRALinear) for m in molora_layers(model).values())


def test_peft_all_linear_does_not_wrap_the_router():
    """PEFT's "all-linear" picks modules by ``isinstance(m, nn.Linear)``: the router returns a tuple and
    must not be one. Failed before: Router subclassed nn.Linear and PEFT wrapped every router."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    model = tiny_llama()
    apply_molora(model, MoLoRAConfig(num_experts=4, rank=2, top_k=2, target_modules=["q_proj"]))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    wrapped = [n for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    assert any(n.endswith("k_proj") for n in wrapped)
    assert [n for n in wrapped if "router" in n] == []
    assert all(isinstance(m.router, Router) for m in molora_layers(peft_model).values())
    peft_model(**batch(peft_model)).loss.backward()  # and the model still runs
