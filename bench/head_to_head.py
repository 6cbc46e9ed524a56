"""Our MoE-LoRA + gRAdamW against what a user would pick instead: same model, data, steps, batch, evaluation.

    python bench/head_to_head.py              # small: SmolLM2-135M, Rotten Tomatoes, 100 steps of 8, lr grid on val
    python bench/head_to_head.py --quick      # 12 steps, one lr, 40 questions (a few minutes; CI)
    python bench/head_to_head.py --seeds 3    # more seeds on the test split (the lr choice stays the first seed's)
    python bench/head_to_head.py --report     # table and plot from the runs finished so far

Contenders (``CONTENDERS``), all on q_proj / v_proj with alpha / r = 4, dropout 0.05, AdamW betas, eps and weight
decay of our defaults, the recipe's linear lr decay:

    lora+adamw            PEFT LoRA (``peft.get_peft_model``) whose rank gives as many trainable parameters as our
                          MoE-LoRA's experts and routers (``matched_rank``), ``torch.optim.AdamW``
    lora+peft-riemannian  the same LoRA, ``peft.optimizers.create_riemannian_optimizer(model, torch.optim.AdamW)``
                          with PEFT's default ``reg`` (1e-2)
    loop-molora+gradamw   our MoE-LoRA computed as the paper's reference code computes it (``ExpertLoopLinear``):
                          a tensor pair per expert and a Python loop over all E experts in the forward, an r x r
                          preconditioner per expert in the optimizer; same math, same initial weights as ours
    molora+gradamw        ours: ``launch/train.py`` (DeepSpeed ZeRO-0) with MoLoRALinear and gRAdamW

Every run goes through ``reproduce.execute`` (its own folder, ``--resume auto``, a finished run's summary is read
back, not rerun), so an interrupted comparison continues where it stopped. The first seed's test run of a contender
with a grid starts from its validation run's final checkpoint (``reuse_training``): same seed, lr and data order, so
the same training; it only scores the test split. The baselines run in a subprocess of this
script (``--contender``), a training loop with the trainer's data order, loss, lr schedule, dropout seeds and
evaluation (``molora_ds.eval.mc_accuracy``, log-likelihood over the answer letters). The lr of each lora contender,
and of ours, is the grid value with the method's own best accuracy on the validation split; the loop contender, the
same method as ours, takes ours'. Cost: each step's own time (batching, forward, backward, update), wall-clock summed
over the run and as a median per step, and the training process's CPU time per step (all its threads), which other
jobs on a shared machine barely change with one thread per process (``--threads``, default 1; wall time
there swings by 2x and more).
Outputs in ``--out`` (docs/results/head_to_head/<scale>/): a JSON per run (``runs/``), ``table.md``, ``head_to_head.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from reproduce import (  # bench/ is on sys.path
    SCALES,
    SMALL_GRIDS,
    Run,
    Scale,
    before_training,
    best_lr,
    execute,
    write_splits,
)
from torch import nn

from molora_ds.config import MoLoRAConfig
from molora_ds.modules.molora import MoLoRALinear
from molora_ds.recipe import Recipe, load_recipe

OURS, LOOP = "molora+gradamw", "loop-molora+gradamw"
# contender -> the recipe's optim section (lr, betas, eps, weight decay; method for ours and the loop)
CONTENDERS = {
    OURS: {"method": "gradamw"},
    "lora+adamw": {"method": "adamw"},
    "lora+peft-riemannian": {"method": "radamw"},
    LOOP: {"method": "gradamw"},
}
GRID_CONTENDERS = ("lora+adamw", "lora+peft-riemannian", OURS)  # the loop takes ours' lr
# --quick's one lr: the small grid's value at which every contender trains (docs/results/head_to_head/small). The
# PEFT LoRA of matched rank (92) spikes to ~11 nats at 2e-3 and collapses to one class at 5e-3 (reproduce's quick
# AdamW lr, fine for MoE-LoRA): a 12-step CI run at 5e-3 diverged on one machine and not on another.
QUICK_LR = (5e-4,)


def scale_for(name: str, seeds: int) -> Scale:
    """reproduce.py's scale, cut to its first task and (E, k, r), one AdamW-family lr grid for all."""
    s = SCALES[name]
    grid = QUICK_LR if name == "quick" else SMALL_GRIDS["adamw"]
    return dataclasses.replace(
        s, tasks=s.tasks[:1], experts=s.experts[:1], seeds=tuple(range(seeds)), grids={"adamw": grid}
    )


