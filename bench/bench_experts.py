"""Dense vs sparse expert compute of one ``MoLoRALinear``, next to the frozen base layer, with the cost rule's prediction.

    nice -n 10 python bench/bench_experts.py --threads 1 --clock cpu   # T=2048, in=out=2048, r=4, E 20..1024, top-k 2 and 8
    python bench/bench_experts.py --quick                     # CI smoke: tiny shapes, 2 repeats

Variants per shape, on one frozen ``nn.Linear`` and the same input (which requires grad, so that the backward
computes dx): ``base`` (the Linear alone), ``dense`` and ``sparse`` (``MoLoRALinear(expert_compute=...)``,
gate rescale on, dropout off). Before timing, both paths are checked to give the same output and gradients
in float64 on a few tokens. A step is forward + backward of a fixed dy; the variants run round-robin (start
rotated per round) and the table shows medians over rounds. The adapter's own time is the median over rounds of
the layer's time minus the base's in the same round (paired: a slow spell of the shared machine shifts both).
``--clock cpu`` reads the process's CPU time instead of the wall clock (with ``--threads 1``: time spent
descheduled by other jobs is not counted).

The cost rule of ``expert_compute="auto"`` (``molora_ds.modules.sparse.use_sparse``) predicts the adapter
speedup of sparse over dense as ``E / (SPARSE_FACTOR * k)``: the column ``pred``; ``fit`` is the factor this
measurement implies, ``E / (k * measured speedup)``. ``auto`` shows the path the rule picks and its time over
the faster of the two (target: at most 1.10). Peak memory: see bench_layer.py (profiler events on CPU).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys

import torch
from bench_layer import make_step, peak_memory_mb, round_robin_ms
from bench_optim import CLOCKS
from torch import nn

from molora_ds import MoLoRALinear
from molora_ds.modules.sparse import SPARSE_FACTOR, use_sparse

ALPHA = 16.0
TARGET_SPEEDUP = 5.0  # adapter time dense / sparse at E=256, top-8
TARGET_AUTO = 1.10  # auto's pick over the faster path


def build(
    tokens: int, features: int, experts: int, rank: int, top_k: int, device, dtype
) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = nn.Linear(features, features, device=device, dtype=dtype).requires_grad_(False)
    dense = MoLoRALinear(copy.deepcopy(base), experts, rank, top_k, alpha=ALPHA, expert_compute="dense")
    with torch.no_grad():
        dense.lora_B.normal_(0, 0.02)
    sparse = copy.deepcopy(dense)
    sparse.expert_compute = "sparse"
    return {"base": base, "dense": dense, "sparse": sparse}


def check_same_math(dense: MoLoRALinear, sparse: MoLoRALinear, x: torch.Tensor) -> None:
    x = x[:16].detach().double().requires_grad_(True)
    results = []
    for module in (copy.deepcopy(dense).double(), copy.deepcopy(sparse).double()):
        y = module(x)
        y.backward(torch.ones_like(y))
        results.append([y, x.grad, module.lora_A.grad, module.lora_B.grad, module.router.weight.grad])
        x.grad = None
    for what, got, want in zip(["y", "dx", "dA", "dB", "d router"], *results):
        torch.testing.assert_close(got, want, msg=lambda m, what=what: f"sparse vs dense, {what}: {m}")


def run_shape(args, experts: int, top_k: int, device, dtype) -> dict:
    print(f"timing E={experts} top-{top_k} ...", file=sys.stderr, flush=True)
    variants = build(args.tokens, args.features, experts, args.rank, top_k, device, dtype)
    x = torch.randn(args.tokens, args.features, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(args.tokens, args.features, device=device, dtype=dtype)
    check_same_math(variants["dense"], variants["sparse"], x)
    steps = {name: make_step(module, x, dy) for name, module in variants.items()}
    times = round_robin_ms(steps, args.warmup, args.repeats, device, CLOCKS[args.clock])
    med = {name: statistics.median(t) for name, t in times.items()}
    peak = {name: peak_memory_mb(steps[name], device) for name in ("dense", "sparse")}
    adapter = {
        name: max(statistics.median(a - b for a, b in zip(times[name], times["base"])), 1e-3)
        for name in ("dense", "sparse")
    }
    pick = "sparse" if use_sparse(experts, top_k, device) else "dense"
    return {
        "E": experts,
        "k": top_k,
        "ms": med,
        "adapter": adapter,
        "peak": peak,
        "speedup": adapter["dense"] / adapter["sparse"],
        "pred": experts / (SPARSE_FACTOR[device.type] * top_k),
        "pick": pick,
        "auto_over_best": med[pick] / min(med["dense"], med["sparse"]),
    }


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'E':>5} {'k':>2} {'base ms':>8} {'dense ms':>9} {'sparse ms':>9} | {'adapter dense':>13} "
        f"{'sparse':>7} {'speedup':>7} {'pred':>5} {'fit':>5} | {'peak MB dense':>13} {'sparse':>7} "
        f"{'ratio':>5} | auto   /best"
    )
    print(head)
    for r in rows:
        ms, ad, pk = r["ms"], r["adapter"], r["peak"]
        print(
            f"{r['E']:>5} {r['k']:>2} {ms['base']:>8.1f} {ms['dense']:>9.1f} {ms['sparse']:>9.1f} | "
            f"{ad['dense']:>13.1f} {ad['sparse']:>7.1f} {r['speedup']:>6.2f}x {r['pred']:>5.1f} "
            f"{r['E'] / (r['k'] * r['speedup']):>5.1f} | {pk['dense']:>13.1f} {pk['sparse']:>7.1f} "
            f"{pk['sparse'] / pk['dense']:>5.2f} | {r['pick']:<6} {r['auto_over_best']:.2f}"
        )


def check_targets(rows: list[dict]) -> list[tuple[str, str]]:
    checks = []
    for r in rows:
        if (r["E"], r["k"]) == (256, 8):
            ok = r["speedup"] >= TARGET_SPEEDUP
            checks.append(
                (
                    "ok" if ok else "MISS",
                    f"E=256 top-8: adapter dense / sparse >= {TARGET_SPEEDUP}x: {r['speedup']:.2f}x",
                )
            )
    worst = max(rows, key=lambda r: r["auto_over_best"])
    ok = worst["auto_over_best"] <= TARGET_AUTO
    checks.append(
        (
            "ok" if ok else "MISS",
            f"auto's pick within {TARGET_AUTO:.2f}x of the faster path everywhere: worst {worst['auto_over_best']:.2f}x "
            f"(E={worst['E']} top-{worst['k']}, picked {worst['pick']})",
        )
    )
    return checks


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (each runs every variant once)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--features", type=int, default=2048, help="in = out features of the base layer")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--experts", type=int, nargs="+", default=[20, 64, 256, 1024])
    parser.add_argument("--top-k", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall", help="cpu: this process's CPU time"
    )
    parser.add_argument("--quick", action="store_true", help="CI smoke: tiny shapes, 2 repeats")
    parser.add_argument(
        "--plot", help=argparse.SUPPRESS
    )  # accepted for tests/unit/test_bench.py; no plot here
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.features, args.experts, args.top_k, args.repeats, args.warmup = (
            64,
            64,
            [8, 64],
            [2],
            2,
            1,
        )
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.clock == "cpu" and device.type == "cuda":
        raise SystemExit("--clock cpu does not see GPU time; use --clock wall with --device cuda")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    rows = [run_shape(args, e, k, device, dtype) for e in args.experts for k in args.top_k if k <= e]
    print(
        f"tokens={args.tokens}, in=out={args.features}, r={args.rank}, {args.dtype}, {device.type}, "
        f"threads={torch.get_num_threads()}, {args.repeats} rounds, {args.clock} clock; SPARSE_FACTOR={SPARSE_FACTOR[device.type]}"
    )
    print_table(rows)
    print("\ntargets" + (" (--quick: tiny shapes, informative only)" if args.quick else ""))
    for verdict, text in check_targets(rows):
        print(f"  [{verdict}] {text}")


if __name__ == "__main__":
    main()
