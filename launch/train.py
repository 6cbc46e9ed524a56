"""Train MoLoRA adapters with DeepSpeed.

deepspeed launch/train.py --config ds_configs/zero2.json            # the embedded default
torchrun --nproc_per_node 2 launch/train.py --config ds_configs/zero3.json --recipe recipes/tiny.yaml
python launch/train.py --config ds_configs/zero0.json --set train.max_steps=10
python launch/train.py --config ds_configs/zero3.json --recipe recipes/glm4_9b_qa.yaml --dry-run --world-size 16
torchrun --nproc_per_node 2 launch/train.py --config ds_configs/zero2.json --recipe recipes/tiny.yaml \
    --eval-only --adapter runs/default/adapter

--dry-run loads no weights and starts no process group: it prints the per-GPU memory plan
(molora_ds/plan.py) for --world-size ranks and a --gpu-memory card, and exits.
--eval-only --adapter PATH trains nothing: it loads the base model and a saved adapter on every process and
writes the accuracy on the recipe's eval data to OUTPUT_DIR/eval_results.json (molora_ds/evaluate.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from molora_ds import checkpoint
from molora_ds.distributed.env import world_size
from molora_ds.distributed.expert_parallel import check_setup
from molora_ds.ds_config import load_ds_config, plan_batches, zero_stage
from molora_ds.recipe import load_recipe

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "default.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config", required=True, help="DeepSpeed JSON (ds_configs/zero{0,1,2,3}.json, *_offload.json)"
    )
    p.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="recipe YAML (default: %(default)s)")
    p.add_argument("--output-dir", default="runs/default", help="run folder (metrics, checkpoints, adapter)")
    p.add_argument("--max-steps", type=int, help="shorthand for --set train.max_steps=N")
    p.add_argument("--seed", type=int, help="shorthand for --set train.seed=N")
    p.add_argument("--resume", nargs="?", const="auto", help="'auto' (newest complete checkpoint) or a path")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set molora.top_k=4 (repeatable)",
    )
    p.add_argument(
        "--eval-only", action="store_true", help="evaluate --adapter on the eval data; no training"
    )
    p.add_argument("--adapter", type=Path, help="a saved adapter folder (a run's adapter/), for --eval-only")
    plan = p.add_argument_group("planning (--dry-run)")
    plan.add_argument("--dry-run", action="store_true", help="print the per-GPU memory plan and exit")
    plan.add_argument("--world-size", type=int, help="ranks to plan for (default: this launch's)")
    plan.add_argument("--gpu-memory", default="80GB", help="GPU size to check against (default: %(default)s)")
    plan.add_argument(
        "--seq-len", type=int, help="tokens per sequence (default: data.max_len, image tokens included)"
    )
    plan.add_argument("--checkpointing", action="store_true", help="plan with gradient checkpointing")
    plan.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")
    try:  # every input is checked before the model is loaded
        recipe = load_recipe(args.recipe, overrides)
        ds_config = load_ds_config(args.config)
        world = args.world_size if args.dry_run and args.world_size else world_size()
        if world < 1:
            raise ValueError(f"--world-size must be >= 1, got {world}")
        micro, _ = plan_batches(recipe.train, world, ds_config)
        check_setup(recipe.molora.expert_parallel_size, world, zero_stage(ds_config))
        if args.dry_run:
            return dry_run(args, recipe, ds_config, world, micro)
        if args.eval_only != (args.adapter is not None):
            raise ValueError(
                "--eval-only and --adapter PATH go together: evaluate a saved adapter, no training"
            )
        if args.eval_only:
            from molora_ds.evaluate import check_adapter

            check_adapter(args.adapter)
        resume_from = checkpoint.resolve_resume(args.resume, Path(args.output_dir) / "checkpoints")
        if resume_from is not None:
            checkpoint.check_stage(resume_from, zero_stage(ds_config))
            checkpoint.check_expert_parallel(resume_from, recipe.molora.expert_parallel_size, world)
        # Then the data (read and converted in full, so a bad row fails now) and the model's config.
        from molora_ds.data.formats import check_data

        check_data(recipe.data)
        from molora_ds.models.loading import check_model

        check_model(recipe.model)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.eval_only:
        from molora_ds.evaluate import evaluate_adapter

        evaluate_adapter(recipe, args.adapter, Path(args.output_dir))
        return 0

    from molora_ds.trainer import NonFiniteLossError, Trainer  # heavy imports after the cheap checks

    try:
        results = Trainer(recipe, ds_config, Path(args.output_dir), resume=args.resume).fit()
    except NonFiniteLossError as e:  # a diverged run: say why in one line, not in a traceback per rank
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0 if results["status"] in ("finished", "preempted") else 1


def dry_run(args: argparse.Namespace, recipe, ds_config: dict, world: int, micro: int) -> int:
    """Print the memory plan; ``bf16.enabled: "auto"`` plans for a GPU, where it is on."""
    from molora_ds import plan

    gpu_memory = plan.parse_size(args.gpu_memory)
    config = plan.model_config(recipe.model)
    seq_len = args.seq_len or recipe.data.max_len  # image tokens included
    bf16 = ds_config.get("bf16", {}).get("enabled", False) in (True, "auto")
    model = plan.meta_model(config)
    result = plan.memory_plan(
        recipe, ds_config, world, micro, seq_len, bf16, gpu_memory, args.checkpointing, model=model
    )
    print(json.dumps(result.to_dict()) if args.json else plan.format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
