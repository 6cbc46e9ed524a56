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
from molora_ds.distributed.env import rank, world_size
from molora_ds.distributed.expert_parallel import check_setup
from molora_ds.ds_config import check_fp16, load_ds_config, plan_batches, zero_stage
from molora_ds.recipe import Recipe, load_recipe
from molora_ds.run_dir import check_claim, check_resume_target, claim

log = logging.getLogger("molora_ds")

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
    p.add_argument(
        "--resume", nargs="?", const="auto", help="'auto' (newest valid checkpoint, if any) or a path"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an --output-dir that holds a run: the old run is moved aside, not deleted",
    )
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
        "--gpus-per-node", type=int, default=8, help="ranks per node, for host memory (default: 8)"
    )
    plan.add_argument(
        "--seq-len", type=int, help="tokens per sequence (default: data.max_len, image tokens included)"
    )
    plan.add_argument(
        "--checkpointing",
        action="store_true",
        help="plan with gradient checkpointing (on when the recipe's model.gradient_checkpointing is)",
    )
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
        check_fp16(ds_config)
        if args.eval_only != (args.adapter is not None):
            raise ValueError(
                "--eval-only and --adapter PATH go together: evaluate a saved adapter, no training"
            )
        out, resume_from, notes = Path(args.output_dir), None, []
        if args.eval_only:  # adds eval_results.json to --output-dir: no run of its own, no ownership
            from molora_ds.evaluate import check_adapter

            check_adapter(args.adapter)
        else:
            resume_from, notes = check_run_folder(args, out, recipe, ds_config, world)
        check_model_and_data(recipe)
        # Last, once every input is known good: only now may the run folder be created.
        lock = None
        if rank() == 0 and not args.eval_only:  # the other ranks write only where rank 0 tells them
            lock, moved = claim(out, resume=args.resume is not None, overwrite=args.overwrite)
            notes += [f"--overwrite: the run that was in {out} is now in {moved}"] if moved else []
    except (OSError, ValueError) as e:  # OSError: a run folder that cannot be created or moved
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank() == 0:
        for note in notes:
            log.info(note)

    if args.eval_only:
        from molora_ds.evaluate import evaluate_adapter

        evaluate_adapter(recipe, args.adapter, out)
        return 0
    try:
        return train(recipe, ds_config, out, resume_from)
    finally:
        if lock is not None:
            lock.release()


def check_run_folder(
    args: argparse.Namespace, out: Path, recipe: Recipe, ds_config: dict, world: int
) -> tuple[Path | None, list[str]]:
    """The refusals about --output-dir and --resume (none creates anything); returns the checkpoint to
    resume from and the lines to log about it."""
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --output-dir, --overwrite moves it aside: pass one")
    if rank() == 0:
        check_claim(out, resume=args.resume is not None, overwrite=args.overwrite)
    resume_from, notes = checkpoint.resolve_resume(args.resume, out / "checkpoints")
    if resume_from is not None:
        check_resume_target(resume_from, out)
        checkpoint.check_stage(resume_from, zero_stage(ds_config))
        checkpoint.check_expert_parallel(
            resume_from, recipe.molora.expert_parallel_size, world, zero_stage(ds_config)
        )
        notes += resume_notes(resume_from, recipe)
    elif args.resume:
        notes.append(f"--resume {args.resume}: no checkpoint in {out} yet, starting at step 0")
    return resume_from, notes


def check_model_and_data(recipe: Recipe) -> None:
    """What the model and data can get wrong, found without the weights: the model's config and
    class, the targets (matched on the model built on the meta device), and the data read, split
    and tokenised as the run will (bad rows, eval_size, max_len)."""
    from molora_ds.data.formats import check_data

    check_data(recipe.data)  # the rows alone first: fails fast, before transformers is imported
    from molora_ds.data.vision import vision_prompt
    from molora_ds.inject import find_targets
    from molora_ds.models.loading import check_model, load_processor, load_tokenizer, meta_model

    check_model(recipe.model)
    find_targets(meta_model(recipe.model), recipe.molora)
    processor = load_processor(recipe.model)
    vision = vision_prompt(processor) if processor is not None else None
    tokenizer = processor.tokenizer if processor is not None else load_tokenizer(recipe.model)
    check_data(recipe.data, recipe.train.seed, tokenizer, vision)


def train(recipe: Recipe, ds_config: dict, out: Path, resume_from: Path | None) -> int:
    from molora_ds.trainer import NonFiniteLossError, Trainer  # heavy imports after the cheap checks

    try:
        results = Trainer(recipe, ds_config, out, resume_from=resume_from).fit()
    except NonFiniteLossError as e:  # a diverged run: say why in one line, not in a traceback per rank
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0 if results["status"] in ("finished", "preempted") else 1


def resume_notes(tag_dir: Path, recipe: Recipe) -> list[str]:
    """What a resumed run changes against its checkpoint's recipe, and the lr it goes on with."""
    changes = checkpoint.recipe_changes(tag_dir, recipe.to_dict())
    if not changes:
        return []
    step = checkpoint.read_meta(tag_dir)["step"]
    lr = recipe.optim.lr * recipe.train.lr_factor(step)
    return [
        f"resume: recipe changed since {tag_dir.name}, applied: {'; '.join(changes)}. The lr schedule follows the "
        f"new recipe: step {step + 1} uses lr {lr:.3g}"
    ]


def dry_run(args: argparse.Namespace, recipe, ds_config: dict, world: int, micro: int) -> int:
    """Print the memory plan; ``bf16.enabled: "auto"`` plans for a GPU, where it is on."""
    from molora_ds import plan

    gpu_memory = plan.parse_size(args.gpu_memory)
    config = plan.model_config(recipe.model)
    seq_len = args.seq_len or recipe.data.max_len  # image tokens included
    bf16 = ds_config.get("bf16", {}).get("enabled", False) in (True, "auto")
    model = plan.meta_model(config)
    checkpointing = args.checkpointing or recipe.model.gradient_checkpointing
    result = plan.memory_plan(
        recipe, ds_config, world, micro, seq_len, bf16, gpu_memory, checkpointing, model, args.gpus_per_node
    )
    print(json.dumps(result.to_dict()) if args.json else plan.format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
