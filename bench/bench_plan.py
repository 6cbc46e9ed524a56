"""The memory planner against measured peaks: tiny and default recipes under ZeRO 0/2/3 on CPU.

    python bench/bench_plan.py                         # all six runs, 1 process each, ~5 min on 2 cores
    python bench/bench_plan.py --recipes recipes/tiny.yaml --stages 2 --steps 2
    python bench/bench_plan.py --procs 2 --stages 2 3   # 2 processes (torchrun, gloo): every rank's peak

Each run is one process (``python launch/train.py`` would be the same code path), or ``--procs N``
processes under ``torchrun`` (planned for world size N, each rank measured; the table shows the largest
rank's peak), training a few steps with evaluation off, under torch's profiler with ``profile_memory``: the measured figure is
the peak of all tensor bytes the CPU allocator holds (allocations minus frees, in time order),
counted from before the model loads. That is what a GPU's ``max_memory_allocated`` reports, and
it counts buffers torch allocates but never touches (DeepSpeed's 5e8-element reduce bucket), which
an RSS peak would miss. The RSS peak (VmHWM) minus the RSS before the model loads is shown too: it
adds the allocator's and Python's overhead and omits untouched pages. The plan is taken in fp32
(bf16 is off on CPU), at the recipe's micro-batch and ``data.max_len``.
``--gpu`` (not run here: this machine has no GPU) measures ``torch.cuda.max_memory_allocated``
instead and plans in bf16; it skips with a message when CUDA is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_tensor_bytes(prof) -> int:
    """The running sum of the profiler's allocation records (CPU), at its maximum."""
    from torch.autograd import DeviceType

    records = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak


def worker(recipe_path: str, stage: int, steps: int, gpu: bool, out: Path) -> dict:
    """One measured run in this process; returns measured and planned bytes."""
    import torch

    from molora_ds import plan
    from molora_ds.ds_config import load_ds_config, plan_batches
    from molora_ds.recipe import load_recipe
    from molora_ds.trainer import Trainer

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    overrides = [
        f"train.max_steps={steps}",
        "eval.before=false",
        "eval.after=false",
        f"train.save_every={steps + 1}",
    ]
    recipe = load_recipe(recipe_path, overrides)
    ds = load_ds_config(ROOT / "ds_configs" / f"zero{stage}.json")
    rss_before = _rss_kib("VmRSS") * 1024
    if gpu:
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
        Trainer(recipe, ds, out).fit()
        measured = torch.cuda.max_memory_allocated() - base_alloc
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            Trainer(recipe, ds, out).fit()
        measured = _peak_tensor_bytes(prof)
    rss_peak = _rss_kib("VmHWM") * 1024 - rss_before
    world = int(os.environ["WORLD_SIZE"])
    micro, _ = plan_batches(recipe.train, world, ds)
    planned = plan.memory_plan(recipe, ds, world, micro, recipe.data.max_len, gpu, 80 * plan.GIB)
    return {
        "rank": int(os.environ["RANK"]),
        "recipe": Path(recipe_path).stem,
        "stage": stage,
        "measured_tensor_bytes": measured,
        "rss_peak_minus_baseline": rss_peak,
        "planned_total": planned.per_gpu_bytes["total"],
        "planned": planned.per_gpu_bytes,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=["recipes/tiny.yaml", "recipes/default.yaml"])
    p.add_argument("--stages", nargs="+", type=int, default=[0, 2, 3])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--procs", type=int, default=1, help="processes per run (torchrun when > 1)")
    p.add_argument("--gpu", action="store_true", help="measure on CUDA (skips without it)")
    p.add_argument("--worker", nargs=3, metavar=("RECIPE", "STAGE", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            print("skipped: --gpu needs CUDA (torch.cuda.is_available() is false)")
            return 0
    if args.worker:
        recipe, stage, out = args.worker
        print("RESULT " + json.dumps(worker(recipe, int(stage), args.steps, args.gpu, Path(out))))
        return 0
    mib = 2**20
    print(
        "| recipe | ZeRO | planned MiB | measured tensor peak MiB | planned / measured | RSS peak - baseline MiB |"
    )
    print("|---|---|---|---|---|---|")
    for recipe in args.recipes:
        for stage in args.stages:
            out = Path(tempfile.mkdtemp(prefix="bench_plan_")) / "run"
            launcher = [sys.executable]
            if args.procs > 1:
                port = f"--master_port={29500 + os.getpid() % 1000}"
                launcher = ["torchrun", f"--nproc_per_node={args.procs}", "--master_addr=127.0.0.1", port]
            cmd = [*launcher, __file__, "--worker", recipe, str(stage), str(out), "--steps", str(args.steps)]
            cmd += ["--gpu"] if args.gpu else []
            env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                print(f"| {recipe} | {stage} | failed: {done.stderr.strip().splitlines()[-1:]} |||")
                continue
            ranks = [json.loads(line[len("RESULT ") :]) for line in lines]
            r = max(ranks, key=lambda x: x["measured_tensor_bytes"])
            print(
                f"| {r['recipe']} | {stage} | {r['planned_total'] / mib:.0f} | {r['measured_tensor_bytes'] / mib:.0f} | "
                f"{r['planned_total'] / r['measured_tensor_bytes']:.2f} | {r['rss_peak_minus_baseline'] / mib:.0f} |",
                flush=True,
            )
            print(f"<!-- planned parts: {json.dumps(r['planned'])} -->", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
