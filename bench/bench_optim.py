"""The gRAdamW optimizer step against plain fused AdamW on the same parameters.

    python bench/bench_optim.py --threads 1 --clock cpu    # GLM-4-9B q/k/v/o, 40 layers (~4 GB, 2 min)
    python bench/bench_optim.py --quick                    # CI smoke: 1 layer
    python bench/bench_optim.py --device cuda              # on a GPU (skips without CUDA)

E=20, r=4 adapters (``lora_A [E, r, in]``, ``lora_B [E, out, r]``, router ``[E, in]``) at the q/k/v/o
shapes of a model config (``molora_ds/models/configs/<name>.json``); random tensors, no model. All variants
update the same parameters, each with its own optimizer state; every step starts from the same gradients
(restored untimed). Rounds run every variant once, the starting one rotated:

    fused AdamW      torch.optim.AdamW(fused=True) over all those tensors: the unit of the ratios
    hooks path       what a step costs under DeepSpeed (``molora_ds.optim.zero``): the r x r inverses of
                     every layer (``preconditioners_ex``, the forward pre-hook), the gradient hooks
                     (``precondition_a`` / ``precondition_b`` on each layer's gradients), then
                     ``build_optimizer("gradamw", precondition_in_step=False).step()`` (router clip, AdamW)
    in-step path     ``build_optimizer("gradamw").step()``: preconditioning inside the step (no DeepSpeed)

Before anything is timed, each path's preconditioned gradients (read back from its first Adam moment) are
checked against a per-expert float64 ``torch.linalg.solve`` on the first layer.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from molora_ds import MoLoRALinear
from molora_ds.optim import build_optimizer
from molora_ds.optim.riemannian import precondition_a, precondition_b, preconditioners_ex

EXPERTS, RANK, TOP_K, ALPHA = 20, 4, 10, 16.0
LR, GATE_LR, EPS, REG, BETAS = 1e-5, 3e-8, 1e-6, 1e-6, (0.9, 0.999)
MAX_RATIO_VS_FUSED_ADAMW = 1.5  # issue 11, item 5
CONFIGS = Path(__file__).resolve().parents[1] / "molora_ds" / "models" / "configs"
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def attention_shapes(model: str, layers: int | None) -> tuple[int, list[tuple[int, int]]]:
    """(layers, [(in, out) of q, k, v, o]) from the model's config."""
    cfg = json.loads((CONFIGS / f"{model}.json").read_text())
    hidden, head_dim = (
        cfg["hidden_size"],
        cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"]),
    )
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    return layers or cfg["num_hidden_layers"], [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden)]


class Adapters:
    """MoLoRALinear layers whose frozen base stays on the meta device, with fixed random gradients."""

    def __init__(self, modules: list[tuple[int, int]], gen: torch.Generator, device: torch.device) -> None:
        self.model = nn.ModuleList()
        for in_f, out_f in modules:
            layer = MoLoRALinear(
                nn.Linear(in_f, out_f, bias=False, device="meta"), EXPERTS, RANK, TOP_K, ALPHA
            )
            layer.lora_A = nn.Parameter(
                torch.randn(EXPERTS, RANK, in_f, generator=gen).to(device) / math.sqrt(in_f)
            )
            layer.lora_B = nn.Parameter(torch.randn(EXPERTS, out_f, RANK, generator=gen).to(device) * 1e-2)
            layer.router.weight = nn.Parameter(torch.randn(EXPERTS, in_f, generator=gen).to(device) * 1e-2)
            self.model.append(layer)
        self.layers: list[MoLoRALinear] = list(self.model)
        self.params = [p for m in self.layers for p in (m.lora_A, m.lora_B, m.router.weight)]
        self.grads = [torch.randn(p.shape, generator=gen).to(device) * 1e-3 for p in self.params]

    def reset_grads(self) -> None:
        for p, g in zip(self.params, self.grads):
            p.grad = g.clone()

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def hooks_path(adapters: Adapters, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    def step() -> None:
        for m in adapters.layers:  # the forward pre-hooks, once per step
            p_a, p_b, _ = preconditioners_ex(m.lora_A, m.lora_B, REG)
            # The gradient hooks; autograd then stores each result as .grad (copied into the
            # parameter's layout when its strides differ, as AccumulateGrad does).
            m.lora_A.grad = precondition_a(m.lora_A.grad, p_a).contiguous()
            m.lora_B.grad = precondition_b(m.lora_B.grad, p_b).contiguous()
        optimizer.step()

    return step


@torch.no_grad()
def reference(adapters: Adapters) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first layer's preconditioned gradients per expert, float64, at the current parameters."""
    m = adapters.layers[0]
    a, b, grad_a, grad_b = (t.cpu().double() for t in (m.lora_A, m.lora_B, *adapters.grads[:2]))
    eye = torch.eye(RANK, dtype=torch.float64)
    return [
        (
            torch.linalg.solve(b[i].T @ b[i] + REG * eye, grad_a[i]),
            torch.linalg.solve(a[i] @ a[i].T + REG * eye, grad_b[i].T).T,
        )
        for i in range(EXPERTS)
    ]


def check(adapters: Adapters, optimizer: torch.optim.Optimizer, want: list, name: str) -> None:
    """The first Adam moment after one step from zero state is (1 - beta1) x the gradient it used."""
    m = adapters.layers[0]
    for i, pair in enumerate(want):
        for p, w in zip((m.lora_A, m.lora_B), pair):
            got = optimizer.state[p]["exp_avg"][i].cpu().double() / (1 - BETAS[0])
            error = (torch.linalg.norm(got - w) / torch.linalg.norm(w)).item()
            if not error < 1e-5:  # fp32 gradients and moments: a few ulps, norm-wise
                raise AssertionError(f"{name}: expert {i}'s preconditioned gradient is off by {error:.1e}")


@dataclass
class Result:
    name: str
    ms: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.ms)

    @property
    def spread(self) -> str:
        return f"{min(self.ms):.0f}-{max(self.ms):.0f}"


