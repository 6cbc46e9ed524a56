"""The memory planner behind ``launch/train.py --dry-run``: per-GPU bytes of a run before it starts.

The model is built on the meta device from its config (no weights read) and MoLoRA is applied
to it, so the parameter counts are exact. Memory per rank is then the sum of the parts DeepSpeed
and our trainer allocate; each part's formula is in ``memory_plan``, the activations' in
``activation_bytes``. What DeepSpeed's own estimators would say is printed beside it: they count
every parameter as trained with Adam (16 bytes each beyond the weights) and ignore activations
and buffers, which is about right for full fine-tuning and about 2x off for a frozen 9B base.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, PretrainedConfig

from molora_ds.data.assets import asset_dir
from molora_ds.inject import apply_molora, molora_layers
from molora_ds.models.loading import BUILTIN_MODELS
from molora_ds.recipe import ModelConfig, Recipe

CONFIG_DIR = Path(__file__).resolve().parent / "models" / "configs"
GIB = 2**30
# CUDA context, NCCL communicators and allocator fragmentation: measured typically 1-3 GiB on
# 80 GB cards; kept out of the ``total`` so that CPU measurements compare like with like.
GPU_RESERVE = 2 * GIB


def model_config(model: ModelConfig | str) -> PretrainedConfig:
    """The config of a recipe's model: a shipped JSON (``glm-4-9b``...), a built-in, or a folder."""
    name = model if isinstance(model, str) else model.name_or_path
    if (CONFIG_DIR / f"{name}.json").is_file():
        return AutoConfig.from_pretrained(CONFIG_DIR / f"{name}.json")
    if name == "tiny-llama":
        from molora_ds.models.loading import tiny_llama

        with torch.device("meta"):
            return tiny_llama().config
    folder = asset_dir() / "smollm2-135m-instruct" if name == "smollm2-135m" else Path(name)
    if not (folder / "config.json").is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.json")) + ["smollm2-135m", "tiny-llama"]
        hint = " (it is written on the first training run)" if name == "smollm2-135m" else ""
        raise FileNotFoundError(
            f"no config.json for model {name!r} at {folder}{hint}; use one of {known} or a folder with config.json"
        )
    return AutoConfig.from_pretrained(folder)


def meta_model(config: PretrainedConfig) -> nn.Module:
    """The model's modules and parameter shapes, without memory (every tensor on the meta device)."""
    auto = AutoModelForImageTextToText if config.model_type == "llava" else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config)


@dataclass
class Params:
    base: int
    adapter: int
    router: int
    largest: int  # the largest single parameter, what ZeRO-3 gathers at once
    persistent: int  # ZeRO-3 keeps parameters below the persistence threshold whole on every rank
    persistent_trainable: int

    @property
    def trainable(self) -> int:
        return self.adapter + self.router


def count_params(model: nn.Module, persistence_threshold: int) -> Params:
    adapter = router = 0
    for layer in molora_layers(model).values():
        adapter += layer.lora_A.numel() + layer.lora_B.numel()
        router += layer.router.weight.numel()
    params = list(model.parameters())  # shared (tied) parameters come once
    small = [p for p in params if p.numel() <= persistence_threshold]
    return Params(
        base=sum(p.numel() for p in params if not p.requires_grad),
        adapter=adapter,
        router=router,
        largest=max(p.numel() for p in params),
        persistent=sum(p.numel() for p in small),
        persistent_trainable=sum(p.numel() for p in small if p.requires_grad),
    )


def _text_config(config: PretrainedConfig) -> PretrainedConfig:
    return getattr(config, "text_config", None) or config


def _adapter_bytes(layers: dict[str, nn.Module], act_bytes: int) -> int:
    """Bytes per token that autograd saves in ``layers`` (MoLoRA layers), summed; see ``activation_bytes``."""
    total = 0
    inputs_seen: set[tuple[str, int]] = set()
    for name, layer in layers.items():
        index = re.search(r"\.(\d+)\.", name)
        block = name[: index.end()] if index else name
        sibling = ("q_proj", "k_proj", "v_proj") if name.endswith(("q_proj", "k_proj", "v_proj")) else (name,)
        key = (block + "/".join(sibling), layer.in_features)
        shared = 0 if key in inputs_seen else act_bytes * layer.in_features
        inputs_seen.add(key)
        dropout = 2 * act_bytes * layer.in_features if isinstance(layer.dropout, nn.Dropout) else 0
        e = layer.num_experts
        router = 16 * e + 20 * layer.top_k + 4
        total += shared + dropout + router + act_bytes * e * layer.rank
    return total


