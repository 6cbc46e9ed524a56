"""Does gate rescaling help? The paper's comparison, at a scale this machine allows, one command.

    python bench/reproduce.py                 # small scale: SmolLM2-135M, 2 tasks, 2 (E, k, r), 3 seeds (hours)
    python bench/reproduce.py --quick         # 1 task, 1 seed, 12 steps, no lr grid (minutes; CI)
    python bench/reproduce.py --jobs 2        # two runs at a time, the cores split between them
    python bench/reproduce.py --scale paper --model DIR --launcher "torchrun --nproc_per_node 8"   # the paper's
                                              # settings and QA tasks on GPUs; data files from recipes/paper_*.yaml

Methods: sgd, adamw, their Riemannian versions rsgd, radamw, the gate-rescaled grsgd, gradamw, and the
ablation "sqrt trick without the preconditioner" (sgd+sqrt, adamw+sqrt). Pairs are compared at one lr,
chosen from a small grid by the *baseline's* accuracy on a validation split (so the choice cannot favour
gate rescaling); both members then train at that lr and are scored on a test split that no choice saw.

Every run is ``launch/train.py`` in its own folder under ``--work-dir`` with ``--resume auto``: a run that
finished is read back, one that was interrupted resumes from its checkpoint. So a rerun after an
interruption continues where it stopped. Outputs go to ``--out`` (docs/results/ by default): a JSON per
run, ``table.md`` (mean and spread per method and task), ``lr_choice.md``, loss curves per task as PNG and
``figure2.png`` (the paper's Figure 2 view: loss and accuracy, g-methods against their baselines).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = {
    "sgd": {"method": "sgd"},
    "sgd+sqrt": {"method": "sgd", "gate_rescale": True},
    "rsgd": {"method": "rsgd"},
    "grsgd": {"method": "grsgd"},
    "adamw": {"method": "adamw"},
    "adamw+sqrt": {"method": "adamw", "gate_rescale": True},
    "radamw": {"method": "radamw"},
    "gradamw": {"method": "gradamw"},
}
# (baseline, gate-rescaled): each pair shares the lr its baseline chose.
PAIRS = [("rsgd", "grsgd"), ("radamw", "gradamw"), ("sgd", "sgd+sqrt"), ("adamw", "adamw+sqrt")]


@dataclass(frozen=True)
class Scale:
    model: str
    tasks: tuple[str, ...]
    experts: tuple[tuple[int, int, int], ...]  # (E, top_k, r)
    seeds: tuple[int, ...]
    steps: int
    global_batch: int
    max_len: int
    val_size: int
    test_size: int
    # lr grid per baseline; a grid of one value means no choice is made
    grids: dict[str, tuple[float, ...]] = field(default_factory=dict)
    gate_lr: float = 1e-4
    ds_config: str = "ds_configs/zero0.json"
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    # task -> recipe whose data section names the user's files (published schema); else a built-in task
    data_recipes: dict[str, str] = field(default_factory=dict)
    prompt: str = "lettered"  # data.prompt: lettered (scored by log-likelihood) or paper (by generation)


# lrs for 100-step runs of batch 8 on SmolLM2: around the embedded default's 2e-3 for AdamW (the paper's 1e-5
# is for 2000 steps of batch 80). Plain SGD (no clipping: the first loss is ~6 nats, its gradients large) needs ~0.1; the Riemannian SGDs scale A's
# gradient by (B^T B + reg)^-1, large while B is small, so ~100x less. Seen in 12-step runs: SGD at 1 and 8,
# gRSGD at 0.03 and 0.1 diverge (gate rescaling multiplies expert gradients by 1/sqrt(g) ~ 3 at top-10 of 20).
SMALL_GRIDS = {
    "adamw": (5e-4, 2e-3, 5e-3),
    "radamw": (5e-4, 2e-3, 5e-3),
    "sgd": (0.03, 0.1, 0.3),
    "rsgd": (1e-3, 3e-3, 1e-2),
}
PAPER_TASKS = ("science_qa", "commonsense_qa", "openbookqa", "social_iqa")
SCALES = {
    "quick": Scale(
        "smollm2-135m", ("rotten_tomatoes",), ((20, 10, 4),), (0,), 12, 8, 64, 40, 40,
        grids={"adamw": (5e-3,), "radamw": (5e-3,), "sgd": (0.1,), "rsgd": (3e-3,)},
    ),
    "small": Scale(
        "smollm2-135m", ("rotten_tomatoes", "bigbench/social_iqa"), ((20, 10, 4), (8, 2, 8)), (0, 1, 2), 100, 8,
        96, 200, 300, grids=SMALL_GRIDS,
    ),
    # DESIGN.md section 5: Llama-3.2-3B (give its folder with --model), the paper's four QA tasks from the
    # user's files (recipes/paper_<task>.yaml name them: edit data.train / data.eval there, or --data-recipes
    # DIR for copies), batch 80, 2000 steps, the paper's lrs and prompt; the test split is the task's eval
    # file, train holds out no validation rows (one lr per method: nothing to choose).
    "paper": Scale(
        "llama-3.2-3b", PAPER_TASKS, ((20, 10, 4), (8, 2, 8)), (0, 1, 2), 2000, 80, 256, 0, 1000,
        grids={"adamw": (1e-5,), "radamw": (1e-5,), "sgd": (3e-5,), "rsgd": (3e-5,)},
        gate_lr=3e-8, ds_config="ds_configs/zero2.json", targets=("q_proj", "k_proj", "v_proj", "o_proj"),
        data_recipes={t: str(ROOT / "recipes" / f"paper_{t}.yaml") for t in PAPER_TASKS}, prompt="paper",
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Run:
    task: str
    experts: tuple[int, int, int]
    method: str
    seed: int
    lr: float
    split: str  # "val" (lr choice) or "test"

    @property
    def name(self) -> str:
        e, k, r = self.experts
        task = self.task.replace("/", "-")
        return f"{task}__E{e}k{k}r{r}__{self.method}__seed{self.seed}__lr{self.lr:g}__{self.split}"


def write_splits(scale: Scale, task: str, work: Path) -> dict[str, Path]:
    """train / val / test as jsonl in format ``mc``; val and test come from the held-out groups."""
    from molora_ds.data.multiple_choice import load_mc_splits

    folder = work / "data" / task.replace("/", "-")
    paths = {s: folder / f"{s}.jsonl" for s in ("train", "val", "test")}
    if all(p.is_file() for p in paths.values()):
        return paths
    if task in scale.data_recipes:  # the user's train file, their eval file as the test split
        train, held = _user_splits(scale, task)
    else:
        train, held = load_mc_splits(task, scale.val_size + scale.test_size, seed=0)
    parts = {
        "train": train,
        "val": held.select(range(scale.val_size)),
        "test": held.select(range(scale.val_size, len(held))),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for split, ds in parts.items():
        rows = ds.rename_column("answer_index", "answer").to_list()
        tmp = paths[split].with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(paths[split])
    return paths


def _user_splits(scale: Scale, task: str):
    """(train, val + test rows) from the files a paper recipe names: val held out of train (seed 0), test
    from its eval file (at most ``test_size``, shuffled with seed 0); one line if a file is missing."""
    import datasets
    from datasets import concatenate_datasets

    from molora_ds.data.formats import for_model, read_mc
    from molora_ds.recipe import load_recipe

    datasets.disable_progress_bars()  # a bad file's error is then the only line
    data = load_recipe(scale.data_recipes[task]).data
    train = for_model(read_mc(data.format, data.train, "train", data.columns), False, data.train)
    test = for_model(read_mc(data.format, data.eval, "eval", data.columns), False, data.eval)
    test = test.shuffle(seed=0).select(range(min(scale.test_size, len(test))))
    train, test = (ds.remove_columns([c for c in ds.column_names if c == "image"]) for ds in (train, test))
    if scale.val_size:
        held = train.train_test_split(test_size=scale.val_size, seed=0)
        train, val = held["train"], held["test"]
        return train, concatenate_datasets([val, test])
    return train, test


def recipe(scale: Scale, run: Run, data: dict[str, Path], sections: dict | None = None) -> dict:
    """The run's recipe; ``sections`` add to or replace its keys, e.g. ``{"eval": {"before": False}}``."""
    e, k, r = run.experts
    base = {
        "model": scale.model,
        "data": {"format": "mc", "train": str(data["train"]), "eval": str(data[run.split]), "max_len": scale.max_len,
                 "prompt": scale.prompt},
        "molora": {"num_experts": e, "top_k": k, "rank": r, "alpha": 4.0 * r, "dropout": 0.05,
                   "target_modules": list(scale.targets)},
        "optim": METHODS.get(run.method, {}) | {"lr": run.lr, "gate_lr": scale.gate_lr},
        "train": {"global_batch": scale.global_batch, "max_micro_batch": 8, "max_steps": scale.steps,
                  "seed": run.seed, "save_every": max(10, scale.steps // 4), "keep_last": 1,
                  "log_every": max(1, scale.steps // 10)},
        "eval": {"method": "generate" if scale.prompt == "paper" else "loglik", "batch_size": 16},
    }  # fmt: skip
    sections = sections or {}
    return {key: value | sections[key] if key in sections else value for key, value in base.items()}


def execute(
    scale: Scale,
    run: Run,
    data: dict[str, Path],
    work: Path,
    out: Path,
    launcher: list[str],
    sections: dict | None = None,
    entry: list[str] | None = None,
) -> dict:
    """Train (or resume, or read back) one run; returns its summary, also written to ``out/runs``.

    ``entry``: the training script and its first arguments (default: ``launch/train.py --config``
    the scale's DeepSpeed config); it gets ``--recipe --output-dir --resume auto`` and must write
    ``results.json`` and ``metrics.jsonl`` as the trainer does.
    """
    summary_path = out / "runs" / f"{run.name}.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    folder = work / "runs" / run.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "reproduce_recipe.yaml").write_text(
        yaml.safe_dump(recipe(scale, run, data, sections), sort_keys=False)
    )
    results = folder / "results.json"
    if not (results.is_file() and json.loads(results.read_text()).get("status") == "finished"):
        entry = entry or ["launch/train.py", "--config", scale.ds_config]
        cmd = [*launcher, *entry, "--recipe", str(folder / "reproduce_recipe.yaml"), "--output-dir", str(folder),
               "--resume", "auto"]  # fmt: skip
        with (folder / "log.txt").open("a") as log:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise RuntimeError(f"{run.name}: launch/train.py exited {rc}; see {folder / 'log.txt'}")
    res = json.loads(results.read_text())
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    summary = {
        **{k: getattr(run, k) for k in ("task", "method", "seed", "lr", "split")},
        "experts": dict(zip(("num_experts", "top_k", "rank"), run.experts)),
        "model": scale.model,
        "steps": scale.steps,
        "global_batch": scale.global_batch,
        # None when the run resumed past step 0; B = 0 at the start, so every run of a task starts alike.
        "accuracy_before": res.get("accuracy_before", {}).get("accuracy"),
        "accuracy_after": res["accuracy_after"]["accuracy"],
        "eval_questions": res["accuracy_after"]["n"],
        "loss": [r["loss"] for r in rows],
        "skipped_steps": res["skipped_steps"],
        # the steps' own time: a run read back or resumed after an interruption reports the same
        "train_seconds": round(sum(r["seconds"] for r in rows), 1),
        "step_seconds_median": round(statistics.median(r["seconds"] for r in rows), 3),
        # CPU time of the training process (all threads): what a shared machine's other jobs barely change
        "step_cpu_seconds_median": round(statistics.median(r.get("cpu_seconds", math.nan) for r in rows), 3),
        "trainable_params": res.get("trainable_params"),
        "versions": versions(),
        "hardware": hardware(),
    }
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=1))
    return summary


