"""The memory planner: exact parameter counts, hand-computed byte budgets, the activation formula
against what autograd really saves, and the ``--dry-run`` command line."""

from __future__ import annotations

import json
import sys
import weakref
from pathlib import Path

import pytest
import torch

from molora_ds import MoLoRAConfig, apply_molora
from molora_ds.inject import molora_layers
from molora_ds.models.loading import tiny_llama
from molora_ds.plan import (
    GIB,
    activation_bytes,
    count_params,
    memory_plan,
    meta_model,
    model_config,
    parse_size,
    vision_activation_bytes,
)
from molora_ds.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "launch"))
import train as launch_train  # noqa: E402

GLM_RECIPE = ROOT / "recipes" / "glm4_9b_qa.yaml"


def test_glm_counts_match_the_architecture_by_hand():
    recipe = load_recipe(GLM_RECIPE)
    model = meta_model(model_config("glm-4-9b"))
    apply_molora(model, recipe.molora)
    p = count_params(model, persistence_threshold=0)
    h, kv, f, vocab, layers = 4096, 2 * 128, 13696, 151552, 40
    # q, k, v carry biases; gate_up is fused; two RMSNorms per layer; untied embeddings and head.
    per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + h * 2 * f + f * h + 2 * h
    assert p.base == 2 * vocab * h + layers * per_layer + h
    e, r = 20, 4
    assert p.adapter == layers * e * r * ((h + h) + 2 * (h + kv))  # A [E, r, in] + B [E, out, r]
    assert p.router == layers * 3 * e * h
    assert p.largest == vocab * h


def test_meta_counts_equal_a_real_model():
    cfg = MoLoRAConfig(num_experts=4, rank=2, top_k=2, target_modules=["q_proj", "v_proj"])
    real = tiny_llama()
    apply_molora(real, cfg)
    meta = meta_model(model_config("tiny-llama"))
    apply_molora(meta, cfg)
    assert meta.lm_head.weight.is_meta
    trainable = sum(p.numel() for p in real.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in real.parameters() if not p.requires_grad)
    p = count_params(meta, persistence_threshold=0)
    assert (p.base, p.trainable) == (frozen, trainable)


def test_zero2_and_zero3_budgets_by_hand():
    recipe = load_recipe(GLM_RECIPE)
    zero = {"reduce_bucket_size": 1000, "contiguous_gradients": True}
    model = meta_model(model_config("glm-4-9b"))
    apply_molora(model, recipe.molora)
    p = count_params(model, persistence_threshold=0)
    w = 8
    z2 = memory_plan(
        recipe, {"zero_optimization": {"stage": 2} | zero}, w, 10, 256, True, 80 * GIB, model=model
    )
    parts = z2.per_gpu_bytes
    assert parts["base_weights"] == 2 * p.base
    assert parts["adapter_weights"] == 2 * p.trainable
    assert parts["gradients"] == int(2 * p.trainable / w + 4 * p.trainable / w)  # bf16 shard + fp32 flat
    assert parts["reduce_bucket"] == 2 * 1000  # one bf16 bucket (overlap_comm is off under ZeRO-2)
    assert parts["optimizer_state"] == int(12 * p.trainable / w)  # fp32 master + 2 Adam moments
    e, r = 20, 4
    inverses = 40 * 3 * 2 * 8 * e * r * r
    scratch = 8 * e * r * (4096 + 4096 + 256)  # float64 A [E, r, 4096], B [E, 4096, r] and [E, 256, r]
    assert parts["preconditioner"] == inverses + scratch + 4 * e * r * 4096
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")

    ds3 = {
        "zero_optimization": {"stage": 3, "param_persistence_threshold": 0, "prefetch_bucket_size": 0} | zero
    }
    z3 = memory_plan(recipe, ds3, w, 10, 256, True, 80 * GIB, model=model)
    assert z3.per_gpu_bytes["base_weights"] == int(2 * (p.base / w + p.largest))
    assert z3.per_gpu_bytes["adapter_weights"] == int(2 * p.trainable / w)
    # DeepSpeed's ZeRO-2 formula: 2 bytes per parameter + 18 per parameter over the GPUs, all trained.
    total = p.base + p.trainable
    assert z2.deepspeed_estimate_bytes == 2 * total + int(18 * total / w)
    assert z2.deepspeed_estimate_bytes > 1.9 * (parts["total"] - parts["activations"])


