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


def load_ds_config(path: str | Path) -> dict:
    path = Path(path)
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
    return cfg


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
    if out.get("fp16", {}).get("enabled") and not torch.cuda.is_available():
        raise ValueError(
            "fp16 needs a GPU (DeepSpeed's CPU accelerator does not support it); use bf16 or fp32"
        )
    return out


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def bf16_enabled(ds: dict) -> bool:
    return bool(ds.get("bf16", {}).get("enabled", False))
