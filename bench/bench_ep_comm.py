"""The two expert-parallel ways, weight gather and token dispatch, measured beside their cost model, 2 processes.

    nice -n 10 python bench/bench_ep_comm.py        # E=256, r=4, top-8, in=out=2048, fp32, gloo, EP=2
    python bench/bench_ep_comm.py --quick           # smoke run: E=32, in=out=256, 2 token counts

Cost model (``molora_ds.distributed.expert_parallel.dispatch_wins``), per layer and rank, in elements moved
(forward + backward), with ``ep`` ranks in the EP group:
- weight gather: all-gather the E/ep shards of A and B, again in the backward (the adapter is recomputed
  there), then reduce their gradients: ``3 * (ep-1)/ep * E*r*(in+out)`` (on gloo the reduction is an
  all-reduce, which ExpertGroup uses: twice the reduce-scatter's volume, so ``4 * ...`` there);
- token dispatch: all-to-all a token's x row once to each rank that holds any of its experts (at most
  ``min(k, ep)``) and the summed y row back, and dy, dx the same way in the backward:
  ``2 * (ep-1)/ep * T*min(k, ep)*(in+out)``.
So dispatch moves less only when ``T*min(k, ep) < 1.5*E*r`` (on gloo ``2*E*r``): the crossover is at
``T* = 1.5*E*r/min(k, ep)`` tokens per rank (768 at E=256, r=4, k=8, ep=2; 1024 on gloo). Until 2026-12-02
weight gather kept the gathered experts from forward to backward (one all-gather: T* 512, 768 on gloo,
measured between 512 and 768); before that a row went once per (token, expert) pair, ``T*k`` rows: T* was
128 (192 on gloo), measured between 128 and 192.

Measured, per T (tokens per rank, different on each rank): ``comm``, the collectives alone on the model's
volumes (``all_gather`` + ``all_reduce`` exactly as ExpertGroup does them; ``all_to_all_single`` of
``[T*min(k, ep), in]`` and ``[T*min(k, ep), out]`` rows, forward and backward); ``layer``, one sharded ``MoLoRALinear``'s
forward + backward end to end (``expert_parallel_mode`` gather, with the sparse compute ``auto`` picks
here, and dispatch), the frozen base layer included in both. Before timing, the two layers are checked to
give the same output and gradients. Medians of alternating rounds; the measured crossover is where the
faster layer changes.
"""

from __future__ import annotations

import copy
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

E, R, K, FEATURES, EP = 256, 4, 8, 2048, 2
TOKENS = [32, 64, 128, 256, 512, 768, 1024, 2048]
REPEATS = 5


def _quick() -> None:
    """Smoke-run sizes (``--quick``, tests/unit/test_bench.py): the same check and table, in seconds."""
    global E, FEATURES, TOKENS, REPEATS
    E, FEATURES, TOKENS, REPEATS = 32, 256, [16, 64], 1


def _gather_comm(a, b):
    import torch
    import torch.distributed as dist

    for shard in (a, b):
        for _ in range(2):  # the forward's and the backward's recomputation
            parts = [torch.empty_like(shard) for _ in range(EP)]
            dist.all_gather(parts, shard)
        grad = torch.cat(parts)
        dist.all_reduce(grad)


def _dispatch_comm(rows_in, rows_out):
    import torch
    import torch.distributed as dist

    for _ in range(2):  # forward (x out, y back) and backward (dy out, dx back)
        for rows in (rows_in, rows_out):
            dist.all_to_all_single(torch.empty_like(rows), rows)


def _layer_step(layer, x, dy):
    layer(x).backward(dy)
    x.grad = layer.lora_A.grad = layer.lora_B.grad = layer.router.weight.grad = None


def _layers():
    import torch
    from torch import nn

    from molora_ds import MoLoRALinear
    from molora_ds.distributed.expert_parallel import ExpertGroup

    torch.manual_seed(0)  # the same adapter on both ranks, as apply_molora on one seed
    base = nn.Linear(FEATURES, FEATURES)
    layer = MoLoRALinear(base, E, R, K, alpha=16.0, expert_compute="sparse")
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.02)
    ep = ExpertGroup(EP)
    layers = {}
    for way in ("gather", "dispatch"):
        layers[way] = copy.deepcopy(layer)
        layers[way].shard_experts(ep, dispatch=way == "dispatch")
    return layers