def test_expert_parallel_budgets_by_hand():
    """EP=2 (E=20: 10 experts per rank): each rank stores the routers and half the experts; ZeRO-2 partitions
    gradients and optimizer state as without EP (E/ep experts over w/ep ranks: the same share); the
    preconditioner's inverses and scratch halve; weight gather's running layer adds its gathered A, B and B copy."""
    recipe = load_recipe(GLM_RECIPE, ["molora.expert_parallel_size=2"])
    zero = {"reduce_bucket_size": 1000, "contiguous_gradients": True}
    model = meta_model(model_config("glm-4-9b"))
    apply_molora(model, recipe.molora)
    p = count_params(model, persistence_threshold=0)
    layers = list(molora_layers(model).values())
    w, stored = 8, p.router + p.adapter / 2
    z2 = memory_plan(
        recipe, {"zero_optimization": {"stage": 2} | zero}, w, 10, 256, True, 80 * GIB, model=model
    )
    parts = z2.per_gpu_bytes
    assert parts["adapter_weights"] == int(2 * stored)
    assert parts["gradients"] == int(2 * p.trainable / w + 4 * p.trainable / w)
    assert parts["optimizer_state"] == int(12 * p.trainable / w)
    e, r = 20, 4
    inverses = 40 * 3 * 2 * 8 * e * r * r
    scratch = 8 * e * r * (4096 + 4096 + 256)
    assert parts["preconditioner"] == int((inverses + scratch + 4 * e * r * 4096) / 2)
    b_copies = 2 * sum(m.lora_B.numel() for m in layers) / 2
    q = e * r * 4096  # q_proj: A [E, r, 4096] and B [E, 4096, r], the largest layer
    assert parts["adapter_forward_copies"] == int(b_copies + 2 * (q + 2 * q))
    z0 = memory_plan(recipe, {"zero_optimization": {"stage": 0}}, w, 10, 256, False, 80 * GIB, model=model)
    parts = z0.per_gpu_bytes  # fp32 ZeRO-0: nothing partitioned, the weights are the AdamW master
    assert parts["adapter_weights"] == parts["gradients"] == int(4 * stored)
    assert parts["optimizer_state"] == int(8 * stored)


def test_host_memory_per_node_by_hand():
    """Host bytes per node: ZeRO-2 with offload_optimizer holds the offloaded state and DeepSpeed's
    staging buffers per rank, or the whole base per rank while loading (float32, the recipe's
    default load dtype), whichever is larger; ZeRO-3 loads on rank 0 only."""
    recipe = load_recipe(GLM_RECIPE)
    model = meta_model(model_config("glm-4-9b"))
    apply_molora(model, recipe.molora)
    p = count_params(model, persistence_threshold=0)
    offload = {"offload_optimizer": {"device": "cpu", "pin_memory": True}}
    w, micro = 16, 5  # 80 / 16 = 5 per rank: no gradient accumulation
    z2 = memory_plan(
        recipe, {"zero_optimization": {"stage": 2} | offload}, w, micro, 256, True, 80 * GIB, model=model
    )
    largest = 20 * 4 * 4096  # lora_A [E, r, 4096] of q/k/v, as large as q's B
    staging = int(2 * p.trainable / w + 2 * largest)  # bf16 parameter shard, one gradient buffer
    assert z2.host_bytes_per_rank == {"offload": int(z2.cpu_offload_bytes + staging), "load": 4 * p.base}
    assert z2.host_bytes_per_node == 8 * 4 * p.base  # loading is the larger: 35 GiB a rank
    half = memory_plan(
        recipe,
        {"zero_optimization": {"stage": 2} | offload},
        w,
        1,
        256,
        True,
        80 * GIB,
        model=model,
        gpus_per_node=4,
    )
    assert half.host_bytes_per_rank["offload"] == int(
        half.cpu_offload_bytes + 2 * 2 * p.trainable / w + 2 * largest
    )
    assert half.host_bytes_per_node == 4 * 4 * p.base
    z3 = memory_plan(
        recipe, {"zero_optimization": {"stage": 3} | offload}, w, micro, 256, True, 80 * GIB, model=model
    )
    assert z3.host_bytes_per_node == 8 * z3.cpu_offload_bytes + 4 * p.base


