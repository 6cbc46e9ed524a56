"""Forward+backward time and peak memory of ``MoLoRALinear`` next to the layers it should be compared with.

    python bench/bench_layer.py --threads 2             # paper shape (E=20, r=4, top-10) and E=64/top-8
    python bench/bench_layer.py --quick                 # CI smoke: tiny shapes, 2 repeats

Variants, all on one frozen ``nn.Linear`` (in = out = --features) and the same input, which requires grad
so that the backward does the real work (dx through the base layer):

    base            the frozen Linear alone
    lora r          base + s * B A x, one adapter of rank r (two plain matmuls, A and B trainable)
    lora E*r        base + one adapter of rank E*r: the FLOPs of all experts dense, no router
    expert loop     a Python loop over experts as in THUDM/MoELoRA_Riemannian: o_i = B_i(A_i x) * s, added
                    as c_i o_i + (g_i - c_i) o_i.detach() with c_i = sqrt(g_i).detach()
    ours            molora_ds.MoLoRALinear(gate_rescale=True, dropout=0)

The loop uses our router (``top_k_gates``), so the two MoE variants differ only in how the experts run; a
check on a few tokens confirms they give the same output and gradients before anything is timed.

Timing: one "step" is forward, then backward of a fixed random dy; gradients are dropped between steps.
After warm-up steps, the variants run round-robin, one step each per round with the starting variant
rotated, so that the machine's noise falls on all of them alike; the table shows the median (and the
inter-quartile range) over rounds. CUDA steps are timed with CUDA events.
Compare variants within one run, not across runs: on a shared 2-core machine the ratio ours / LoRA E*r
moved between 1.07 and 1.27 from run to run at the paper shape, because each small op then also pays a
thread wake-up, which weighs on the many-op variants (ours, and the loop far more) under load.

Peak memory: the highest amount of memory allocated above what was live before the step (output,
activations saved for backward, all gradients included). On CUDA that is ``torch.cuda.max_memory_allocated``.
On CPU, torch has no such counter, and the process RSS is unreliable (glibc keeps freed pages, and the
high-water mark is set by whatever ran before), so one step runs under ``torch.profiler`` with
``profile_memory=True``: every allocation and free of torch's CPU allocator is an event with its size,
and the peak is the maximum of their running sum in time order. It is exact and repeatable, and it
counts tensors only (not the allocator's or the libraries' own scratch space).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from molora_ds import MoLoRALinear
from molora_ds.modules.router import Router

ALPHA = 16.0
MAX_TIME_VS_DENSE = 1.25  # ours / (base + LoRA rank E*r)
MIN_SPEEDUP_VS_LOOP = 3.0  # loop / ours, at the paper shape
PAPER_EXPERTS = 20


@dataclass(frozen=True)
class Shape:
    tokens: int
    features: int
    experts: int
    rank: int
    top_k: int

    def __str__(self) -> str:
        return f"tokens={self.tokens}, in=out={self.features}, E={self.experts}, r={self.rank}, top-k={self.top_k}"


@dataclass
class Result:
    name: str
    times_ms: list[float]
    peak_mb: float

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def best(self) -> float:
        return min(self.times_ms)

    @property
    def quartiles(self) -> tuple[float, float]:
        if len(self.times_ms) < 2:
            return self.median, self.median
        q1, _, q3 = statistics.quantiles(self.times_ms, n=4)
        return q1, q3

    @property
    def iqr(self) -> float:
        q1, q3 = self.quartiles
        return q3 - q1


class LoRALinear(nn.Module):
    """``y = W x + s * B A x`` with one trainable adapter of rank ``rank``."""

    def __init__(self, base_layer: nn.Linear, rank: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Parameter(
            torch.randn(rank, base_layer.in_features, **factory) / base_layer.in_features**0.5
        )
        self.lora_B = nn.Parameter(torch.randn(base_layer.out_features, rank, **factory) * 1e-2)
        self.scaling = ALPHA / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.scaling * ((x @ self.lora_A.t()) @ self.lora_B.t())


class ExpertLoopMoLoRA(nn.Module):
    """The reference implementation's per-expert loop, with its sqrt-gate trick, dropout off."""

    def __init__(self, ours: MoLoRALinear) -> None:
        super().__init__()
        self.base_layer = ours.base_layer
        self.router = Router(ours.in_features, ours.num_experts, ours.top_k).to(ours.router.weight)
        self.router.load_state_dict(ours.router.state_dict())
        self.lora_A = nn.ModuleList(nn.Linear(ours.in_features, ours.rank, bias=False) for _ in ours.lora_A)
        self.lora_B = nn.ModuleList(nn.Linear(ours.rank, ours.out_features, bias=False) for _ in ours.lora_B)
        with torch.no_grad():
            for a, b, a_ours, b_ours in zip(self.lora_A, self.lora_B, ours.lora_A, ours.lora_B):
                a.weight = nn.Parameter(a_ours.detach().clone())
                b.weight = nn.Parameter(b_ours.detach().clone())
        self.scaling = ours.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        gates, _ = self.router(x)
        gates = gates.to(x.dtype)
        for i, (lora_a, lora_b) in enumerate(zip(self.lora_A, self.lora_B)):
            o = lora_b(lora_a(x)) * self.scaling
            g = gates[:, i : i + 1]
            c = g.sqrt().detach()
            y = y + c * o + (g - c) * o.detach()
        return y


