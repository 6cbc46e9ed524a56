"""Training-step throughput and memory of MoE-LoRA next to plain LoRA, and the Riemannian optimizer step.

    python bench/bench_train.py                     # SmolLM2-135M, social_iqa, batch 8, max_len 128
    python bench/bench_train.py --threads 1 --clock cpu   # on a shared machine: one thread's CPU time
    python bench/bench_train.py --quick             # CI smoke (< 60 s): tiny Llama, 1 thread, small shapes
    python bench/bench_train.py --part optim        # part 2 only (a minute)
    python bench/bench_train.py --device cuda --model llama-3.2-1b --batch 8 --max-len 512   # GPU, bf16 autocast

Part 1, a full training step (forward, loss, backward, optimizer step) of one model on real batches
(BIG-bench social_iqa through ``tokenize_mc`` and ``pad_collate``, the loss as in ``Trainer.train_step``):

    LoRA r=4 (PEFT) + AdamW     peft.get_peft_model, q_proj/v_proj, torch.optim.AdamW
    MoE-LoRA + AdamW            apply_molora (E=20, r=4, top-10, gate_rescale=False), build_optimizer("adamw")
    MoE-LoRA + gRAdamW          gate_rescale=True, build_optimizer("gradamw"): preconditioning inside step

All three use alpha 16, dropout 0.05, expert lr 1e-5, eps 1e-6, no weight decay. Each variant has its own
copy of the model; after warm-up rounds (the first one allocates the optimizer state), the variants run
round-robin, ``--steps`` steps each per round over the same batches, with the starting variant rotated, so
that the machine's noise falls on all alike; the table shows medians over rounds. On a machine shared
with other jobs, ``--threads 1 --clock cpu`` times with the process's CPU time instead of wall time: it
leaves out the time the scheduler gives to others, which would otherwise dominate the spread. Throughput counts non-pad
tokens (the attention mask), as the trainer's ``tokens_per_s`` does.

Peak memory of a step is measured with ``torch.profiler`` (``profile_memory=True``): every allocation and
free of torch's allocator is an event with its size, and the step's peak is the maximum of their running sum
in time order, above what was live when the step began (activations, gradients, temporaries). The adapter's
persistent memory (trainable parameters and optimizer state) is added to it, giving the memory a training
run needs on top of the frozen model. Process RSS would not do: glibc keeps freed pages, and its high-water
mark is set by whatever ran before (model loading). The profiler counts tensors only, not library scratch.

``--device cuda`` (skips with a message without CUDA) runs part 1 on the GPU under bf16 autocast, timed
with wall clocks around ``torch.cuda.synchronize``, peak memory from ``torch.cuda.max_memory_allocated``;
``--model`` may then also name a shipped config (``llama-3.2-1b``, ``llama-3.2-3b``: molora_ds/models/configs),
built with random weights (throughput does not depend on them) and fed SmolLM2's token ids. The optimizer
step on a GPU is ``bench/bench_optim.py --device cuda`` (against fused AdamW).

Part 2, the optimizer step alone on random tensors (no model), E=20, r=4, at the q/v shapes of SmolLM2-135M
(30 layers, 576 -> 576 and 576 -> 192) and of GLM-4-9B (40 layers, 4096 -> 4096 and 4096 -> 256):

    ours        build_optimizer("gradamw").step(): experts stacked [E, r, in] / [E, out, r], all E r x r
                systems of a layer in one batched float64 Cholesky (``riemannian.precondition_``), torch fused AdamW
    loop        the reference implementation's structure: one tensor per expert matrix and, for each layer
                and expert, inv(B_i^T B_i + reg I) @ grad_A_i and grad_B_i @ inv(A_i A_i^T + reg I), then
                an AdamW update per matrix; routers clipped together and updated by torch AdamW

Both start from the same parameters, gradients and state, and one step of each must give the same Adam
moments before anything is timed. Gradients are restored (untimed) before every timed step.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_layer import peak_memory_mb  # this folder is on sys.path when run as a script
from torch import nn
from torch.profiler import ProfilerActivity, profile

from molora_ds import MoLoRAConfig, MoLoRALinear, apply_molora
from molora_ds.data.multiple_choice import load_mc, pad_collate, tokenize_mc
from molora_ds.models.loading import load_model
from molora_ds.optim import build_optimizer
from molora_ds.optim.riemannian import precondition_

TARGETS = ["q_proj", "v_proj"]
RANK, ALPHA, DROPOUT, EXPERTS, TOP_K = 4, 16.0, 0.05, 20, 10
LR, GATE_LR, EPS, REG, GATE_MAX_NORM = 1e-5, 3e-8, 1e-6, 1e-6, 1.0
BETAS = (0.9, 0.999)
DATASET = "bigbench/social_iqa"
MIN_THROUGHPUT_VS_LORA = 0.9  # MoE-LoRA + gRAdamW tokens/s over plain LoRA's (issue 11)
MIN_SPEEDUP_VS_LOOP = 5.0  # per-matrix loop step time over ours
# cpu: time.process_time, this process's CPU time. With one thread it is the compute time, which other
# processes on a shared machine barely change, where wall time swings by 2x and more.
CPU = torch.device("cpu")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


# ------------------------------------------------------------------ part 1: training step
@dataclass
class TrainVariant:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    tokens_per_s: list[float] = field(default_factory=list)
    phase_ms: dict[str, list[float]] = field(default_factory=lambda: {"fwd": [], "bwd": [], "opt": []})
    step_peak_mb: float = 0.0

    @property
    def median(self) -> float:
        return statistics.median(self.tokens_per_s)

    @property
    def persistent_mb(self) -> float:
        """Trainable parameters and optimizer state: what stays allocated between steps."""
        params = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
        state = sum(
            t.numel() * t.element_size()
            for s in self.optimizer.state.values()
            for t in s.values()
            if torch.is_tensor(t)
        )
        return (params + state) / 2**20


def build_lora(model: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer]:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS, bias="none")
    model = get_peft_model(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(trainable, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)


def build_molora(model: nn.Module, method: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    cfg = MoLoRAConfig(
        num_experts=EXPERTS,
        rank=RANK,
        top_k=TOP_K,
        alpha=ALPHA,
        dropout=DROPOUT,
        target_modules=TARGETS,
        gate_rescale=method.startswith("g"),
    )
    apply_molora(model, cfg)
    return model, build_optimizer(model, method, lr=LR, gate_lr=GATE_LR, eps=EPS, reg=REG)


def load_bench_model(name: str, device: torch.device) -> tuple[nn.Module, object]:
    """A built-in model (``load_model``), or a shipped config built with random weights; on ``device``."""
    from molora_ds.plan import CONFIG_DIR, model_config

    if not (CONFIG_DIR / f"{name}.json").is_file():
        model, tokenizer = load_model(name)
        return model.to(device), tokenizer
    from transformers import AutoModelForCausalLM

    from molora_ds.models.loading import smollm2_tokenizer

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(name))
    return model, smollm2_tokenizer()  # its ids (< 49,152) are valid in every shipped vocabulary


def load_batches(
    tokenizer, batch: int, max_len: int, count: int, device: torch.device = CPU
) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of a fixed random draw of the data set, padded as the trainer pads them."""
    rows = load_mc(DATASET).shuffle(seed=0).select(range(batch * count))
    tok = tokenize_mc(rows, tokenizer, max_len)
    return [
        {
            k: t.to(device)
            for k, t in pad_collate(tok.select(range(i, i + batch)), tokenizer.pad_token_id).items()
        }
        for i in range(0, len(tok), batch)
    ]