def versions() -> dict[str, str]:
    import deepspeed
    import torch
    import transformers

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}  # fmt: skip


def hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"


def choice_runs(scale: Scale) -> list[Run]:
    """The baselines over their lr grid, first (E, k, r), first seed, scored on val."""
    return [
        Run(task, scale.experts[0], base, scale.seeds[0], lr, "val")
        for task in scale.tasks
        for base, _ in PAIRS
        if len(scale.grids[base]) > 1
        for lr in scale.grids[base]
    ]


def final_runs(scale: Scale, lrs: dict[tuple[str, str], float]) -> list[Run]:
    """Both members of every pair at the lr their baseline chose, every (E, k, r) and seed, scored on test."""
    return [
        Run(task, experts, method, seed, lrs[task, base], "test")
        for task in scale.tasks
        for experts in scale.experts
        for base, treated in PAIRS
        for method in (base, treated)
        for seed in scale.seeds
    ]


def chosen_lrs(scale: Scale, results: list[dict]) -> dict[tuple[str, str], float]:
    """(task, baseline) -> the grid lr with the baseline's best validation accuracy (ties: the smaller lr)."""
    out = {}
    for task in scale.tasks:
        for base, _ in PAIRS:
            grid = scale.grids[base]
            if len(grid) == 1:
                out[task, base] = grid[0]
                continue
            out[task, base] = best_lr(results, task, base)
    return out