def _check_same_math(layers, x, dy) -> None:
    import torch

    results = []
    for layer in layers.values():
        xg = x.detach().clone().requires_grad_(True)
        y = layer(xg)
        y.backward(dy)
        results.append([y.detach(), xg.grad, layer.lora_A.grad, layer.lora_B.grad, layer.router.weight.grad])
        layer.zero_grad(set_to_none=True)
    for what, got, want in zip(["y", "dx", "dA", "dB", "d router"], *results):
        torch.testing.assert_close(got, want, msg=lambda m, what=what: f"dispatch vs gather, {what}: {m}")


def worker() -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from molora_ds.distributed.expert_parallel import dispatch_wins

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)  # ExpertGroup uses DeepSpeed's groups
    torch.set_num_threads(1)
    layers = _layers()
    torch.manual_seed(1 + dist.get_rank())  # each rank its own tokens
    a, b = torch.randn(E // EP, R, FEATURES), torch.randn(E // EP, FEATURES, R)
    rows = []
    for tokens in TOKENS:
        sent = tokens * min(K, EP)  # a token's row once per rank holding its experts, (ep-1)/ep of them away
        x = torch.randn(tokens, FEATURES, requires_grad=True)
        dy = torch.randn(tokens, FEATURES)
        if tokens == TOKENS[0]:
            _check_same_math(layers, x, dy)
        steps = {
            "comm gather": partial(_gather_comm, a, b),
            "comm dispatch": partial(
                _dispatch_comm, torch.randn(sent, FEATURES), torch.randn(sent, FEATURES)
            ),
            "layer gather": partial(_layer_step, layers["gather"], x, dy),
            "layer dispatch": partial(_layer_step, layers["dispatch"], x, dy),
        }
        times = {name: [] for name in steps}
        for i in range(REPEATS + 1):
            names = list(steps)
            for name in names[i % len(names) :] + names[: i % len(names)]:
                dist.barrier()
                t0 = time.perf_counter()
                steps[name]()
                if i:  # the first round warms up
                    times[name].append((time.perf_counter() - t0) * 1e3)
        share = (EP - 1) / EP
        med = {name: statistics.median(t) for name, t in times.items()}
        rows.append((tokens, 4 * share * E * R * 2 * FEATURES, 2 * share * sent * 2 * FEATURES, med))
    if dist.get_rank() == 0:
        _report(rows, dispatch_wins)
    dist.destroy_process_group()


def _report(rows, dispatch_wins) -> None:
    print(
        f"E={E}, r={R}, top-{K}, in=out={FEATURES}, EP={EP}, fp32, gloo, 1 thread per rank, {REPEATS} rounds; "
        f"predicted crossover T* = 2*E*r/min(k, ep) = {2 * E * R // min(K, EP)} (gloo's all-reduce; "
        f"1.5*E*r/min(k, ep) = {3 * E * R // (2 * min(K, EP))} with a reduce-scatter)"
    )
    print(
        f"{'T/rank':>6} | {'gather M elem':>13} {'dispatch M elem':>15} {'pred':>8} | {'comm ms gather':>14} "
        f"{'dispatch':>8} | {'layer ms gather':>15} {'dispatch':>8} {'faster':>8}"
    )
    faster = []
    for tokens, g, d, med in rows:
        pred = "dispatch" if dispatch_wins(E, R, K, tokens, EP, reduce_scatter=False) else "gather"
        lg, ld = med["layer gather"], med["layer dispatch"]
        faster.append("dispatch" if ld < lg else "gather")
        print(
            f"{tokens:>6} | {g / 1e6:>13.2f} {d / 1e6:>15.2f} {pred:>8} | {med['comm gather']:>14.2f} "
            f"{med['comm dispatch']:>8.2f} | {lg:>15.2f} {ld:>8.2f} {faster[-1]:>8}"
        )
    changes = [(rows[i][0], rows[i + 1][0]) for i in range(len(rows) - 1) if faster[i] != faster[i + 1]]
    where = ", ".join(f"between {lo} and {hi}" for lo, hi in changes) or "none in this range"
    print(f"measured crossover (layer forward + backward): {where} tokens per rank")


def main() -> None:
    quick = "--quick" in sys.argv
    if quick:
        _quick()
    if "--worker" in sys.argv:
        worker()
        return
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={EP}",
        __file__,
        "--worker",
        *(["--quick"] if quick else []),
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=Path(__file__).parent, env=env, capture_output=True, text=True)
    print(proc.stdout, end="")
    if proc.returncode:
        sys.exit(proc.stderr[-4000:])


if __name__ == "__main__":
    main()