# ------------------------------------------------------------------------------------ contenders
def molora_params(model: nn.Module, cfg: MoLoRAConfig) -> tuple[int, int]:
    """(trainable parameters of our MoE-LoRA on ``model``, sum of in + out over its target Linears)."""
    from molora_ds.inject import matches

    linears = [m for n, m in model.named_modules() if n and matches(n, cfg.target_modules)]
    ours = sum(
        cfg.num_experts * (cfg.rank * (m.in_features + m.out_features) + m.in_features) for m in linears
    )
    return ours, sum(m.in_features + m.out_features for m in linears)


def matched_rank(model: nn.Module, cfg: MoLoRAConfig) -> int:
    """The LoRA rank whose r * (in + out) per target comes closest to our MoE-LoRA's trainable parameters."""
    ours, per_rank = molora_params(model, cfg)
    return max(1, round(ours / per_rank))


def build_lora(model: nn.Module, recipe: Recipe, riemannian: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    from peft import LoraConfig, get_peft_model

    m, o = recipe.molora, recipe.optim
    rank = matched_rank(model, m)
    cfg = LoraConfig(r=rank, lora_alpha=m.alpha / m.rank * rank, lora_dropout=m.dropout,
                     target_modules=list(m.target_modules), bias="none")  # fmt: skip
    peft_model = get_peft_model(model, cfg)
    kwargs = {"lr": o.lr, "betas": o.betas, "eps": o.eps, "weight_decay": o.weight_decay}
    if riemannian:
        from peft.optimizers import create_riemannian_optimizer

        optimizer = create_riemannian_optimizer(peft_model, torch.optim.AdamW, **kwargs)
    else:
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], **kwargs)
    # The inner model holds the LoRA layers and takes logits_to_keep (PeftModel's forward hides it).
    return peft_model.get_base_model(), optimizer


class ExpertLoopLinear(nn.Module):
    """``MoLoRALinear``'s function, computed as the paper's reference code does: ``y = W x + sum_i out_i``
    over all E experts in a Python loop, ``out_i = g_i * s B_i A_i dropout(x)`` (g_i = 0 outside the top-k).
    Gate rescaling is written into the forward: ``sqrt(g_i) out_i + (g_i - sqrt(g_i)) stop_grad(out_i)`` has
    the value ``g_i out_i``, the expert's gradient through sqrt(g_i) and the gate's through out_i."""

    def __init__(self, layer: MoLoRALinear) -> None:
        super().__init__()
        self.base_layer, self.router, self.dropout = layer.base_layer, layer.router, layer.dropout
        self.scaling, self.gate_rescale = layer.scaling, layer.gate_rescale
        self.lora_A = nn.ParameterList([nn.Parameter(a.detach().clone()) for a in layer.lora_A])
        self.lora_B = nn.ParameterList([nn.Parameter(b.detach().clone()) for b in layer.lora_B])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        tokens = x.reshape(-1, x.shape[-1])
        gates, _ = self.router(tokens)
        dropped = self.dropout(tokens)
        delta = 0
        for i, (a, b) in enumerate(zip(self.lora_A, self.lora_B)):
            out = self.scaling * (dropped @ a.T) @ b.T
            g = gates[:, i : i + 1].to(out.dtype)
            if self.gate_rescale:
                root = g.sqrt().detach()
                delta = delta + root * out + (g - root) * out.detach()
            else:
                delta = delta + g * out
        return y + delta.reshape(y.shape)