@pytest.mark.parametrize("hidden,intermediate", [(64, 128), (256, 768)])
def test_activation_formula_bounds_what_autograd_saves(hidden, intermediate):
    """Every tensor autograd keeps for backward (parameters and the adapters' forward copies
    excluded, each storage once) against the formula without the backward's transient layer and
    the logits (no loss is taken here). The formula counts tensors whose storage fp32 runs share
    (the norms' fp32 input is the residual stream itself), so it may only be above, by a little."""
    torch.manual_seed(0)
    model = tiny_llama(hidden_size=hidden, intermediate_size=intermediate)
    cfg = MoLoRAConfig(num_experts=4, rank=2, top_k=2, dropout=0.05, target_modules=["q_proj", "v_proj"])
    apply_molora(model, cfg)
    micro, seq = 4, 96
    mask = torch.ones(micro, seq, dtype=torch.long)
    mask[0, 80:] = 0  # a padded row, as in training: transformers then repeats k/v to all heads
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    copies = {
        tuple(m.lora_B.shape[1:2]) + (m.num_experts * m.rank,)
        for m in model.modules()
        if hasattr(m, "lora_B")
    }
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and tuple(t.shape) not in copies:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, 1000, (micro, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=mask, logits_to_keep=torch.tensor([10, 50, 70, 90]))
    layers = model.config.num_hidden_layers
    fixed = 8 * seq * model.config.head_dim  # RoPE cos/sin: once
    planned = activation_bytes(model, model.config, micro, seq, 4, checkpointing=False)
    logits = micro * micro * model.config.vocab_size * (4 + 8)  # not saved here: no loss is taken
    per_layers = (planned - logits - fixed) * layers / (layers + 1) + fixed
    assert 1.0 <= per_layers / sum(saved.values()) <= 1.15