def activation_bytes(
    model: nn.Module, config: PretrainedConfig, micro: int, seq: int, act_bytes: int, checkpointing: bool
) -> int:
    """Peak bytes of activations for one micro-batch of ``micro x seq`` tokens, frozen base.

    Only what autograd saves for the adapters' gradients counts: a frozen Linear saves nothing
    (its weight is all its input gradient needs). Per decoder layer and token, with hidden h,
    q heads n, kv heads n_kv (expanded to n by transformers when a padding mask is given), head
    dim d, intermediate f, a = activation bytes (2 bf16, 4 fp32):

        2 RMSNorms:       2 * (4h + 8)           their input upcast to fp32, the variance, 1/rms
        attention (SDPA): a * 4 n d + 4 n        q, k, v (repeated), output; log-sum-exp (fp32)
                          + a * seq              its own float copy of the boolean padding mask
        MLP:              a * 3f                 gate pre-activation, its SiLU, up
        per MoLoRA layer: a * in  (router input; shared by the q/k/v of one layer)
                          + 2a * in              the dropped-out input and its mask (a float mask
                                                 on CPU; CUDA's is 1 byte), when dropout > 0
                          + 16E + 20k + 4        router softmax, gates and their scatter (fp32);
                                                 top-k values (fp32) and indices (int64, twice); sum
                          + a * E r              A x

    plus, once per micro-batch, RoPE's cos and sin (8 * seq * d) and the logits at the answer
    positions (micro * min(micro, seq) * vocab * (a + 8): logits, fp32 copy, their gradient).
    The backward holds one layer's worth again as gradients in flight. With gradient checkpointing
    (per decoder layer) each layer keeps only its input (a * h per token) and one layer at a time
    is recomputed, so the total is  L * a * h * tokens + 2 * (one layer) + RoPE + logits.
    A vision-language model's text layers are counted so (its ``seq`` includes the image tokens);
    MoLoRA layers in its vision tower add ``vision_activation_bytes``.
    """
    text = _text_config(config)
    h, f, n = text.hidden_size, text.intermediate_size, text.num_attention_heads
    d = getattr(text, "head_dim", None) or h // n
    num_layers = text.num_hidden_layers
    per_token = 2 * (4 * h + 8) + act_bytes * (4 * n * d + seq) + 4 * n + act_bytes * 3 * f
    layers = molora_layers(model)
    vision = {k: v for k, v in layers.items() if ".vision_tower." in f".{k}"}
    text_layers = {k: v for k, v in layers.items() if k not in vision}
    adapter_per_token = _adapter_bytes(text_layers, act_bytes) / num_layers  # spread evenly
    tokens = micro * seq
    one_layer = (per_token + adapter_per_token) * tokens
    fixed = 8 * seq * d + micro * min(micro, seq) * text.vocab_size * (act_bytes + 8)
    if vision:
        fixed += vision_activation_bytes(config, vision, micro, act_bytes, checkpointing)
    if checkpointing:
        return int(num_layers * act_bytes * h * tokens + 2 * one_layer + fixed)
    return int((num_layers + 1) * one_layer + fixed)