def build_loop(model: nn.Module, recipe: Recipe) -> tuple[nn.Module, torch.optim.Optimizer]:
    from molora_ds.inject import apply_molora, molora_layers
    from molora_ds.optim.optimizers import MoLoRAAdamW

    apply_molora(model, recipe.molora)  # ours first: the same initial weights, then one module per expert
    loops = []
    for name, layer in molora_layers(model).items():
        parent, _, child = name.rpartition(".")
        loops.append(ExpertLoopLinear(layer))
        setattr(model.get_submodule(parent), child, loops[-1])
    o = recipe.optim
    groups = [
        {"name": "experts", "params": [p for m in loops for p in (*m.lora_A, *m.lora_B)], "lr": o.lr,
         "weight_decay": o.weight_decay},
        {"name": "router", "params": [m.router.weight for m in loops], "lr": o.gate_lr, "weight_decay": 0.0,
         "max_grad_norm": o.gate_max_grad_norm},
    ]  # fmt: skip
    pairs = [pair for m in loops for pair in zip(m.lora_A, m.lora_B)]  # preconditioned one expert at a time
    optimizer = MoLoRAAdamW(groups, pairs=pairs, reg=o.reg, lr=o.lr, betas=o.betas, eps=o.eps,
                            correct_bias=o.correct_bias, foreach=False)  # fmt: skip
    return model, optimizer


BUILDERS = {
    "lora+adamw": lambda model, recipe: build_lora(model, recipe, riemannian=False),
    "lora+peft-riemannian": lambda model, recipe: build_lora(model, recipe, riemannian=True),
    LOOP: build_loop,
}