class _Saved:
    """What a saved_tensors_hooks pack returns: the graph holds it, so a weak reference says
    whether a saved tensor is still alive."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def test_vision_activation_formula_bounds_what_autograd_keeps():
    """LLaVA with MoLoRA in the CLIP tower too (``include_vision``): the bytes of every tensor autograd
    still holds when the forward returns (the output held, parameters and forward copies excluded,
    each storage once) against the formula without the backward's transient text layer and the
    logits. The formula may only be above, by a little: it counts 8 bytes per RMSNorm and token where
    fp32 runs save 4 (1/rms), and a LayerNorm input in the tower's first layer, which nothing
    trainable precedes, so nothing saves it."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    text = LlamaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    # 64 patches + 1 per image: the tower holds about half of what is saved, so a formula that misses it fails.
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        image_size=64, patch_size=8,
    )  # fmt: skip
    model = LlavaForConditionalGeneration(
        LlavaConfig(vision_config=vision, text_config=text, image_token_index=999)
    )
    apply_molora(model, MoLoRAConfig(num_experts=4, rank=2, top_k=2, dropout=0.05, include_vision=True))
    model.train()
    assert any(".vision_tower." in name for name in molora_layers(model))
    micro, patches = 3, (vision.image_size // vision.patch_size) ** 2
    seq = patches + 24
    ids = torch.randint(0, 900, (micro, seq))
    ids[:, 2 : 2 + patches] = model.config.image_token_id  # one image per row, as in training
    mask = torch.ones(micro, seq, dtype=torch.long)
    mask[0, -10:] = 0
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    copies = {
        tuple(m.lora_B.shape[1:2]) + (m.num_experts * m.rank,)
        for m in model.modules()
        if hasattr(m, "lora_B")
    }
    saved = []

    def pack(t: torch.Tensor) -> _Saved:
        box = _Saved(t)
        saved.append(weakref.ref(box))
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.tensor):
        out = model(  # noqa: F841 (held: it keeps the tower's output, as it does until the forward returns)
            input_ids=ids,
            attention_mask=mask,
            pixel_values=torch.randn(micro, 3, vision.image_size, vision.image_size),
            logits_to_keep=torch.tensor([70, 72, 74]),
        )
    alive = {}
    for ref in saved:
        if (box := ref()) is not None:
            storage = box.tensor.untyped_storage()
            if storage.data_ptr() not in params and tuple(box.tensor.shape) not in copies:
                alive[storage.data_ptr()] = storage.nbytes()
    layers = text.num_hidden_layers
    planned = activation_bytes(model, model.config, micro, seq, 4, checkpointing=False)
    logits = micro * micro * text.vocab_size * (4 + 8)  # not saved here: no loss is taken
    fixed = 8 * seq * (text.hidden_size // text.num_attention_heads)  # RoPE cos/sin: once
    towers = {k: m for k, m in molora_layers(model).items() if ".vision_tower." in k}
    tower = vision_activation_bytes(model.config, towers, micro, 4, checkpointing=False)
    assert tower > 0.3 * sum(alive.values())  # the tower is a real share of it
    per_layers = (planned - logits - fixed - tower) * layers / (layers + 1) + fixed + tower
    assert 1.0 <= per_layers / sum(alive.values()) <= 1.15


def test_checkpointing_keeps_one_hidden_state_per_layer():
    model = meta_model(model_config("glm-4-9b"))
    apply_molora(model, load_recipe(GLM_RECIPE).molora)
    full = activation_bytes(model, model.config, 8, 256, 2, checkpointing=False)
    ckpt = activation_bytes(model, model.config, 8, 256, 2, checkpointing=True)
    fixed = 8 * 256 * 128 + 8 * 8 * 151552 * (2 + 8)
    layer = (full - fixed) / 41
    assert ckpt == pytest.approx(40 * 2 * 4096 * 8 * 256 + 2 * layer + fixed, rel=1e-6)


def test_parse_size():
    assert parse_size("80GB") == 80 * GIB
    assert parse_size("141GiB") == 141 * GIB
    assert parse_size("512MB") == 512 * 2**20
    with pytest.raises(ValueError, match="80GB"):
        parse_size("eighty")


def test_dry_run_json_for_glm(capsys):
    argv = ["--config", str(ROOT / "ds_configs/zero3.json"), "--recipe", str(GLM_RECIPE), "--dry-run"]
    assert launch_train.main([*argv, "--world-size", "8", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["params"]["base"] == 9_399_951_360 and plan["params"]["adapter"] == 54_067_200
    assert plan["fits"] is True and plan["micro_batch"] == 10 and plan["world_size"] == 8
    assert plan["per_gpu_bytes"]["total"] < 80 * GIB
    assert launch_train.main([*argv, "--world-size", "8", "--json", "--gpu-memory", "16GB"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fits"] is False


def test_dry_run_plans_the_recipes_gradient_checkpointing(capsys):
    recipe = ROOT / "recipes" / "paper_visual7w.yaml"  # model.gradient_checkpointing: true
    argv = ["--config", str(ROOT / "ds_configs/zero2.json"), "--recipe", str(recipe), "--dry-run", "--json"]
    assert launch_train.main([*argv, "--world-size", "8", "--set", "model.name_or_path=llava-1.5-7b"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["per_gpu_bytes"]["activations"] == plan["activations_bytes"]["with_checkpointing"]


def test_dry_run_bad_input_is_one_line(capsys):
    argv = ["--config", str(ROOT / "ds_configs/zero2.json"), "--recipe", str(GLM_RECIPE), "--dry-run"]
    assert launch_train.main([*argv, "--world-size", "7"]) == 2
    assert "divisible by the 7 processes" in capsys.readouterr().err
    assert launch_train.main([*argv, "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory 'lots'" in capsys.readouterr().err
    assert launch_train.main([*argv, "--set", "model=no-such-model"]) == 2
    assert "no config.json for model 'no-such-model'" in capsys.readouterr().err


def test_build_peak_of_a_config_built_model_is_measured():
    """The built-in tiny Llama allocates its output layer before tying it to the embedding: the plan's
    build_peak_excess (planned total = that moment) against the peak tensor bytes the profiler saw
    while it was built; a from_pretrained model has none."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        tiny_llama()
    live = peak = 0
    for _, nbytes in sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    ):
        live += nbytes
        peak = max(peak, live)
    plan = memory_plan(recipe, {"zero_optimization": {"stage": 0}}, 1, 1, 8, False, 80 * GIB)
    assert plan.per_gpu_bytes["build_peak_excess"] > 0
    # The planned moment counts weights only; the rotary tables (a few KiB) are the difference.
    assert plan.per_gpu_bytes["total"] == pytest.approx(peak, rel=1e-3)
    glm = memory_plan(load_recipe(GLM_RECIPE), {"zero_optimization": {"stage": 2}}, 8, 1, 512, True, 80 * GIB)
    assert glm.per_gpu_bytes["build_peak_excess"] == 0


# Each paper recipe with its model's shipped config in place of the placeholder /data path.
PAPER_MODELS = {"Llama-3.2-3B": "llama-3.2-3b", "glm-4-9b-hf": "glm-4-9b", "llava-1.5-7b-hf": "llava-1.5-7b"}


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("paper_*.yaml")), ids=lambda p: p.stem)
def test_every_paper_recipe_plans_on_8_gpus(recipe, capsys):
    name = PAPER_MODELS[Path(load_recipe(recipe).model.name_or_path).name]
    argv = ["--config", str(ROOT / "ds_configs/zero3.json"), "--recipe", str(recipe), "--dry-run", "--json"]
    assert launch_train.main([*argv, "--world-size", "8", "--set", f"model.name_or_path={name}"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["fits"] is True and plan["world_size"] == 8
    if name == "llama-3.2-3b":  # q_proj / v_proj by default; the published 3.21B parameters
        h, kv, f, vocab, layers, e, r = 3072, 8 * 128, 8192, 128256, 28, 20, 4
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h  # q, k, v, o; gate, up, down; two RMSNorms
        assert plan["params"]["base"] == vocab * h + layers * per_layer + h == 3_212_749_824  # tied head
        assert plan["params"]["adapter"] == layers * e * r * ((h + h) + (h + kv))
