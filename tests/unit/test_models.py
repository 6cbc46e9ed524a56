"""Model loading by path: real architectures from small configs, the real configs on the meta device,
one-line errors, and gradient checkpointing with the Riemannian gradient hooks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    CLIPImageProcessor,
    CLIPVisionConfig,
    GlmConfig,
    GlmForCausalLM,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    T5Config,
)

from molora_ds import MoLoRAConfig, apply_molora
from molora_ds.data.vision import LLAVA_CHAT_TEMPLATE
from molora_ds.inject import adapter_state_dict, molora_layers
from molora_ds.models.loading import check_model, load_model, smollm2_tokenizer
from molora_ds.optim import GradientPreconditioner
from molora_ds.recipe import ModelConfig

CONFIGS = Path(__file__).resolve().parents[2] / "molora_ds" / "models" / "configs"


def tiny_glm(vocab_size: int) -> GlmForCausalLM:
    """GLM-4's layout (fused gate_up_proj, partial rotary, q/k/v bias) at hidden 64, 2 layers."""
    return GlmForCausalLM(
        GlmConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
            pad_token_id=0, eos_token_id=0, bos_token_id=None,
        )
    )  # fmt: skip


def tiny_llava(vocab_size: int) -> LlavaForConditionalGeneration:
    """A small CLIP tower (32x32 images, 8x8 patches) and a small Llama; image token = the last id."""
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=32,
    )  # fmt: skip
    return LlavaForConditionalGeneration(
        LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab_size - 1)
    )


def tiny_llava_processor() -> LlavaProcessor:
    """The tiny LLaVA's processor: CLIP's image processor at 32 px and SmolLM2's tokenizer with an added
    ``<image>`` token (id 49152, so the model's vocabulary is 49,153); 16 image tokens per image
    (4 x 4 patches of 8 px; the CLS feature is dropped, as LLaVA's "default" strategy does), and
    LLaVA-1.5's chat template."""
    tokenizer = smollm2_tokenizer()
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
    )  # fmt: skip


def save_tiny(kind: str, folder: Path) -> Path:
    """A tiny model of ``kind`` with SmolLM2's tokenizer (LLaVA: and its processor), written as a
    user's model folder."""
    processor = tiny_llava_processor() if kind == "llava" else None
    tokenizer = processor.tokenizer if processor else smollm2_tokenizer()
    torch.manual_seed(0)
    model = {"glm": tiny_glm, "llava": tiny_llava}[kind](len(tokenizer))
    model.save_pretrained(folder)
    (processor or tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["glm", "llava"])
def tiny_folder(request, tmp_path_factory):
    return request.param, save_tiny(request.param, tmp_path_factory.mktemp(request.param))


def test_path_api_loads_the_family_class_and_targets_the_language_model_qv(tiny_folder):
    kind, folder = tiny_folder
    model, tokenizer = load_model(ModelConfig(name_or_path=str(folder)))
    assert type(model) is {"glm": GlmForCausalLM, "llava": LlavaForConditionalGeneration}[kind]
    assert len(tokenizer) == model.config.get_text_config().vocab_size
    names = apply_molora(model, MoLoRAConfig(num_experts=2, rank=2, top_k=2, target_modules=None))
    prefix = "model.language_model.layers" if kind == "llava" else "model.layers"
    assert names == [f"{prefix}.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(model))  # vision tower and projector stay frozen


def _adapter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["glm-4-9b", "llava-1.5-7b", "llama-3.2-1b", "llama-3.2-3b"])
def test_real_configs_adapter_count_on_meta(name):
    config = AutoConfig.from_pretrained(CONFIGS / f"{name}.json")
    cls = LlavaForConditionalGeneration if name.startswith("llava") else AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(config) if cls is AutoModelForCausalLM else cls(config)
    E, r = 20, 4
    apply_molora(model, MoLoRAConfig(num_experts=E, rank=r, top_k=10, target_modules=None))
    # Independently from the config's numbers: q maps hidden -> heads*head_dim, v hidden -> kv_heads*head_dim.
    raw = json.loads((CONFIGS / f"{name}.json").read_text())
    text = raw.get("text_config", raw)
    hidden, heads, kv = text["hidden_size"], text["num_attention_heads"], text["num_key_value_heads"]
    head_dim = text.get("head_dim", hidden // heads)
    per_layer = sum(E * r * (hidden + out) + E * hidden for out in (heads * head_dim, kv * head_dim))
    expected = text["num_hidden_layers"] * per_layer
    assert _adapter_count(model) == expected
    print(f"{name}: {expected:,} adapter parameters")  # GLM-4-9B 46,694,400; LLaVA-1.5-7B 47,185,920


def test_model_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    T5Config(architectures=["T5ForConditionalGeneration"]).save_pretrained(tmp_path / "t5")  # seq2seq
    (tmp_path / "empty").mkdir()
    cases = {
        "someone/some-model": "is not a local folder and cannot be fetched from the Hugging Face hub (HF_HUB_OFFLINE=1)",
        str(tmp_path / "missing"): "does not exist",
        str(tmp_path / "empty"): "has no config.json",
        str(
            tmp_path / "t5"
        ): "model_type 't5' (T5ForConditionalGeneration) is not a model the trainer can train",
    }
    for name, message in cases.items():
        with pytest.raises((ValueError, FileNotFoundError)) as info:
            check_model(ModelConfig(name_or_path=name))
        assert message in str(info.value) and "\n" not in str(info.value), (name, str(info.value))


def _grads(checkpointing: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = tiny_glm(128).double()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    apply_molora(model, MoLoRAConfig(num_experts=4, rank=2, top_k=2, dropout=0.0, target_modules=None))
    with torch.no_grad():  # B starts at 0, which would make A's gradient 0: give it values
        for layer in molora_layers(model).values():
            layer.lora_B.normal_(std=0.1)
    hooks = GradientPreconditioner(model, reg=1e-6)
    forwards = []
    next(iter(molora_layers(model).values())).register_forward_hook(lambda *_: forwards.append(1))
    model.train()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    hooks.remove()
    assert len(forwards) == (2 if checkpointing else 1)  # the checkpointed layer really ran again
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_preconditioned_gradients():
    plain, ckpt = _grads(False), _grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) == 2 * 2 * 3  # 2 layers x q,v x (A, B, router)
    for n in plain:
        # Same operations recomputed in float64: equal up to a few ulps of the largest entry.
        tol = 64 * torch.finfo(torch.float64).eps * plain[n].abs().max().item()
        torch.testing.assert_close(ckpt[n], plain[n], rtol=0, atol=tol, msg=n)