# ------------------------------------------------------------------------------------ baseline training
def train_contender(name: str, recipe_path: Path, out: Path, resume: bool) -> int:
    """Train one baseline as the trainer would, writing its files (metrics.jsonl, results.json) alike."""
    from molora_ds.data.formats import load_splits
    from molora_ds.data.multiple_choice import tokenize_mc
    from molora_ds.data.vision import StepBatches
    from molora_ds.ds_config import plan_batches
    from molora_ds.eval import logits_at, mc_accuracy
    from molora_ds.models.loading import load_model

    recipe = load_recipe(recipe_path)
    train, data = recipe.train, recipe.data
    model, tokenizer = load_model(recipe.model)
    torch.manual_seed(train.seed)
    net, optimizer = BUILDERS[name](model, recipe)
    net.train()
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    train_set, eval_set = load_splits(data, train.seed)
    micro, accum = plan_batches(train, 1, {})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = tokenize_mc(train_set, tokenizer, data.max_len, data.prompt)
    batches = StepBatches(rows, train.global_batch, micro, accum, 1, 0, train.seed, pad_id)
    base_lrs = [g["lr"] for g in optimizer.param_groups]

    def evaluate() -> dict:
        ev = recipe.eval
        return mc_accuracy(
            net, tokenizer, eval_set, ev.method, ev.batch_size, data.max_len, prompt=data.prompt
        )

    ckpt = out / "checkpoint.pt"
    state = {"step": 0, "metrics": [], "results": {}}
    if resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        with torch.no_grad():
            for n, t in state.pop("params").items():
                trainable[n].copy_(t)
        optimizer.load_state_dict(state.pop("optimizer"))
    elif recipe.eval.before:
        state["results"]["accuracy_before"] = evaluate()
    metrics, skipped = state["metrics"], sum(r["skipped"] for r in state["metrics"])

    def save(step: int) -> None:
        params = {n: p.detach().clone() for n, p in trainable.items()}
        blob = {"step": step, "metrics": metrics, "results": state["results"], "params": params,
                "optimizer": optimizer.state_dict()}  # fmt: skip
        torch.save(blob, ckpt.with_suffix(".tmp"))
        ckpt.with_suffix(".tmp").replace(ckpt)
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))

    for step in range(state["step"], train.max_steps):
        t0, cpu0 = time.perf_counter(), time.process_time()
        factor = train.lr_factor(step)
        for g, lr in zip(optimizer.param_groups, base_lrs):
            g["lr"] = lr * factor
        parts = batches[step]
        targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in parts)
        loss_sum = 0.0
        for i, b in enumerate(parts):
            torch.manual_seed((train.seed * 1_000_003 + step) * 1_000_033 + i)  # the trainer's dropout masks
            labels = b["labels"][:, 1:]
            keep = (labels != -100).any(dim=0).nonzero().flatten()
            logits = logits_at(
                net, {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}, keep
            )
            token_loss = F.cross_entropy(
                logits.flatten(0, 1).float(), labels[:, keep].flatten(), reduction="sum"
            )
            (token_loss / targets).backward()
            loss_sum += token_loss.item()
        bad = not math.isfinite(loss_sum)
        if not bad:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        tokens = sum(int(b["attention_mask"].sum()) for b in parts)
        metrics.append({"step": step + 1, "loss": loss_sum / targets, "tokens_per_s": tokens / seconds,
                        "seconds": seconds, "cpu_seconds": time.process_time() - cpu0, "skipped": int(bad)})  # fmt: skip
        skipped += bad
        if skipped >= train.max_bad_steps:
            print(f"error: loss was non-finite in {skipped} steps; lower optim.lr", file=sys.stderr)
            return 1
        if (step + 1) % train.save_every == 0 or step + 1 == train.max_steps:
            save(step + 1)
        if (step + 1) % train.log_every == 0:
            print(
                f"step {step + 1}/{train.max_steps} loss {metrics[-1]['loss']:.4f} {seconds:.2f} s",
                flush=True,
            )
    results = state["results"] | {"accuracy_after": evaluate()} if recipe.eval.after else state["results"]
    results |= {"status": "finished", "step": train.max_steps, "skipped_steps": skipped,
                "trainable_params": sum(p.numel() for p in trainable.values())}  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return 0


