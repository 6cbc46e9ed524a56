"""Run many ``Trainer`` configurations in one ``torchrun`` launch, for tests/distributed/test_zero_parity.py.

    torchrun --nproc_per_node 2 tests/distributed/parity_worker.py SPEC.json OUT_DIR

SPEC.json is a list of runs, each ``{"name", "ds_config", "ds_overrides", "recipe_overrides"}`` and
optionally ``"nan_at": [rank, step]`` (that rank's logits are NaN in that step, 1-based):
``ds_config`` names a file under ds_configs/, ``ds_overrides`` is merged into it (one level deep),
``recipe_overrides`` are ``--set`` strings applied to recipes/tiny.yaml. Each run is a fresh
``Trainer`` writing into ``OUT_DIR/<name>`` (metrics.jsonl, adapter/); a run that raises leaves
its traceback in ``OUT_DIR/<name>/error.rank<R>.txt`` and the next run goes on.

A process start costs ~30 s (imports, DeepSpeed's comm op) and a run a few seconds, hence one
launch for all of them. The model, split and tokenization of the tiny recipe are the same in
every run, so they are loaded once and handed out fresh (the model as a deep copy): the Trainer
still seeds, injects adapters and builds everything else itself.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import math
import sys
import time
import traceback
from datetime import timedelta
from functools import cache
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from molora_ds import trainer as trainer_module
from molora_ds.ds_config import load_ds_config
from molora_ds.metrics import MetricsLogger
from molora_ds.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
_LOGITS_AT = trainer_module.logits_at
TINY_RECIPE = ROOT / "recipes" / "tiny.yaml"
# A rank stuck in a collective (its peer failed alone) errors out instead of waiting 30 minutes.
COLLECTIVE_TIMEOUT = timedelta(seconds=120)


def _memoize_loaders() -> None:
    """Load the model, data split and tokens once per process; every run gets them fresh."""
    load_model = cache(trainer_module.load_model)  # keyed by the model's name (a built-in here)
    load_splits, splits = trainer_module.load_splits, {}
    tokenize, tokenized = trainer_module.tokenize_mc, {}

    def fresh_model(cfg, ds_config=None):
        model, tokenizer = load_model(cfg.name_or_path)
        return copy.deepcopy(model).eval(), tokenizer  # eval mode, as from_pretrained returns it

    def splits_once(data, seed: int = 0):
        key = (data.format, data.train, data.eval, data.eval_size, seed)
        if key not in splits:
            splits[key] = load_splits(data, seed)
        return splits[key]

    def tokenize_once(ds, tokenizer, max_len: int, prompt: str = "lettered"):
        # ds and tokenizer are the cached objects, alive for the whole process: their ids are stable keys.
        key = (id(ds), id(tokenizer), max_len, prompt)
        if key not in tokenized:
            tokenized[key] = tokenize(ds, tokenizer, max_len, prompt)
        return tokenized[key]

    trainer_module.load_model = fresh_model
    trainer_module.load_splits = splits_once
    trainer_module.tokenize_mc = tokenize_once


def _skip_loss_plots() -> None:
    """matplotlib's layout costs rank 0 ~1.5 s a run while rank 1 waits; the plot is not under test."""
    MetricsLogger.plot_loss = lambda self: None


def engine_facts(trainer: trainer_module.Trainer) -> dict:
    engine, zero_opt = trainer.engine, trainer.engine.optimizer
    return {
        "zero_stage": engine.zero_optimization_stage(),
        "bf16": engine.bfloat16_enabled(),
        "wrapper": type(zero_opt).__name__,
        "client_optimizer": type(trainer.optimizer).__name__,
        "partitioned": trainer.optimizer.partitioned,
        # Stage 1/2 and stage 3 name their offload switches differently.
        "offload_optimizer": bool(
            getattr(zero_opt, "cpu_offload", False) or getattr(zero_opt, "offload_optimizer", False)
        ),
        "offload_param": bool(getattr(zero_opt, "offload_param", False)),
        "training": all(m.training for m in engine.module.modules()),
        "micro_batch": trainer.micro,
        "accumulation": trainer.accum,
        "world": trainer.world,
    }


def _inject_nan(trainer: trainer_module.Trainer, rank: int, step: int) -> None:
    """A fault, not a mock: on ``rank`` only, the logits of step ``step`` come out NaN."""
    logits_at = trainer_module.logits_at

    def faulty(*args, **kwargs):
        logits = logits_at(*args, **kwargs)
        return logits * math.nan if trainer.rank == rank and trainer.step + 1 == step else logits

    trainer_module.logits_at = faulty


def run_one(spec: dict, out: Path) -> None:
    ds_config = load_ds_config(ROOT / "ds_configs" / spec["ds_config"])
    for key, value in spec.get("ds_overrides", {}).items():
        ds_config[key] = ds_config.get(key, {}) | value if isinstance(value, dict) else value
    recipe = load_recipe(TINY_RECIPE, spec.get("recipe_overrides", []))
    trainer = trainer_module.Trainer(recipe, ds_config, out)
    if "nan_at" in spec:
        _inject_nan(trainer, *spec["nan_at"])
    try:
        if trainer.rank == 0:  # what DeepSpeed actually built, for the test to check
            (out / "engine.json").write_text(json.dumps(engine_facts(trainer)))
        trainer.fit()
    finally:
        trainer_module.logits_at = _LOGITS_AT
        trainer.engine.destroy()


def main(spec_path: str, out_dir: str) -> int:
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False, timeout=COLLECTIVE_TIMEOUT)
    _memoize_loaders()
    _skip_loss_plots()
    rank = dist.get_rank()
    for spec in json.loads(Path(spec_path).read_text()):
        out = Path(out_dir) / spec["name"]
        t0 = time.perf_counter()
        try:
            run_one(spec, out)
        except Exception:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"error.rank{rank}.txt").write_text(traceback.format_exc())
            print(
                f"[rank {rank}] {spec['name']} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True
            )
        gc.collect()
        dist.barrier()
        if rank == 0:
            seconds = time.perf_counter() - t0
            (out / "worker_seconds.txt").write_text(f"{seconds:.2f}\n")
            print(f"{spec['name']}: {seconds:.1f} s", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