def make_clock(name: str, device: torch.device) -> Callable[[], float]:
    """A clock that first waits for the device's queued work (CUDA runs asynchronously)."""
    clock = CLOCKS[name]
    if device.type != "cuda":
        return clock

    def synced() -> float:
        torch.cuda.synchronize(device)
        return clock()

    return synced


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """One optimizer step, the loss as the trainer computes it; returns (forward, backward, optimizer) seconds."""
    t0 = clock()
    labels = batch["labels"][:, 1:]
    keep = (labels != -100).any(dim=0).nonzero().flatten()  # vocabulary logits only where a target follows
    device = batch["input_ids"].device
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep
        ).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels[:, keep].flatten(), reduction="sum")
    loss = loss / (labels != -100).sum()
    t1 = clock()
    loss.backward()
    t2 = clock()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return [t1 - t0, t2 - t1, clock() - t2]


def run_training(variants: list[TrainVariant], batches: list[dict[str, torch.Tensor]], args) -> None:
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    device = batches[0]["input_ids"].device
    clock = make_clock(args.clock, device)
    for _ in range(args.warmup):
        for v in variants:
            for b in batches:
                train_step(v.model, v.optimizer, b)
    for round_ in range(args.repeats):
        print(f"  training round {round_ + 1}/{args.repeats}", file=sys.stderr, flush=True)
        for i in range(len(variants)):
            v = variants[(round_ + i) % len(variants)]
            phases = [train_step(v.model, v.optimizer, b, clock) for b in batches]
            v.tokens_per_s.append(tokens / sum(map(sum, phases)))
            for j, key in enumerate(v.phase_ms):
                v.phase_ms[key].append(1e3 * sum(p[j] for p in phases) / len(batches))
    for v in variants:
        v.step_peak_mb = peak_memory_mb(lambda v=v: train_step(v.model, v.optimizer, batches[0]), device)


