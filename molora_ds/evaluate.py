"""Accuracy of a saved adapter on a recipe's eval data, without training (``launch/train.py --eval-only``).

Every process loads the whole base model (no ZeRO partitioning: there is no optimizer state to
shard) and the adapter, scores its shard of the eval rows, and the counts are summed; the eval rows
are the ones training evaluated on (the same data section and ``train.seed``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch.distributed as dist

from molora_ds.data.formats import load_splits
from molora_ds.data.vision import vision_prompt
from molora_ds.distributed.env import setup_env
from molora_ds.eval import mc_accuracy
from molora_ds.inject import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter
from molora_ds.models.loading import load_model, load_processor
from molora_ds.recipe import Recipe

log = logging.getLogger("molora_ds")


def check_adapter(path: Path) -> None:
    """The adapter folder's files, checked before any model loads."""
    missing = [f for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG) if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"--adapter {path}: {', '.join(missing)} not found; point it at a run's adapter/ folder"
        )


def evaluate_adapter(recipe: Recipe, adapter: Path, output_dir: Path) -> dict:
    """``{"accuracy", "n", "method", "adapter"}``, also written to ``output_dir/eval_results.json``."""
    env = setup_env()
    device = env.bind_device()
    if env.world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        t0 = time.perf_counter()
        model, tokenizer = load_model(recipe.model)
        processor = load_processor(recipe.model)
        load_adapter(model, adapter)
        model.to(device)
        vision = vision_prompt(processor) if processor is not None else None
        _, eval_set = load_splits(recipe.data, recipe.train.seed, vision=vision is not None)
        ev = recipe.eval
        result = mc_accuracy(
            model,
            tokenizer,
            eval_set,
            ev.method,
            ev.batch_size,
            recipe.data.max_len,
            prompt=recipe.data.prompt,
            vision=vision,
            image_processor=processor.image_processor if processor is not None else None,
        )
        result |= {"method": ev.method, "adapter": str(adapter)}
        if env.rank == 0:
            log.info(
                f"eval-only ({ev.method}, {result['n']} questions, {env.world_size} processes): accuracy "
                f"{result['accuracy']:.4f} in {time.perf_counter() - t0:.0f} s"
            )
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / "eval_results.json").write_text(json.dumps(result, indent=2))
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