def vision_activation_bytes(
    config: PretrainedConfig, layers: dict[str, nn.Module], images: int, act_bytes: int, checkpointing: bool
) -> int:
    """What a LLaVA's CLIP tower with MoLoRA ``layers`` (``molora.include_vision``) keeps for backward.

    Each of ``images`` images is (image_size / patch)^2 patches + 1 class token, through all the
    tower's layers: the features come from ``vision_feature_layer`` (-2), but the last layer runs too
    and transformers 5.x keeps the tower's output in the model's output (``image_outputs``), so its
    saved tensors live until the forward returns, when the text model's are all saved. Per layer and
    image token, with the tower's hidden h, heads n, intermediate f (CLIPEncoderLayer: pre-norm
    attention and MLP; the residual adds save nothing):

        2 LayerNorms:     2 * (a h + 8)          input; mean and 1/std (fp32)
        attention (SDPA): a * 4h + 4n            q, k, v, output; log-sum-exp (fp32)
        MLP:              a * 2f                 fc1's output and quick_gelu's sigmoid (a * f for gelu)
        MoLoRA layers:    as in ``activation_bytes``, per image token

    plus the projector's GELU input (a * text hidden per patch; the class token is dropped first).
    With gradient checkpointing each layer saves only its input (a * h per image token); its
    recomputation comes after the text model's backward, whose two layers in flight are the peak.
    A frozen tower (no MoLoRA layers in it) saves nothing: it only holds one layer's intermediates
    and its hidden states while it runs, before the text model starts (LLaVA-1.5-7B: ~40 MB per
    image), below the text model's peak, so it is not counted.
    """
    v = config.vision_config
    h, f, n, depth = v.hidden_size, v.intermediate_size, v.num_attention_heads, v.num_hidden_layers
    patches = (v.image_size // v.patch_size) ** 2
    tokens = images * (patches + 1)
    projector = act_bytes * images * patches * _text_config(config).hidden_size
    if checkpointing:
        return depth * act_bytes * h * tokens + projector
    mlp = act_bytes * (2 if v.hidden_act == "quick_gelu" else 1) * f
    per_token = 2 * (act_bytes * h + 8) + act_bytes * 4 * h + 4 * n + mlp
    return depth * per_token * tokens + _adapter_bytes(layers, act_bytes) * tokens + projector


@dataclass
class MemoryPlan:
    """Bytes per rank (GPU unless offloaded), as the JSON of ``--dry-run --json`` reports them."""

    model: str
    world_size: int
    zero_stage: int
    bf16: bool
    micro_batch: int
    seq_len: int
    params: dict[str, int]
    per_gpu_bytes: dict[str, int]
    activations_bytes: dict[str, int]
    cpu_offload_bytes: int
    host_bytes_per_rank: dict[str, int]
    gpus_per_node: int
    host_bytes_per_node: int
    gpu_memory_bytes: int
    gpu_reserve_bytes: int
    fits: bool
    largest_micro_batch: int | None
    deepspeed_estimate_bytes: int | None

    def to_dict(self) -> dict:
        return asdict(self)


def _zero_option(ds: dict, key: str, default: float) -> int:
    zero = ds.get("zero_optimization", {})
    return int(zero.get(key, zero.get(f"stage3_{key}", default)))


def _offloaded(ds: dict, what: str) -> bool:
    return ds.get("zero_optimization", {}).get(what, {}).get("device", "none") != "none"


def memory_plan(
    recipe: Recipe,
    ds: dict,
    world: int,
    micro: int,
    seq_len: int,
    bf16: bool,
    gpu_memory: int,
    checkpointing: bool = False,
    model: nn.Module | None = None,
    gpus_per_node: int = 8,
) -> MemoryPlan:
    """The per-rank memory of ``recipe`` under the DeepSpeed config ``ds`` on ``world`` ranks.

    With P_b frozen and P_t trainable (experts + routers) parameters, w = world, s = 2 (bf16) or
    4 (fp32) bytes, and stage z; with expert parallelism over ep ranks (ZeRO 0-2) each rank stores
    P_s = routers + experts / ep, else P_s = P_t:

        base weights      s P_b, / w under ZeRO-3 (+ the gathered working set: the largest
                          parameter and the prefetch bucket, at most the whole model)
        adapter weights   s P_s, / w under ZeRO-3
        gradients         s P_s (ZeRO-0/1), s P_t / w (ZeRO-2/3: the experts' E/ep partitioned over
                          the w/ep ranks of their expert-data-parallel group, the same share)
                          + 4 P_t / w for the optimizer's flat fp32 gradient (ZeRO >= 1 or bf16)
        reduce bucket     ZeRO >= 1: reduce_bucket_size elements (5e8 by default; fp32 under ZeRO-1),
                          allocated whole whatever the model's size, two with overlap_comm under
                          ZeRO-1/2. Set reduce_bucket_size near P_t for a small adapter.
        optimizer         AdamW: fp32 master (4 P_s, none for fp32 ZeRO-0) + 2 fp32 moments
                          (8 P_s), P_t / w in place of P_s when ZeRO >= 1 or bf16 (DeepSpeed's bf16
                          optimizer shards)
        preconditioner    per MoLoRA layer two E x r x r float64 inverses; float64 scratch copies
                          of A and B (one per distinct shape) and one fp32 product of the largest;
                          E/ep experts with expert parallelism
        forward copies    each layer's B stacked as [out, E r] (a copy, s bytes) kept for backward; with
                          expert parallelism each layer's local E/ep (token dispatch) and the running
                          layer's gathered A, B and copy of B (weight gather recomputes; both counted)
        activations       ``activation_bytes``
        build peak excess how far building the model peaks above the rest (``_build_peak``)

    and in host memory per node (``host_bytes``): its ranks' offloaded state and DeepSpeed's
    pinned staging buffers, or the model's load if that is larger.
    """
    model = model if model is not None else meta_model(model_config(recipe.model))
    if not molora_layers(model):
        apply_molora(model, recipe.molora)
    z = int(ds.get("zero_optimization", {}).get("stage", 0))
    s = 2 if bf16 else 4
    p = count_params(model, _zero_option(ds, "param_persistence_threshold", 1e5) if z == 3 else 0)
    layers = list(molora_layers(model).values())
    ep = recipe.molora.expert_parallel_size
    stored = p.router + p.adapter / ep  # P_s: what a rank holds of the trainable parameters

    def shard(n: int, persistent: int = 0) -> float:
        return persistent + (n - persistent) / world

    if z == 3:
        gathered = min(p.largest + _zero_option(ds, "prefetch_bucket_size", 5e7), p.base + p.trainable)
        base = s * (shard(p.base, p.persistent - p.persistent_trainable) + gathered)
        adapter = s * shard(p.trainable, p.persistent_trainable)
    else:
        base, adapter = s * p.base, s * stored
    sharded = z >= 1 or bf16  # the optimizer's state is partitioned over the ranks
    flat32 = 4 * p.trainable / world if sharded else 0  # the optimizer's flat fp32 gradient
    grads = s * (p.trainable / world if z >= 2 else stored) + flat32
    bucket = 0
    if z >= 1 and ds.get("zero_optimization", {}).get("contiguous_gradients", True):
        overlap = ds.get("zero_optimization", {}).get("overlap_comm", z == 3)
        # ZeRO-1/2 allocate a fresh bucket at each backward; the previous one is usually freed
        # first, but one CPU run of bench/bench_plan.py held two (freed by the garbage collector).
        buffers = 2 if overlap and z < 3 else 1
        bucket = buffers * _zero_option(ds, "reduce_bucket_size", 5e8) * (4 if z == 1 else s)
    per_rank_batch = recipe.train.global_batch // world
    opt = recipe.optim
    state_per_param = (8 if opt.is_adam else 4 * (opt.momentum > 0)) + (4 if bf16 or z >= 1 else 0)
    optimizer = state_per_param * (p.trainable / world if sharded else stored)
    precond = 0
    if opt.riemannian:
        shapes = {tuple(m.lora_A.shape) for m in layers} | {tuple(m.lora_B.shape) for m in layers}
        precond = sum(2 * 8 * m.num_experts * m.rank**2 for m in layers)
        precond += 8 * sum(math.prod(shape) for shape in shapes) + 4 * max(math.prod(x) for x in shapes)
        precond /= ep
    forward_copies = s * sum(m.lora_B.numel() for m in layers) / ep
    if ep > 1:
        forward_copies += s * max(m.lora_A.numel() + 2 * m.lora_B.numel() for m in layers)
    acts = {ckpt: activation_bytes(model, model.config, micro, seq_len, s, ckpt) for ckpt in (False, True)}
    offload = 0
    if _offloaded(ds, "offload_optimizer") and z >= 1:
        offload += optimizer + flat32
        optimizer, grads = 0, grads - flat32
    if _offloaded(ds, "offload_param") and z == 3:
        offload += base + adapter - s * gathered
        base, adapter = s * gathered, 0
    load_dtype = recipe.model.dtype  # "auto": the checkpoint's, as config.json names it
    if load_dtype == "auto":
        load_dtype = str(getattr(model.config, "dtype", None)).removeprefix("torch.")
    load = {"float32": 4, "bfloat16": 2, "float16": 2}.get(load_dtype, 4) * p.base
    host = host_bytes(ds, p, layers, world, s, offload, per_rank_batch // micro, load)
    ranks = min(world, gpus_per_node)
    if z == 3:  # rank 0 loads; with offload_param, zero.Init puts every rank's shard on the host meanwhile
        host_node = ranks * host["offload"] + host["load"]
    else:  # the loaded weights move to the GPU before DeepSpeed allocates the offloaded state
        host_node = ranks * max(host["offload"], host["load"])
    parts = {
        "base_weights": base,
        "adapter_weights": adapter,
        "gradients": grads,
        "reduce_bucket": bucket,
        "optimizer_state": optimizer,
        "preconditioner": precond,
        "adapter_forward_copies": forward_copies,
        "activations": acts[checkpointing],
    }
    parts = {k: int(v) for k, v in parts.items()}
    parts["build_peak_excess"] = max(0, _build_peak(recipe, model, p) - sum(parts.values()))
    parts["total"] = sum(parts.values())

    def fits(total: int) -> bool:
        return total + GPU_RESERVE <= gpu_memory

    candidates = [m for m in range(1, per_rank_batch + 1) if per_rank_batch % m == 0]
    largest = None
    for m in candidates:
        delta = activation_bytes(model, model.config, m, seq_len, s, checkpointing) - acts[checkpointing]
        if fits(parts["total"] + delta):
            largest = m
    return MemoryPlan(
        model=recipe.model.name_or_path,
        world_size=world,
        zero_stage=z,
        bf16=bf16,
        micro_batch=micro,
        seq_len=seq_len,
        params={"base": p.base, "adapter": p.adapter, "router": p.router, "trainable": p.trainable},
        per_gpu_bytes=parts,
        activations_bytes={"without_checkpointing": acts[False], "with_checkpointing": acts[True]},
        cpu_offload_bytes=int(offload),
        host_bytes_per_rank=host,
        gpus_per_node=gpus_per_node,
        host_bytes_per_node=int(host_node),
        gpu_memory_bytes=gpu_memory,
        gpu_reserve_bytes=GPU_RESERVE,
        fits=fits(parts["total"]),
        largest_micro_batch=largest,
        deepspeed_estimate_bytes=deepspeed_estimate(p, z, world, ds),
    )


def host_bytes(
    ds: dict, p: Params, layers: list, world: int, s: int, offload: float, accumulation: int, load: int
) -> dict[str, int]:
    """Host (CPU) bytes of one rank: ``offload``, what it holds while training, and ``load``, what
    loading the model costs it (rank 0 only under ZeRO-3).

    Offload: ``cpu_offload_bytes`` plus, under ZeRO-1/2 with ``offload_optimizer``, DeepSpeed's
    staging buffers (pinned when ``pin_memory``): a 16-bit copy of the rank's parameter shard
    (s P_t / w), one gradient buffer of the largest trainable parameter, and with gradient
    accumulation the 16-bit gradients of the rank's shard (s P_t / w). ZeRO-3's own buffers are
    not counted.

    Load (transformers 5.x ``from_pretrained``): without ZeRO-3 every rank builds the model on the
    meta device and takes each weight from the memory-mapped safetensors, in the load dtype
    (``model.dtype``: float32 unless the recipe says otherwise), so it holds the whole base
    (``load`` = b P_b, b its bytes) until DeepSpeed moves it to the GPU, before the optimizer is
    built. When the checkpoint is already in that dtype the tensors are the file's mapped pages,
    which the node's ranks share (one copy per node, page cache); a conversion (a bf16 checkpoint
    loaded in float32, LLaVA-1.5's fp16 in bf16) gives each rank its own copy, the figure counted
    here. Under ZeRO-3 the model is built inside ``zero.Init`` (partitioned; on the GPU, or on the
    host with ``offload_param``) and only rank 0 maps the checkpoint and copies it in layer by
    layer: about the checkpoint's size on the first node, counted as b P_b.
    """
    z = int(ds.get("zero_optimization", {}).get("stage", 0))
    staging = 0
    if _offloaded(ds, "offload_optimizer") and z in (1, 2):
        largest = max(max(m.lora_A.numel(), m.lora_B.numel(), m.router.weight.numel()) for m in layers)
        staging = s * p.trainable / world * (2 if accumulation > 1 else 1) + s * largest
    return {"offload": int(offload + staging), "load": load}


def _build_peak(recipe: Recipe, model: nn.Module, p: Params) -> int:
    """Bytes while a model built from its config (the built-in tiny Llama) is constructed: its
    output layer is allocated before it is tied to the embedding, so for a moment the fp32 base
    weights and one more vocab x hidden matrix live. ``from_pretrained`` builds on the meta
    device and loads into that: no such moment (0)."""
    if recipe.model.name_or_path not in BUILTIN_MODELS or not model.config.tie_word_embeddings:
        return 0
    return 4 * (p.base + model.get_output_embeddings().weight.numel())


def deepspeed_estimate(p: Params, zero_stage: int, world: int, ds: dict) -> int | None:
    """DeepSpeed's per-GPU model-states estimate (its functions, our counts); None for ZeRO-0."""
    total, nodes = p.base + p.trainable, math.ceil(world / 8)
    per_node = world // nodes
    if zero_stage in (1, 2):
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        return estimate_zero2_model_states_mem_needs(
            total, per_node, nodes, cpu_offload=_offloaded(ds, "offload_optimizer")
        )[1]
    if zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        return estimate_zero3_model_states_mem_needs(
            total,
            p.largest,
            per_node,
            nodes,
            cpu_offload=_offloaded(ds, "offload_optimizer"),
            cpu_offload_params=_offloaded(ds, "offload_param"),
        )[1]
    return None


def parse_size(text: str) -> int:
    """``"80GB"``, ``"80GiB"``, ``"141G"`` -> bytes. GB means GiB: an "80 GB" card has 80 GiB."""
    found = re.fullmatch(r"\s*([\d.]+)\s*(G|GB|GiB|M|MB|MiB|T|TB|TiB)?\s*", text, re.IGNORECASE)
    if not found:
        raise ValueError(f"--gpu-memory {text!r}: give a size like 80GB or 141GiB")
    unit = (found.group(2) or "G")[0].upper()
    return int(float(found.group(1)) * {"M": 2**20, "G": GIB, "T": 2**40}[unit])


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a short report: counts, the per-rank parts, the verdict, DeepSpeed's figure."""

    def gib(n: float) -> str:
        return f"{n / GIB:8.2f} GiB"

    p, parts = plan.params, plan.per_gpu_bytes
    lines = [
        f"{plan.model}: {p['base']:,} base + {p['adapter']:,} adapter + {p['router']:,} router parameters",
        f"ZeRO-{plan.zero_stage}, {plan.world_size} ranks, {'bf16' if plan.bf16 else 'fp32'}, "
        f"micro-batch {plan.micro_batch} x {plan.seq_len} tokens; per rank:",
    ]
    lines += [f"  {k:24s}{gib(v)}" for k, v in parts.items() if k != "total"]
    acts = plan.activations_bytes
    lines += [
        f"  {'total':24s}{gib(parts['total'])}   (+{plan.gpu_reserve_bytes / GIB:.0f} GiB CUDA/NCCL reserve)",
        f"  activations without / with gradient checkpointing: {gib(acts['without_checkpointing']).strip()} / "
        f"{gib(acts['with_checkpointing']).strip()}",
        f"  offloaded to CPU per rank: {gib(plan.cpu_offload_bytes).strip()}",
        f"  host memory per node of {plan.gpus_per_node} GPUs: {gib(plan.host_bytes_per_node).strip()} "
        f"(per rank: {gib(plan.host_bytes_per_rank['offload']).strip()} offloaded state and staging buffers, "
        f"{gib(plan.host_bytes_per_rank['load']).strip()} while loading the model)",
        f"{'fits' if plan.fits else 'does NOT fit'} in {plan.gpu_memory_bytes / GIB:.0f} GiB; largest micro-batch "
        f"that fits: {plan.largest_micro_batch or 'none'}",
    ]
    if plan.deepspeed_estimate_bytes is not None:
        lines.append(
            f"DeepSpeed's estimate (model states only): {gib(plan.deepspeed_estimate_bytes).strip()} per GPU. "
            "It counts all parameters as trained with Adam (16 bytes each beyond the weights) and no "
            "activations or buffers; here only the adapter is trained."
        )
    return "\n".join(lines)
