"""The cost model of the two expert-parallel ways (DESIGN.md section 3) beside measured communication, 2 processes.

    nice -n 10 python bench/bench_ep_comm.py        # E=256, r=4, top-8, in=out=2048, fp32, gloo, EP=2

Per layer and rank, with ``ep`` ranks in the EP group, in elements moved (forward + backward):
- weight gather (built): all-gather the E/ep shards of A and B, then reduce their gradients:
  ``2 * (ep-1)/ep * E*r*(in+out)`` (on gloo the reduction is an all-reduce, which ExpertGroup uses:
  twice the reduce-scatter's volume, so ``3 * ...`` there);
- token dispatch (not built: DESIGN.md's alternative): all-to-all each (token, expert) pair's x row to the
  expert's rank and its y row back, and dy, dx the same way in the backward:
  ``2 * (ep-1)/ep * T*k*(in+out)``.
So dispatch moves less only when ``T*k < E*r`` (on gloo ``T*k < 1.5*E*r``): the crossover is at
``T* = E*r/k`` tokens per rank (128 at E=256, r=4, k=8). Measured here: the same collectives on the same
volumes (``all_gather`` + ``all_reduce`` exactly as ExpertGroup does them; ``all_to_all_single`` of
``[T*k/ep, in]`` and ``[T*k/ep, out]`` rows, forward and backward), medians of round-robin repeats.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

E, R, K, FEATURES, EP = 256, 4, 8, 2048, 2
TOKENS = [32, 64, 128, 256, 512, 2048]
REPEATS = 7


def _gather_step(a, b):
    import torch
    import torch.distributed as dist

    for shard in (a, b):
        parts = [torch.empty_like(shard) for _ in range(EP)]
        dist.all_gather(parts, shard)
        grad = torch.cat(parts)
        dist.all_reduce(grad)


def _dispatch_step(rows_in, rows_out):
    import torch
    import torch.distributed as dist

    for _ in range(2):  # forward (x out, y back) and backward (dy out, dx back)
        for rows in (rows_in, rows_out):
            dist.all_to_all_single(torch.empty_like(rows), rows)


def worker() -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    a, b = torch.randn(E // EP, R, FEATURES), torch.randn(E // EP, FEATURES, R)
    rows = []
    for tokens in TOKENS:
        pairs = tokens * K  # each rank sends all its pairs' rows, (ep-1)/ep of them to the other rank
        rows_in, rows_out = torch.randn(pairs, FEATURES), torch.randn(pairs, FEATURES)
        steps = {
            "gather": partial(_gather_step, a, b),
            "dispatch": partial(_dispatch_step, rows_in, rows_out),
        }
        times = {name: [] for name in steps}
        for i in range(REPEATS + 1):
            for name in list(steps) if i % 2 else reversed(list(steps)):
                dist.barrier()
                t0 = time.perf_counter()
                steps[name]()
                if i:  # the first round warms up
                    times[name].append((time.perf_counter() - t0) * 1e3)
        share = (EP - 1) / EP
        rows.append(
            (
                tokens,
                3 * share * E * R * 2 * FEATURES,
                2 * share * pairs * 2 * FEATURES,
                statistics.median(times["gather"]),
                statistics.median(times["dispatch"]),
            )
        )
    if dist.get_rank() == 0:
        print(
            f"E={E}, r={R}, top-{K}, in=out={FEATURES}, EP={EP}, fp32, gloo; predicted crossover T* = E*r/k = "
            f"{E * R // K} with a reduce-scatter, 1.5*E*r/k = {3 * E * R // (2 * K)} with gloo's all-reduce"
        )
        print(
            f"{'T/rank':>6} | {'gather M elem':>13} {'dispatch M elem':>15} {'pred':>8} | {'gather ms':>9} {'dispatch ms':>11} {'measured':>8}"
        )
        for tokens, g, d, tg, td in rows:
            pred = "gather" if g < d else "dispatch"
            meas = "gather" if tg < td else "dispatch"
            print(
                f"{tokens:>6} | {g / 1e6:>13.2f} {d / 1e6:>15.2f} {pred:>8} | {tg:>9.2f} {td:>11.2f} {meas:>8}"
            )
    dist.destroy_process_group()


def main() -> None:
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
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=Path(__file__).parent, env=env, capture_output=True, text=True)
    print(proc.stdout, end="")
    if proc.returncode:
        sys.exit(proc.stderr[-4000:])


if __name__ == "__main__":
    main()