def print_profile(variants: list[TrainVariant], batch: dict[str, torch.Tensor], rows: int) -> None:
    for v in variants:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_step(v.model, v.optimizer, batch)
        print(f"\nprofile, one step of {v.name} (self CPU time, top {rows} ops)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


# ------------------------------------------------------------------ part 2: optimizer step
@dataclass(frozen=True)
class OptimShape:
    name: str
    layers: int
    hidden: int
    v_out: int  # v_proj output: kv heads x head dim

    @property
    def modules(self) -> list[tuple[int, int]]:
        """(in, out) of every adapted Linear: q and v of each layer."""
        return [(self.hidden, self.hidden), (self.hidden, self.v_out)] * self.layers

    @property
    def adapter_params(self) -> int:
        return sum(EXPERTS * RANK * (i + o) + EXPERTS * i for i, o in self.modules)


class OursOptimizer:
    """``build_optimizer("gradamw")`` over MoLoRALinear layers whose frozen base stays on the meta device."""

    def __init__(self, shape: OptimShape, gen: torch.Generator) -> None:
        self.model = nn.ModuleList()
        for in_f, out_f in shape.modules:
            layer = MoLoRALinear(
                nn.Linear(in_f, out_f, bias=False, device="meta"), EXPERTS, RANK, TOP_K, ALPHA
            )
            layer.lora_A = nn.Parameter(torch.randn(EXPERTS, RANK, in_f, generator=gen) / math.sqrt(in_f))
            layer.lora_B = nn.Parameter(torch.randn(EXPERTS, out_f, RANK, generator=gen) * 1e-2)
            layer.router.weight = nn.Parameter(torch.randn(EXPERTS, in_f, generator=gen) * 1e-2)
            self.model.append(layer)
        self.params = [p for m in self.model for p in (m.lora_A, m.lora_B, m.router.weight)]
        self.grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in self.params]
        self.optimizer = build_optimizer(self.model, "gradamw", lr=LR, gate_lr=GATE_LR, eps=EPS, reg=REG)
        self.reset_grads()

    def reset_grads(self) -> None:
        for p, g in zip(self.params, self.grads):
            p.grad = g.clone()

    def step(self) -> None:
        self.optimizer.step()

    @torch.no_grad()
    def precondition(self) -> None:
        for m in self.model:
            precondition_(m.lora_A, m.lora_B, REG)

    def exp_avgs(self) -> list[torch.Tensor]:
        """First Adam moments, experts only, flattened in the loop's order (layer, expert, A then B)."""
        out = []
        for m in self.model:
            a, b = (self.optimizer.state[p]["exp_avg"] for p in (m.lora_A, m.lora_B))
            out += [t for i in range(EXPERTS) for t in (a[i], b[i])]
        return out