def best_lr(results: list[dict], task: str, method: str) -> float:
    """The lr of ``method``'s best accuracy on ``task`` among ``results`` (ties: the smaller lr; runs without an
    accuracy, e.g. diverged ones, do not count)."""
    acc = {r["lr"]: r["accuracy_after"] for r in results
           if r["task"] == task and r["method"] == method and r["accuracy_after"] is not None}  # fmt: skip
    return max(sorted(acc), key=lambda lr: acc[lr])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="shorthand for --scale quick")
    p.add_argument("--scale", choices=sorted(SCALES), default="small")
    p.add_argument("--model", help="the model (a folder for --scale paper)")
    p.add_argument(
        "--data-recipes",
        type=Path,
        help="--scale paper: a folder of paper_<task>.yaml naming your data files",
    )
    p.add_argument("--launcher", default=f"{sys.executable}", help='e.g. "torchrun --nproc_per_node 8"')
    p.add_argument("--work-dir", default="runs/reproduce", help="run folders (checkpoints; not committed)")
    p.add_argument("--out", default="docs/results", help="summaries, tables and plots")
    p.add_argument(
        "--jobs", type=int, default=1, help="runs at a time (each its own launch; split the cores)"
    )
    p.add_argument(
        "--report", action="store_true", help="table and plots from the runs finished so far; runs nothing"
    )
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.jobs > 1:  # split the cores between the runs (each launch reads it when torch starts)
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    name = "quick" if args.quick else args.scale
    scale = SCALES[name]
    if args.model:
        scale = dataclasses.replace(scale, model=args.model)
    if args.data_recipes:
        recipes = {t: str(args.data_recipes / f"paper_{t}.yaml") for t in scale.data_recipes}
        scale = dataclasses.replace(scale, data_recipes=recipes)
    work, out = Path(args.work_dir) / name, Path(args.out) / name
    launcher = shlex.split(args.launcher)

    if args.report:
        return report_so_far(scale, name, out)
    try:
        data = {task: write_splits(scale, task, work) for task in scale.tasks}
    except (ValueError, OSError) as e:  # a data file missing or not in its format: one line, nothing trained
        print(f"error: {e}", file=sys.stderr)
        return 2
    choice = choice_runs(scale)
    total = len(choice) + len(final_runs(scale, _any_lr(scale)))
    t0 = time.perf_counter()

    def run_all(runs: list[Run], first: int) -> list[dict]:
        def one(run: Run) -> dict:
            result = execute(scale, run, data[run.task], work, out, launcher)
            done.append(run)
            print(f"[{first + len(done)}/{total}, {(time.perf_counter() - t0) / 60:.0f} min] {run.name}: "
                  f"accuracy {result['accuracy_after']:.3f}", flush=True)  # fmt: skip
            return result

        done: list[Run] = []
        with ThreadPoolExecutor(args.jobs) as pool:  # the runs are independent processes
            return list(pool.map(one, runs))

    chosen = run_all(choice, 0)
    lrs = chosen_lrs(scale, chosen)
    results = run_all(final_runs(scale, lrs), len(choice))
    write_report(scale, name, results, chosen, lrs, out)
    print(f"results: {out}")
    return 0