# ------------------------------------------------------------------------------------ comparison
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="12 steps, one lr, 40 questions")
    p.add_argument("--seeds", type=int, default=1, help="seeds on the test split (default: %(default)s)")
    p.add_argument(
        "--report", action="store_true", help="write the table and plot from the runs finished so far"
    )
    p.add_argument("--model", help="another model than the scale's (e.g. tiny-llama, for tests)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads per training process (default: %(default)s)"
    )
    p.add_argument("--launcher", default=sys.executable)
    p.add_argument("--work-dir", default="runs/head_to_head", help="run folders (checkpoints; not committed)")
    p.add_argument("--out", default="docs/results/head_to_head", help="summaries, table and plot")
    # one baseline run, started by reproduce.execute
    p.add_argument("--contender", choices=sorted(BUILDERS), help=argparse.SUPPRESS)
    p.add_argument("--recipe", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--output-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--resume", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.contender:
        return train_contender(args.contender, args.recipe, args.output_dir, args.resume is not None)

    name = "quick" if args.quick else "small"
    scale = scale_for(name, args.seeds)
    if args.model:
        scale = dataclasses.replace(scale, model=args.model)
    work, out = Path(args.work_dir) / name, Path(args.out) / name
    launcher = shlex.split(args.launcher)
    # With one thread a process's CPU time is its compute; with more, threads that spin-wait for a core the
    # machine's other jobs hold count too (seen: 8x between two runs of the same contender).
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.report:
        write_report(
            scale, name, [json.loads(f.read_text()) for f in sorted((out / "runs").glob("*.json"))], out
        )
        return 0
    grid = scale.grids["adamw"]
    t0 = time.perf_counter()

    def run(r: Run) -> dict:
        entry = None if r.method == OURS else ["bench/head_to_head.py", "--contender", r.method]
        # The adapters start as the base model (B = 0): one evaluation before training (ours, test) says it all.
        sections = {"optim": CONTENDERS[r.method], "eval": {"before": r.method == OURS and r.split == "test"}}
        try:
            summary = execute(scale, r, data[r.task], work, out, launcher, sections, entry)
        except RuntimeError:
            if "non-finite" not in (work / "runs" / r.name / "log.txt").read_text()[-2000:]:
                raise
            # a diverged grid point is a result (this lr is too large), kept so that a rerun skips it
            summary = {**dataclasses.asdict(r), "accuracy_after": None, "diverged": True}
            (out / "runs" / f"{r.name}.json").write_text(json.dumps(summary, indent=1))
        print(
            f"[{(time.perf_counter() - t0) / 60:.0f} min] {r.name}: accuracy {summary['accuracy_after']}",
            flush=True,
        )
        return summary

    data = {task: write_splits(scale, task, work) for task in scale.tasks}
    seed, experts = scale.seeds[0], scale.experts[0]
    # The grid's middle lr first, all contenders side by side at it, then the others: an interrupted comparison
    # has compared every contender at one lr, and each lr's runs ran close in time (similar machine load).
    order = sorted(grid, key=lambda lr: abs(grid.index(lr) - (len(grid) - 1) / 2)) if len(grid) > 1 else []
    val = [
        run(Run(t, experts, c, seed, lr, "val")) for t in scale.tasks for lr in order for c in GRID_CONTENDERS
    ]
    lrs = {(t, c): best_lr(val, t, c) if val else grid[0] for t in scale.tasks for c in GRID_CONTENDERS}
    lrs |= {(t, LOOP): lrs[t, OURS] for t in scale.tasks}  # the same method as ours
    test = []
    for t in scale.tasks:
        for s in scale.seeds:
            for c in CONTENDERS:
                test_run = Run(t, experts, c, s, lrs[t, c], "test")
                if val:
                    reuse_training(work, dataclasses.replace(test_run, split="val"), test_run)
                test.append(run(test_run))
    write_report(scale, name, val + test, out)
    print(f"results: {out}")
    return 0


def reuse_training(work: Path, val: Run, test: Run) -> None:
    """Start ``test`` from the final checkpoint of ``val`` when that run finished: the two differ only in the split
    they are scored on, and a run is a function of its seed, lr and data order (dropout masks included), so
    training again would repeat the same steps. The test run then only evaluates; its summary keeps the steps'
    losses and times."""
    src, dst = work / "runs" / val.name, work / "runs" / test.name
    if dst.exists() or not (src / "results.json").is_file():
        return
    keep = shutil.ignore_patterns(
        "results.json", "run.lock", "adapter", "log.txt", "*.yaml", "ds_config.json"
    )
    shutil.copytree(src, dst, ignore=keep)


def write_report(scale: Scale, name: str, summaries: list[dict], out: Path) -> None:
    """table.md and head_to_head.png from the runs' summaries (a contender without a test run yet shows its grid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = statistics.mean
    model = next(r["model"] for r in summaries if "model" in r)
    test = [r for r in summaries if r["split"] == "test" and not r.get("diverged")]
    rows = []
    for c in CONTENDERS:
        runs = [r for r in test if r["method"] == c]
        grid = {r["lr"]: r["accuracy_after"] for r in summaries if r["method"] == c and r["split"] == "val"}
        if runs or grid:
            rows.append({
                "contender": c,
                "grid": "as ours" if c == LOOP else ", ".join(f"{lr:g}: {'diverged' if a is None else f'{a:.3f}'}"
                                                              for lr, a in sorted(grid.items())),
                "lr": f"{runs[0]['lr']:g}" if runs else "pending",
                "params": f"{runs[0]['trainable_params']:,}" if runs else "",
                "accuracy": [r["accuracy_after"] for r in runs],
                "seconds": [r["train_seconds"] for r in runs],
                "wall": [r["step_seconds_median"] for r in runs],
                "cpu": [r["step_cpu_seconds_median"] for r in runs],
            })  # fmt: skip
    ours_cpu = next((mean(r["cpu"]) for r in rows if r["contender"] == OURS and r["cpu"]), math.nan)
    cell = lambda xs, f: (
        (f"{mean(xs):{f}}" + (f" ± {statistics.stdev(xs):{f}}" if len(xs) > 1 else "")) if xs else ""
    )  # noqa: E731
    lines = [
        f"Scale `{name}`: {model}, {scale.tasks[0]}, {scale.steps} steps of {scale.global_batch}, seeds "
        f"{list(scale.seeds)}; {test[0]['eval_questions'] if test else '?'} test questions, accuracy before "
        f"training: {before_training(test) or 'not measured'}. Hardware: {next(r['hardware'] for r in summaries if 'hardware' in r)}, shared with "
        "other jobs whose load changed from run to run: the wall times say little, the CPU seconds of the training "
        "process (one torch thread unless --threads said otherwise) are the comparable cost.",
        "",
        "| contender | trainable params | lr chosen (validation accuracy per lr) | test accuracy | train s (wall) | "
        "s/step wall (median) | CPU s/step (median) | CPU / ours |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{mean(r['cpu']) / ours_cpu:.2f}" if r["cpu"] else ""
        lines.append(
            f"| {r['contender']} | {r['params']} | {r['lr']} ({r['grid'] or 'no grid'}) | {cell(r['accuracy'], '.3f')} "
            f"| {cell(r['seconds'], '.0f')} | {cell(r['wall'], '.2f')} | {cell(r['cpu'], '.2f')} | {ratio} |"
        )
    val = [r for r in summaries if r["split"] == "val"]
    val.sort(key=lambda r: (r["lr"], list(CONTENDERS).index(r["method"])))
    if val:
        lines += ["", f"Every validation run ({val[0].get('eval_questions', '?')} questions, seed {val[0]['seed']}):", "",
                  "| lr | contender | validation accuracy | train s (wall) | s/step wall (median) | CPU s/step (median) |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in val:
            figures = ("diverged", "", "", "") if r.get("diverged") else (
                f"{r['accuracy_after']:.3f}", f"{r['train_seconds']:.0f}", f"{r['step_seconds_median']:.2f}",
                f"{r['step_cpu_seconds_median']:.2f}")  # fmt: skip
            lines.append(f"| {r['lr']:g} | {r['method']} | " + " | ".join(figures) + " |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text("\n".join(lines) + "\n")

    # Every run that trained to the end: the test runs first, then the validation grid, by lr.
    shown = [r for r in test + val if not r.get("diverged")]
    if not shown:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [f"{r['method']}\n{r['split']} lr {r['lr']:g}" for r in shown]
    colors = [
        "tab:orange" if r["method"] == OURS else "tab:blue" if r["method"] == LOOP else "tab:gray"
        for r in shown
    ]
    for ax, key, label in ((axes[0], "accuracy_after", "accuracy after training"),
                           (axes[1], "step_cpu_seconds_median", "CPU seconds per step (median)")):  # fmt: skip
        ax.bar(range(len(shown)), [r[key] for r in shown], color=colors)
        ax.set_xticks(range(len(shown)), names, rotation=60, ha="right", fontsize=7)
        ax.set(
            ylabel=label,
            title=f"{model}, {scale.tasks[0]}, {scale.steps} steps of {scale.global_batch}",
        )
    for before in {r["accuracy_before"] for r in test} - {None}:
        axes[0].axhline(before, color="k", lw=0.8, ls="--", label="before training (test split)")
        axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "head_to_head.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