def build_variants(shape: Shape, device: torch.device, dtype: torch.dtype) -> dict[str, nn.Module]:
    base = nn.Linear(shape.features, shape.features, bias=False, device=device, dtype=dtype).requires_grad_(
        False
    )
    ours = MoLoRALinear(base, shape.experts, shape.rank, shape.top_k, ALPHA, dropout=0.0, gate_rescale=True)
    with torch.no_grad():
        ours.lora_B.normal_(std=1e-2)  # B starts at zero; a trained B is what a step really sees
    return {
        "base (frozen Linear)": base,
        f"base + LoRA r={shape.rank}": LoRALinear(base, shape.rank),
        f"base + LoRA E*r={shape.experts * shape.rank}": LoRALinear(base, shape.experts * shape.rank),
        "expert loop (reference)": ExpertLoopMoLoRA(ours),
        "ours (MoLoRALinear)": ours,
    }


def make_step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> None:
        module(x).backward(dy)
        x.grad = None
        for p in params:
            p.grad = None

    return step


def check_same_math(loop: ExpertLoopMoLoRA, ours: MoLoRALinear, x: torch.Tensor) -> None:
    """The loop and ours must compute the same thing, or comparing their speed means nothing.

    Compared in float64 on a few tokens: in bf16 the loop's 20 rounded additions differ from ours by several ulps.
    """
    x = x[:16].detach().double().requires_grad_(True)
    results = []
    for module in (copy.deepcopy(loop).double(), copy.deepcopy(ours).double()):
        y = module(x)
        y.backward(torch.ones_like(y))
        if isinstance(module, ExpertLoopMoLoRA):
            grad_a = torch.stack([a.weight.grad for a in module.lora_A])
            grad_b = torch.stack([b.weight.grad for b in module.lora_B])
        else:
            grad_a, grad_b = module.lora_A.grad, module.lora_B.grad
        results.append([y, x.grad, grad_a, grad_b, module.router.weight.grad])
        x.grad = None
    for what, got, want in zip(["y", "dx", "dA", "dB", "d router"], *results):
        torch.testing.assert_close(got, want, msg=lambda m, what=what: f"loop vs ours, {what}: {m}")