# ------------------------------------------------------------------------------------------ report
def report_so_far(scale: Scale, name: str, out: Path) -> int:
    """``--report``: the report of the finished runs' summaries; a pair's lr only once its whole grid ran."""
    summaries = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    chosen = [s for s in summaries if s["split"] == "val"]
    results = [s for s in summaries if s["split"] == "test"]
    if not results:
        print(f"no test run has finished yet under {out / 'runs'} ({len(chosen)} validation runs)")
        return 1
    lrs = {(task, base): chosen_lrs(scale, chosen)[task, base]
           for task in scale.tasks for base, _ in PAIRS
           if {r["lr"] for r in chosen if (r["task"], r["method"]) == (task, base)} >= set(scale.grids[base])
           or len(scale.grids[base]) == 1}  # fmt: skip
    total = len(choice_runs(scale)) + len(final_runs(scale, _any_lr(scale)))
    partial = f"{len(summaries)} of {total}" if len(summaries) < total else ""
    write_report(scale, name, results, chosen, lrs, out, partial=partial)
    print(f"results so far ({len(summaries)} of {total} runs): {out}")
    return 0


def _any_lr(scale: Scale) -> dict[tuple[str, str], float]:
    """A placeholder lr per (task, baseline), to count the final runs before any lr is chosen."""
    return dict.fromkeys(((t, b) for t in scale.tasks for b, _ in PAIRS), 0.0)


