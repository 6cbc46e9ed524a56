"""DeepSpeed JSON configs: load, check, and fill in the batch arithmetic from the recipe.

The recipe's ``global_batch`` is the logical batch; micro-batch and accumulation are derived
here from it, the world size and ``max_micro_batch``, so one recipe trains the same way on any
process count. A DeepSpeed config that fixes a contradicting batch size is an error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from molora_ds.recipe import TrainConfig

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
_RECIPE_KEYS = {"model", "data", "molora", "optim", "train", "eval", "lr", "method", "max_steps"}
# The keys DeepSpeed (0.19) reads. It ignores any other top-level key, so a misspelt one ("zero_optimisation")
# would silently train without ZeRO; a bad key inside zero_optimization fails only after the model has loaded.
# tests/unit/test_ds_config.py checks these tables against DeepSpeed's own.
TOP_LEVEL_KEYS = frozenset(
    """
    activation_checkpointing aio amp autotuning bf16 bfloat16 checkpoint comet comms_logger
    communication_data_type compile compression_training csv_monitor curriculum_learning data_efficiency
    data_types dataloader_drop_last datastates_ckpt disable_allgather disable_python_gc dump_state
    eigenvalue elasticity expert_parallel flops_profiler fp16 gradient_accumulation_steps
    gradient_allreduce_op gradient_clipping gradient_predivide_factor graph_harvesting hybrid_engine
    log_level managed_gradient_accumulation memory_breakdown nebula optimizer pipeline
    prescale_gradients progressive_layer_drop quantize_training scheduler
    seq_parallel_communication_data_type sparse_attention sparse_gradients steps_per_print
    tensor_parallel tensorboard timers torch_autocast train_batch_size train_micro_batch_size_per_gpu
    use_data_before_expert_parallelism vocabulary_size wall_clock_breakdown wandb weight_quantization
    zero_allow_untested_optimizer zero_force_ds_cpu_optimizer zero_optimization
    """.split()  # noqa: SIM905 (a word list reads better)
)
ZERO_KEYS = frozenset(
    """
    allgather_bucket_size allgather_partitions allgather_sequential compute_grad_norm
    contiguous_gradients cpu_offload cpu_offload_param cpu_offload_use_pin_memory elastic_checkpoint
    enable_sanity_checks gather_16bit_weights_on_model_save ignore_unused_parameters leaf_module
    legacy_stage1 load_from_fp32_weights log_trace_cache_warnings max_live_parameters max_reuse_distance
    memory_efficient_linear model_persistence_threshold module_granularity_threshold offload_optimizer
    offload_param overlap_comm override_module_apply param_persistence_threshold parameter_alignment
    pipeline_loading_checkpoint prefetch_bucket_size reduce_bucket_size reduce_scatter
    round_robin_gradients save_muon_momentum_buffer_in_memory stage stage3_allgather_sequential
    stage3_gather_16bit_weights_on_model_save stage3_gather_fp16_weights_on_model_save
    stage3_max_live_parameters stage3_max_reuse_distance stage3_model_persistence_threshold
    stage3_module_granularity_threshold stage3_param_persistence_threshold stage3_prefetch_bucket_size
    stage3_use_all_reduce_for_fetch_params sub_group_size use_all_reduce_for_fetch_params
    use_multi_rank_bucket_allreduce zenflow zero_hpz_partition_size zero_quantized_gradients
    zero_quantized_nontrainable_weights zero_quantized_weights
    """.split()  # noqa: SIM905 (a word list reads better)
)


def load_ds_config(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"DeepSpeed config {path} is a folder; pass a JSON file, e.g. --config ds_configs/zero2.json"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"DeepSpeed config {path} not found; pass --config ds_configs/zero2.json or similar"
        )
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"DeepSpeed config {path} must be a JSON object")
    misplaced = sorted(_RECIPE_KEYS & cfg.keys())
    if misplaced:
        raise ValueError(f"DeepSpeed config {path} has recipe keys {misplaced}: move them to the recipe YAML")
    if "optimizer" in cfg or "scheduler" in cfg:
        raise ValueError(
            f"DeepSpeed config {path} sets 'optimizer'/'scheduler': molora_ds builds them from the recipe's optim "
            "section (the Riemannian methods need their own); remove these keys"
        )
    _check_keys(cfg, path)
    return cfg


def _check_keys(cfg: dict, path: Path) -> None:
    unknown = sorted(cfg.keys() - TOP_LEVEL_KEYS)
    if unknown:
        raise ValueError(f"DeepSpeed config {path}: unknown key(s) {unknown}; DeepSpeed would ignore them")
    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ValueError(f"DeepSpeed config {path}: zero_optimization must be an object, got {zero!r}")
    unknown = sorted(zero.keys() - ZERO_KEYS)
    if unknown:
        raise ValueError(f"DeepSpeed config {path}: unknown key(s) {unknown} in zero_optimization")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise ValueError(
            f"DeepSpeed config {path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}"
        )
    for name in ("offload_optimizer", "offload_param"):
        offload = zero.get(name, {})
        device = offload.get("device", "none") if isinstance(offload, dict) else offload
        if device not in ("none", "cpu", "nvme"):
            raise ValueError(
                f"DeepSpeed config {path}: zero_optimization.{name}.device must be none, cpu or nvme, got {device!r}"
            )
        if device == "nvme" and not offload.get("nvme_path"):
            raise ValueError(
                f"DeepSpeed config {path}: zero_optimization.{name} offloads to nvme but sets no nvme_path; "
                "add the folder on the NVMe drive"
            )


def check_fp16(ds: dict) -> None:
    """fp16 fails deep inside DeepSpeed on CPU, after the model has loaded."""
    if ds.get("fp16", {}).get("enabled") and not torch.cuda.is_available():
        raise ValueError(
            "DeepSpeed config enables fp16, which needs a GPU (DeepSpeed's CPU accelerator does not support it); "
            "use bf16 or fp32"
        )


def plan_batches(train: TrainConfig, world: int, ds: dict) -> tuple[int, int]:
    """``(micro_batch, accumulation)`` with ``micro * accumulation * world == global_batch``."""
    for key in _BATCH_KEYS:
        if key in ds and (not isinstance(ds[key], int) or isinstance(ds[key], bool) or ds[key] < 1):
            raise ValueError(
                f"DeepSpeed config sets {key}={ds[key]!r}; it must be a positive integer, or better left out: "
                "molora_ds derives the batch sizes from the recipe's train.global_batch"
            )
    g = train.global_batch
    if g % world:
        raise ValueError(
            f"train.global_batch={g} is not divisible by the {world} processes; pick a multiple of {world}"
        )
    per_rank = g // world
    micro = ds.get("train_micro_batch_size_per_gpu")
    if micro is None:
        micro = max(d for d in range(1, min(per_rank, train.max_micro_batch) + 1) if per_rank % d == 0)
    elif per_rank % micro:
        raise ValueError(
            f"train_micro_batch_size_per_gpu={micro} does not divide global_batch/world = {g}/{world} = {per_rank}"
        )
    accumulation = per_rank // micro
    fixed = {"train_batch_size": g, "gradient_accumulation_steps": accumulation}
    for key, want in fixed.items():
        if key in ds and ds[key] != want:
            raise ValueError(
                f"DeepSpeed config sets {key}={ds[key]}, but the recipe's global_batch={g} on {world} processes "
                f"with micro-batch {micro} needs {want}; remove {key} from the DeepSpeed config"
            )
    return micro, accumulation


def finalize(ds: dict, micro: int, accumulation: int, world: int) -> dict:
    """A copy of ``ds`` with batch keys set, ``bf16.enabled: "auto"`` resolved and our optimizer allowed."""
    out = json.loads(json.dumps(ds))
    out.update(
        train_batch_size=micro * accumulation * world,
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=accumulation,
        zero_allow_untested_optimizer=True,
    )
    out.setdefault("steps_per_print", 10**9)
    out.setdefault("gradient_clipping", 0.0)
    zero = out.setdefault("zero_optimization", {"stage": 0})
    if zero.get("offload_optimizer", {}).get("device", "none") != "none":
        out["zero_force_ds_cpu_optimizer"] = False  # our optimizer runs on the offloaded partitions
    bf16 = out.setdefault("bf16", {"enabled": False})
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    check_fp16(out)
    return out


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def bf16_enabled(ds: dict) -> bool:
    return bool(ds.get("bf16", {}).get("enabled", False))
