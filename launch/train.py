"""Train MoLoRA adapters with DeepSpeed.

deepspeed launch/train.py --config ds_configs/zero2.json            # the embedded default
torchrun --nproc_per_node 2 launch/train.py --config ds_configs/zero3.json --recipe recipes/tiny.yaml
python launch/train.py --config ds_configs/zero0.json --set train.max_steps=10
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from molora_ds import checkpoint
from molora_ds.distributed.env import world_size
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
        plan_batches(recipe.train, world_size(), ds_config)
        resume_from = checkpoint.resolve_resume(args.resume, Path(args.output_dir) / "checkpoints")
        if resume_from is not None:
            checkpoint.check_stage(resume_from, zero_stage(ds_config))
        # Then the data (read and converted in full, so a bad row fails now) and the model's config.
        from molora_ds.data.formats import check_data

        check_data(recipe.data)
        from molora_ds.models.loading import check_model

        check_model(recipe.model)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from molora_ds.trainer import NonFiniteLossError, Trainer  # heavy imports after the cheap checks

    try:
        results = Trainer(recipe, ds_config, Path(args.output_dir), resume=args.resume).fit()
    except NonFiniteLossError as e:  # a diverged run: say why in one line, not in a traceback per rank
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0 if results["status"] in ("finished", "preempted") else 1


if __name__ == "__main__":
    sys.exit(main())