class LoopOptimizer:
    """The reference's structure: a tensor per expert matrix, preconditioned and updated one at a time."""

    def __init__(self, ours: OursOptimizer) -> None:
        self.pairs, self.routers, self.grads = [], [], []
        for m, ga, gb in zip(ours.model, ours.grads[0::3], ours.grads[1::3]):
            for i in range(EXPERTS):
                self.pairs.append(
                    (nn.Parameter(m.lora_A[i].detach().clone()), nn.Parameter(m.lora_B[i].detach().clone()))
                )
                self.grads += [ga[i].clone(), gb[i].clone()]
            self.routers.append(nn.Parameter(m.router.weight.detach().clone()))
        self.router_grads = [g.clone() for g in ours.grads[2::3]]
        self.router_opt = torch.optim.AdamW(self.routers, lr=GATE_LR, betas=BETAS, eps=EPS, weight_decay=0.0)
        self.state: dict[nn.Parameter, dict] = {}
        self.reset_grads()

    def reset_grads(self) -> None:
        for p, g in zip([p for pair in self.pairs for p in pair], self.grads):
            p.grad = g.clone()
        for p, g in zip(self.routers, self.router_grads):
            p.grad = g.clone()

    @torch.no_grad()
    def precondition(self) -> None:
        eye = torch.eye(RANK)
        for a, b in self.pairs:
            grad_a = torch.linalg.inv(b.T @ b + REG * eye) @ a.grad
            grad_b = b.grad @ torch.linalg.inv(a @ a.T + REG * eye)
            a.grad.copy_(grad_a)
            b.grad.copy_(grad_b)

    @torch.no_grad()
    def step(self) -> None:
        self.precondition()
        for a, b in self.pairs:
            self._adamw(a)
            self._adamw(b)
        nn.utils.clip_grad_norm_(self.routers, GATE_MAX_NORM)
        self.router_opt.step()

    def _adamw(self, p: nn.Parameter) -> None:
        """torch's single-tensor AdamW (bias-corrected, no weight decay), written out for one matrix."""
        state = self.state.setdefault(
            p, {"step": 0, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        )
        state["step"] += 1
        beta1, beta2 = BETAS
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** state["step"])).add_(EPS)
        p.addcdiv_(state["exp_avg"], denom, value=-LR / (1 - beta1 ** state["step"]))

    def exp_avgs(self) -> list[torch.Tensor]:
        return [self.state[p]["exp_avg"] for pair in self.pairs for p in pair]


@dataclass
class OptimResult:
    shape: OptimShape
    times_ms: dict[str, list[float]]

    def median(self, key: str) -> float:
        return statistics.median(self.times_ms[key])