def time_step_ms(
    step: Callable[[], None], device: torch.device, clock: Callable[[], float] = time.perf_counter
) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start_s = clock()
    step()
    return (clock() - start_s) * 1e3


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Kineto writes "profiler_start/stop" lines to file descriptor 2 on every profile; no setting turns them off."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_mb(step: Callable[[], None], device: torch.device) -> float:
    """Peak memory allocated during one step, above what was live before it (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # The raw event list: prof.events() folds each allocation into the op around it and loses the order.
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def run_shape(
    shape: Shape, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> list[Result]:
    print(f"timing {shape} ...", file=sys.stderr, flush=True)
    variants = build_variants(shape, device, dtype)
    x = torch.randn(shape.tokens, shape.features, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(shape.tokens, shape.features, device=device, dtype=dtype)
    check_same_math(variants["expert loop (reference)"], variants["ours (MoLoRALinear)"], x)
    steps = {name: make_step(module, x, dy) for name, module in variants.items()}
    times = round_robin_ms(steps, args.warmup, args.repeats, device)
    return [Result(name, times[name], peak_memory_mb(steps[name], device)) for name in steps]


def round_robin_ms(
    steps: dict,
    warmup: int,
    repeats: int,
    device: torch.device,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Times of each step, in rounds that run every variant once, each round starting one later:
    on a shared machine a slow spell then hits every variant, not the one that happened to run.
    ``times[name][i]`` is round i's, so variants can be compared round by round."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for i in range(len(names)):
            name = names[(round_ + i) % len(names)]
            times[name].append(time_step_ms(steps[name], device, clock))
    return times


def print_table(shape: Shape, results: list[Result]) -> None:
    dense, loop = results[2].median, results[3].median
    print(f"\n{shape}")
    print(
        f"{'variant':<26} {'ms (median)':>12} {'iqr ms':>8} {'min ms':>8} {'/ LoRA E*r':>11} {'/ loop':>8} "
        f"{'peak MB':>9}"
    )
    for r in results:
        print(
            f"{r.name:<26} {r.median:>12.1f} {r.iqr:>8.1f} {r.best:>8.1f} {r.median / dense:>11.2f} "
            f"{r.median / loop:>8.3f} {r.peak_mb:>9.1f}"
        )


def check_targets(shape: Shape, results: list[Result]) -> list[tuple[str, str]]:
    """``(verdict, text)`` pairs. The time targets are set at the paper shape (E=20); elsewhere they are "info"."""
    dense, loop, ours = results[2], results[3], results[4]
    time_verdict = (
        (lambda ok: "ok" if ok else "MISS") if shape.experts == PAPER_EXPERTS else (lambda ok: "info")
    )
    return [
        (
            time_verdict(ours.median <= MAX_TIME_VS_DENSE * dense.median),
            f"E={shape.experts}: ours {ours.median:.1f} ms <= {MAX_TIME_VS_DENSE}x LoRA E*r "
            f"({MAX_TIME_VS_DENSE * dense.median:.1f} ms): {ours.median / dense.median:.2f}x",
        ),
        (
            time_verdict(loop.median >= MIN_SPEEDUP_VS_LOOP * ours.median),
            f"E={shape.experts}: ours >= {MIN_SPEEDUP_VS_LOOP}x faster than the loop: {loop.median / ours.median:.1f}x",
        ),
        (
            "ok" if ours.peak_mb <= loop.peak_mb else "MISS",
            f"E={shape.experts}: ours peak {ours.peak_mb:.1f} MB <= loop peak {loop.peak_mb:.1f} MB",
        ),
    ]


def plot(all_results: list[tuple[Shape, list[Result]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_results), figsize=(6 * len(all_results), 4.5), squeeze=False)
    for ax, (shape, results) in zip(axes[0], all_results):
        medians = [r.median for r in results]
        errors = [[r.median - r.quartiles[0] for r in results], [r.quartiles[1] - r.median for r in results]]
        bars = ax.bar(
            range(len(results)), medians, yerr=errors, capsize=3, color=["0.6"] * 3 + ["tab:red", "tab:blue"]
        )
        ax.bar_label(bars, labels=[f"{m:.0f}" for m in medians], padding=2, fontsize=8)
        ax.set_xticks(
            range(len(results)),
            [r.name.replace(" (", "\n(") for r in results],
            rotation=30,
            ha="right",
            fontsize=8,
        )
        ax.set_ylabel("forward+backward, ms (median, IQR)")
        ax.set_title(f"E={shape.experts}, r={shape.rank}, top-{shape.top_k}", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (each runs every variant once)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--features", type=int, default=2048, help="in = out features of the base layer")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="CI smoke: tiny shapes, 2 repeats, no plot")
    parser.add_argument("--plot", type=Path, default=Path(__file__).with_name("layer_times.png"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.tokens, args.features, args.repeats, args.warmup = 64, 64, 2, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False; use --device cpu")
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    shapes = [Shape(args.tokens, args.features, 20, 4, 10), Shape(args.tokens, args.features, 64, 4, 8)]
    env = f"{args.device}, {args.dtype}, threads={torch.get_num_threads()}, torch {torch.__version__}"
    print(
        f"{env}; {args.repeats} rounds after {args.warmup} warm-up; peak = memory allocated above the step's start"
    )

    all_results = [(shape, run_shape(shape, args, device, dtype)) for shape in shapes]
    checks = []
    for shape, results in all_results:
        print_table(shape, results)
        checks += check_targets(shape, results)
    print("\ntargets" + (" (--quick: tiny shapes, informative only)" if args.quick else ""))
    for verdict, text in checks:
        print(f"  [{verdict}] {text}")
    if not args.quick:
        plot(all_results, args.plot, f"{env}, tokens={args.tokens}, in=out={args.features}")
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