def run(
    modules: list[tuple[int, int]], repeats: int, clock: Callable[[], float], device: torch.device
) -> list[Result]:
    adapters = Adapters(modules, torch.Generator().manual_seed(0), device)
    fused = torch.optim.AdamW(adapters.params, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0, fused=True)
    kw = dict(lr=LR, gate_lr=GATE_LR, eps=EPS, reg=REG)
    hooked = build_optimizer(adapters.model, "gradamw", precondition_in_step=False, **kw)
    in_step = build_optimizer(adapters.model, "gradamw", **kw)
    steps = {
        "fused AdamW": fused.step,
        "hooks path": hooks_path(adapters, hooked),
        "in-step path": in_step.step,
    }
    # First steps: check the math, and allocate the state so that every timed step is a steady-state one.
    for (name, step), optimizer in zip(steps.items(), (fused, hooked, in_step)):
        adapters.reset_grads()
        want = reference(adapters)  # before the step moves the parameters
        step()
        if optimizer is not fused:
            check(adapters, optimizer, want, name)
    names, results = list(steps), {name: Result(name, []) for name in steps}
    for round_ in range(repeats):
        for i in range(len(names)):
            name = names[(round_ + i) % len(names)]
            adapters.reset_grads()
            t0 = clock()
            steps[name]()
            results[name].ms.append(1e3 * (clock() - t0))
    return list(results.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="glm-4-9b", help="a config in molora_ds/models/configs")
    parser.add_argument("--layers", type=int, default=None, help="default: the model's")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall", help="cpu: this process's CPU time"
    )
    parser.add_argument("--quick", action="store_true", help="CI smoke: 1 layer, 2 rounds, 1 thread")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (wall clock, synchronized)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("skipped: --device cuda needs CUDA (torch.cuda.is_available() is false)")
            return
        if args.clock == "cpu":
            raise SystemExit("--clock cpu does not see GPU time; use --clock wall with --device cuda")
        # A step's kernels run asynchronously: read the clock only after they have finished.
        CLOCKS["wall"] = lambda: (torch.cuda.synchronize(), time.perf_counter())[1]
    if args.quick:
        args.layers, args.repeats, args.threads = 1, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        raise SystemExit(
            "--clock cpu sums the CPU time of all threads, which is not a step time; add --threads 1"
        )
    layers, shapes = attention_shapes(args.model, args.layers)
    modules = shapes * layers
    results = run(modules, args.repeats, CLOCKS[args.clock], device)
    params = sum(EXPERTS * (RANK * (i + o) + i) for i, o in modules)
    print(
        f"optimizer step: {args.model} q/k/v/o x {layers} layers, E={EXPERTS}, r={RANK}, {params / 1e6:.1f}M "
        f"parameters; {device.type} fp32, threads={torch.get_num_threads()}, clock={args.clock}, torch {torch.__version__}; "
        f"{args.repeats} rounds"
    )
    unit = results[0].median
    print(f"{'variant':<14} {'median ms':>10} {'min-max ms':>12} {'/ fused AdamW':>14}")
    for r in results:
        print(f"{r.name:<14} {r.median:>10.1f} {r.spread:>12} {r.median / unit:>13.2f}x")
    print("\ntargets" + (" (--quick: 1 layer, informative only)" if args.quick else ""))
    for r in results[1:]:
        ratio = r.median / unit
        verdict = "ok" if ratio <= MAX_RATIO_VS_FUSED_ADAMW else "MISS"
        print(f"  [{verdict}] {r.name} <= {MAX_RATIO_VS_FUSED_ADAMW}x the fused AdamW step: {ratio:.2f}x")


if __name__ == "__main__":
    main()