def run_optimizer(shape: OptimShape, repeats: int, clock: Callable[[], float]) -> OptimResult:
    ours = OursOptimizer(shape, torch.Generator().manual_seed(0))
    loop = LoopOptimizer(ours)
    ours.step()  # also allocates the Adam state, so that timed steps are steady-state ones
    loop.step()
    # Comparing speeds of different math would mean nothing. Norm-wise: the loop's fp32 inverse and our
    # float64 Cholesky differ by ~1e-3 relative on single elements that nearly cancel.
    for i, (x, y) in enumerate(zip(ours.exp_avgs(), loop.exp_avgs())):
        error = (torch.linalg.norm(x - y) / torch.linalg.norm(y)).item()
        if not error < 1e-4:
            raise AssertionError(
                f"{shape.name}: ours and the loop disagree on Adam moment {i}: relative error {error:.2e}"
            )
    jobs = {
        "ours step": (ours, ours.step),
        "loop step": (loop, loop.step),
        "ours precond": (ours, ours.precondition),
        "loop precond": (loop, loop.precondition),
    }
    names = list(jobs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for round_ in range(repeats):
        for i in range(len(names)):
            name = names[(round_ + i) % len(names)]
            owner, fn = jobs[name]
            owner.reset_grads()
            t0 = clock()
            fn()
            times[name].append(1e3 * (clock() - t0))
    return OptimResult(shape, times)


# ------------------------------------------------------------------ report
def quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def iqr(xs: list[float]) -> float:
    low, high = quartiles(xs)
    return high - low


def print_training(variants: list[TrainVariant]) -> None:
    lora = variants[0].median
    print(
        f"{'variant':<34} {'tokens/s':>9} {'iqr':>6} {'/ LoRA':>7} {'ms/step':>8} {'fwd':>6} {'bwd':>6} {'opt':>6} "
        f"{'step peak MB':>13} {'+ adapter MB':>13}"
    )
    for v in variants:
        ph = {k: statistics.median(x) for k, x in v.phase_ms.items()}
        print(
            f"{v.name:<34} {v.median:>9.0f} {iqr(v.tokens_per_s):>6.0f} {v.median / lora:>7.3f} {sum(ph.values()):>8.1f} "
            f"{ph['fwd']:>6.1f} {ph['bwd']:>6.1f} {ph['opt']:>6.1f} {v.step_peak_mb:>13.1f} "
            f"{v.step_peak_mb + v.persistent_mb:>13.1f}"
        )


def print_optimizer(results: list[OptimResult]) -> None:
    print(
        f"{'shape':<34} {'params':>7} {'ours ms':>8} {'loop ms':>8} {'speedup':>8} "
        f"{'precond ours':>13} {'precond loop':>13} {'speedup':>8}"
    )
    for r in results:
        m = {k: r.median(k) for k in r.times_ms}
        print(
            f"{r.shape.name:<34} {r.shape.adapter_params / 1e6:>6.1f}M {m['ours step']:>8.1f} {m['loop step']:>8.1f} "
            f"{m['loop step'] / m['ours step']:>7.1f}x {m['ours precond']:>13.1f} {m['loop precond']:>13.1f} "
            f"{m['loop precond'] / m['ours precond']:>7.1f}x"
        )


def check_targets(variants: list[TrainVariant], results: list[OptimResult]) -> list[tuple[str, bool]]:
    checks = []
    if variants:
        lora, ours = variants[0].median, variants[-1].median
        checks.append(
            (
                f"{variants[-1].name} >= {MIN_THROUGHPUT_VS_LORA}x the tokens/s of {variants[0].name}: "
                f"{ours:.0f} / {lora:.0f} = {ours / lora:.3f}x",
                ours >= MIN_THROUGHPUT_VS_LORA * lora,
            )
        )
    for r in results:
        speedup = r.median("loop step") / r.median("ours step")
        checks.append(
            (
                f"{r.shape.name}: preconditioned step >= {MIN_SPEEDUP_VS_LOOP}x faster than the per-matrix loop: "
                f"{speedup:.1f}x",
                speedup >= MIN_SPEEDUP_VS_LOOP,
            )
        )
    return checks


def plot(variants: list[TrainVariant], results: list[OptimResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    medians = [v.median for v in variants]
    bars = left.bar(
        range(len(variants)),
        medians,
        yerr=[
            [m - quartiles(v.tokens_per_s)[0] for m, v in zip(medians, variants)],
            [quartiles(v.tokens_per_s)[1] - m for m, v in zip(medians, variants)],
        ],
        capsize=3,
        color=["0.6", "tab:orange", "tab:blue"],
    )
    left.bar_label(bars, labels=[f"{m:.0f}\n({m / medians[0]:.2f}x)" for m in medians], padding=2, fontsize=8)
    left.set_xticks(range(len(variants)), [v.name.replace(" + ", "\n+ ") for v in variants], fontsize=8)
    left.set_ylabel("training tokens/s (median, quartiles; non-pad)")
    left.axhline(
        MIN_THROUGHPUT_VS_LORA * medians[0],
        color="tab:red",
        ls="--",
        lw=1,
        label=f"target {MIN_THROUGHPUT_VS_LORA}x LoRA",
    )
    left.legend(fontsize=8, loc="lower right")
    width = 0.38
    for j, (key, color) in enumerate([("ours step", "tab:blue"), ("loop step", "tab:red")]):
        xs = [i + (j - 0.5) * width for i in range(len(results))]
        bars = right.bar(xs, [r.median(key) for r in results], width, color=color, label=key)
        right.bar_label(bars, labels=[f"{r.median(key):.0f}" for r in results], padding=2, fontsize=8)
    speedups = [r.median("loop step") / r.median("ours step") for r in results]
    right.set_xticks(
        range(len(results)),
        [f"{r.shape.name}\nloop / ours = {x:.1f}x" for r, x in zip(results, speedups)],
        fontsize=8,
    )
    right.set_yscale("log")
    right.set_ylabel("optimizer step, ms (median)")
    right.set_title(f"gRAdamW step, E={EXPERTS}, r={RANK}", fontsize=10)
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", default="smollm2-135m", help="smollm2-135m, tiny-llama or a shipped config (llama-3.2-1b)"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: part 1 on the GPU")
    parser.add_argument("--steps", type=int, default=4, help="training steps per variant per round")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (each runs every variant)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--opt-repeats", type=int, default=9, help="timed rounds of the optimizer comparison")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or this process's CPU time (needs --threads 1; for shared machines)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="ROWS",
        help="print the top ROWS ops of one profiled training step per variant",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke: tiny model, batch 4, 2 rounds, 1-2 layer optimizer shapes, 1 thread",
    )
    parser.add_argument(
        "--part",
        choices=["both", "train", "optim"],
        default="both",
        help="which part to run (plot: both only)",
    )
    parser.add_argument("--plot", type=Path, default=Path(__file__).with_name("train_throughput.png"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("skipped: --device cuda needs CUDA (torch.cuda.is_available() is false)")
            return
        if args.part != "train":
            print(
                "--device cuda runs part 1 only; the optimizer step on a GPU: bench/bench_optim.py --device cuda"
            )
            args.part = "train"
    if args.quick and args.threads is None:
        args.threads = 1  # CI machines are shared: OpenMP threads that spin-wait on a busy box cost minutes
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        raise SystemExit(
            f"--clock cpu sums the CPU time of all {torch.get_num_threads()} threads, which is not a throughput; "
            "add --threads 1"
        )
    layers = {"smollm2": 30, "glm": 40}
    if args.quick:
        args.model, args.repeats, args.steps, args.opt_repeats = "tiny-llama", 2, 2, 2
        args.batch, args.max_len = 4, 96
        layers = {"smollm2": 2, "glm": 1}
    shapes = [
        OptimShape(f"SmolLM2-135M q/v ({layers['smollm2']}x2)", layers["smollm2"], 576, 192),
        OptimShape(f"GLM-4-9B q/v ({layers['glm']}x2)", layers["glm"], 4096, 256),
    ]
    env = f"cpu fp32, threads={torch.get_num_threads()}, clock={args.clock}, torch {torch.__version__}"
    if args.device == "cuda":
        env = f"{torch.cuda.get_device_name()}, bf16 autocast, torch {torch.__version__}"
    print(env)
    variants, results = [], []
    if args.part in ("both", "train"):
        variants = run_training_part(args)
    if args.part in ("both", "optim"):
        print(
            f"\noptimizer step: E={EXPERTS}, r={RANK}, random tensors, {args.opt_repeats} rounds, median ms"
        )
        results = [run_optimizer(shape, args.opt_repeats, CLOCKS[args.clock]) for shape in shapes]
        print_optimizer(results)

    print("\ntargets" + (" (--quick: tiny shapes, informative only)" if args.quick else ""))
    for text, ok in check_targets(variants, results):
        print(f"  [{'ok' if ok else 'MISS'}] {text}")
    if variants and results:
        plot(variants, results, args.plot, f"{args.model}, batch {args.batch}, max_len {args.max_len}; {env}")
        print(f"\nplot: {args.plot}")


def run_training_part(args: argparse.Namespace) -> list[TrainVariant]:
    torch.manual_seed(0)
    device = torch.device(args.device)
    (m_lora, tokenizer), (m_adamw, _), (m_gradamw, _) = (
        load_bench_model(args.model, device) for _ in range(3)
    )
    batches = load_batches(tokenizer, args.batch, args.max_len, args.steps, device)
    variants = [
        TrainVariant(f"LoRA r={RANK} (PEFT) + AdamW", *build_lora(m_lora)),
        TrainVariant(f"MoE-LoRA E={EXPERTS} top-{TOP_K} + AdamW", *build_molora(m_adamw, "adamw")),
        TrainVariant(f"MoE-LoRA E={EXPERTS} top-{TOP_K} + gRAdamW", *build_molora(m_gradamw, "gradamw")),
    ]
    for v in variants:
        v.model.train()
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    print(
        f"\ntraining step: {args.model}, {DATASET}, batch {args.batch}, max_len {args.max_len}, "
        f"{args.steps} steps ({tokens} non-pad tokens) x {args.repeats} rounds after {args.warmup} warm-up\n"
        "tokens/s and ms: medians over rounds; step peak: profiler, tensors above the step's start; "
        "+ adapter: plus trainable params and optimizer state"
    )
    run_training(variants, batches, args)
    print_training(variants)
    if args.profile:
        print_profile(variants, batches[0], args.profile)
    return variants


if __name__ == "__main__":
    main()