def _mean_sd(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def write_report(
    scale: Scale, name: str, results: list[dict], chosen: list[dict], lrs: dict, out: Path, partial: str = ""
) -> None:
    """table.md, lr_choice.md, loss_<task>.png and figure2.png from the runs' summaries.

    ``partial``: e.g. "40 of 120" when not every run has finished (the cells give their seed count)."""
    configs = sorted({tuple(r["experts"].values()) for r in results})
    lines = [f"Scale `{name}`: {scale.model}, {scale.steps} steps of {scale.global_batch}, "
             f"seeds {list(scale.seeds)}; test accuracy after training, mean ± sd over seeds "
             f"(before training: {before_training(results)}).", ""]  # fmt: skip
    if partial:
        lines[:0] = [f"**Partial: {partial} runs finished.** A cell gives (n) when fewer seeds than "
                     f"{len(scale.seeds)} have finished; an empty cell, none.", ""]  # fmt: skip
    head = "| method | " + " | ".join(f"{t} E{e}k{k}r{r}" for t in scale.tasks for e, k, r in configs) + " |"
    lines += [head, "|" + "---|" * (1 + len(scale.tasks) * len(configs))]
    for method in [m for pair in PAIRS for m in pair]:
        cells = []
        for task in scale.tasks:
            for cfg in configs:
                accs = [r["accuracy_after"] for r in results
                        if (r["task"], r["method"], tuple(r["experts"].values())) == (task, method, cfg)]  # fmt: skip
                short = f" (n={len(accs)})" if partial and 0 < len(accs) < len(scale.seeds) else ""
                cells.append(_mean_sd(accs) + short if accs else "")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text("\n".join(lines) + "\n")

    grid = ["| task | baseline | lr grid: validation accuracy | chosen |", "|---|---|---|---|"]
    for (task, base), lr in sorted(lrs.items()):
        accs = {r["lr"]: r["accuracy_after"] for r in chosen if (r["task"], r["method"]) == (task, base)}
        cells = ", ".join(f"{k:g}: {v:.3f}" for k, v in sorted(accs.items())) or "(one value, no choice)"
        grid.append(f"| {task} | {base} | {cells} | {lr:g} |")
    (out / "lr_choice.md").write_text("\n".join(grid) + "\n")
    _plots(scale, results, out)


def before_training(results: list[dict]) -> str:
    by_task = {}
    for r in results:
        if r["accuracy_before"] is not None:
            by_task.setdefault(r["task"], r["accuracy_before"])
    return ", ".join(f"{t} {a:.3f}" for t, a in by_task.items())


def _mean_curve(runs: list[dict]) -> list[float]:
    curves = [[x for x in r["loss"] if x is not None] for r in runs]
    n = min(len(c) for c in curves)
    return [statistics.mean(c[i] for c in curves) for i in range(n)]


def _plots(scale: Scale, results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = tuple(results[0]["experts"].values())
    tasks = [t for t in scale.tasks if any(r["task"] == t for r in results)]  # a partial report may lack one
    pick = lambda task, method: [r for r in results  # noqa: E731
                                 if (r["task"], r["method"], tuple(r["experts"].values())) == (task, method, first)]  # fmt: skip
    for task in tasks:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, family in zip(axes, (PAIRS[:1] + PAIRS[2:3], PAIRS[1:2] + PAIRS[3:])):
            for base, treated in family:
                for method, style in ((base, "--"), (treated, "-")):
                    if runs := pick(task, method):
                        ax.plot(_mean_curve(runs), style, label=method, lw=1)
            ax.set(
                xlabel="optimizer step", title=f"{task}: {'SGD' if 'sgd' in family[0][0] else 'AdamW'} family"
            )
            ax.legend()
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("training loss (mean over seeds)")
        fig.tight_layout()
        fig.savefig(out / f"loss_{task.replace('/', '-')}.png", dpi=100)
        plt.close(fig)

    # The paper's Figure 2 view: each g-method against its baseline, loss curve and final accuracy.
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.5 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        for base, treated in PAIRS[:2]:
            for method, style in ((base, "--"), (treated, "-")):
                if runs := pick(task, method):
                    row[0].plot(_mean_curve(runs), style, label=method, lw=1)
        row[0].set(xlabel="optimizer step", ylabel="training loss", title=task)
        row[0].legend()
        names = [m for pair in PAIRS for m in pair if pick(task, m)]
        accs = [[r["accuracy_after"] for r in pick(task, m)] for m in names]
        row[1].bar(names, [statistics.mean(a) for a in accs],
                   yerr=[statistics.stdev(a) if len(a) > 1 else 0 for a in accs], capsize=3)  # fmt: skip
        row[1].set(ylabel=f"test accuracy after {scale.steps} steps", title=task)
        row[1].tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(out / "figure2.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
