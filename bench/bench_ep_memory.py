"""Per-rank expert memory with expert parallelism: EP=2 against EP=1 on 2 processes, ZeRO 0/1/2 (issue 12).

    nice -n 10 python bench/bench_ep_memory.py                 # tiny recipe, E=256 top-8, 2 gloo processes
    python bench/bench_ep_memory.py --quick                    # smoke run: E=16, top-2 (tests/unit/test_bench.py)

One torchrun launch (2 processes, gloo); for each ZeRO stage and EP size a ``Trainer`` on recipes/tiny.yaml
(``--experts``, ``--top-k``) takes one optimizer step, and each rank reports, in MB:
- ``weights``: its stored expert parameters (lora_A, lora_B: the E/ep shard);
- ``grads``: their gradient at the accumulation boundary, right before the optimizer step: ``.grad``
  under ZeRO-0, the expert group's reduced gradient partition (``averaged_gradients``) under ZeRO-1/2;
- ``opt state``: the experts' optimizer state: the client optimizer's state of lora_A/lora_B under ZeRO-0;
  under ZeRO-1/2 the expert group's fp32 partition and the base optimizer's state of it (gRAdamW moments);
- ``gathered``: what weight gather materialises per layer (the largest) during the forward and backward,
  the whole layer's ``E*r*(in+out)`` fp32 weights (and as much gradient before the reduce-scatter), by
  formula, not measured. The backward recomputes the layer's adapter (gather included), so one layer's copy is
  alive at a time (before stop 18 the forward saved them: every layer's, the unsharded size, until its backward).
The table shows the larger of the two ranks and the ratio EP=2 / EP=1 (target for weights + grads: 0.55).
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

TARGET = 0.55  # per-rank expert weights + grads, EP=2 over EP=1
MB = 2**20


def _tensor_bytes(obj) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _expert_state(zero_opt, params: list) -> tuple[int, int]:
    """(gradient bytes held by ZeRO-1/2 for the experts at the boundary, optimizer state bytes of the experts).

    ZeRO-1/2 keep one flat fp32 partition per parameter group (the base optimizer's parameter, keyed in its
    state) and the group's reduced gradient partition in ``averaged_gradients``; ZeRO-0 keeps ``.grad``
    (counted by the caller) and the client optimizer's state per parameter.
    """
    if not hasattr(zero_opt, "bit16_groups"):
        return 0, _tensor_bytes([zero_opt.state.get(p, {}) for p in params])
    ids = {id(p) for p in params}
    groups = [i for i, group in enumerate(zero_opt.bit16_groups) if any(id(p) in ids for p in group)]
    flat = [zero_opt.single_partition_of_fp32_groups[i] for i in groups]
    grads = _tensor_bytes([zero_opt.averaged_gradients.get(i) for i in groups])
    return grads, _tensor_bytes(flat) + _tensor_bytes([zero_opt.optimizer.state.get(f, {}) for f in flat])


def worker(experts: int, top_k: int, out: Path) -> None:
    import logging

    import torch
    import torch.distributed as dist

    from molora_ds import trainer as trainer_module
    from molora_ds.ds_config import load_ds_config
    from molora_ds.metrics import MetricsLogger
    from molora_ds.recipe import load_recipe

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    MetricsLogger.plot_loss = lambda self: None  # rank 0's plot is not measured here
    rows = []
    for stage in (0, 1, 2):
        for ep in (1, 2):
            overrides = [
                f"molora.num_experts={experts}",
                f"molora.top_k={top_k}",
                f"molora.expert_parallel_size={ep}",
                "train.max_steps=1",
                "train.save_every=1000000",
                "eval.before=false",
                "eval.after=false",
            ]
            recipe = load_recipe(ROOT / "recipes" / "tiny.yaml", overrides)
            ds_config = load_ds_config(ROOT / "ds_configs" / f"zero{stage}.json")
            with tempfile.TemporaryDirectory() as run_dir:
                trainer = trainer_module.Trainer(recipe, ds_config, Path(run_dir))
                engine = trainer.engine
                params = [p for n, p in engine.module.named_parameters() if "lora_A" in n or "lora_B" in n]
                grads = {}
                real_step = engine.step

                def measuring_step(real_step=real_step, params=params, grads=grads, engine=engine):
                    if engine.is_gradient_accumulation_boundary():
                        grads["bytes"] = _tensor_bytes([p.grad for p in params if p.grad is not None])
                        grads["zero"], _ = _expert_state(engine.optimizer, params)
                    real_step()

                engine.step = measuring_step
                trainer.train_step()
                gathered = max(
                    m.num_experts * m.rank * (m.in_features + m.out_features) * 4
                    for m in trainer_module.molora_layers(engine.module).values()
                )
                rows.append(
                    {
                        "stage": stage,
                        "ep": ep,
                        "weights": _tensor_bytes(params) / MB,
                        "grads": (grads["bytes"] + grads["zero"]) / MB,
                        "opt": _expert_state(engine.optimizer, params)[1] / MB,
                        "gathered": gathered / MB if ep > 1 else 0.0,
                    }
                )
                engine.destroy()
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def print_table(ranks: list[list[dict]], experts: int, top_k: int) -> None:
    rows = [{key: max(r[i][key] for r in ranks) for key in ranks[0][i]} for i in range(len(ranks[0]))]
    print(f"recipes/tiny.yaml, E={experts}, top_k={top_k}, 2 processes (gloo), fp32; larger rank, MB")
    print(
        f"{'ZeRO':>4} {'EP':>2} | {'weights':>8} {'grads':>8} {'w+g':>8} {'ratio':>5} | {'opt state':>9} "
        f"{'ratio':>5} | {'gathered/layer':>14}"
    )
    checks = []
    for row in rows:
        one = next(r for r in rows if r["stage"] == row["stage"] and r["ep"] == 1)
        wg, wg1 = row["weights"] + row["grads"], one["weights"] + one["grads"]
        print(
            f"{row['stage']:>4} {row['ep']:>2} | {row['weights']:>8.2f} {row['grads']:>8.2f} {wg:>8.2f} "
            f"{wg / wg1:>5.2f} | {row['opt']:>9.2f} {row['opt'] / one['opt']:>5.2f} | {row['gathered']:>14.2f}"
        )
        if row["ep"] == 2:
            checks.append(
                (wg / wg1 <= TARGET, f"ZeRO-{row['stage']}: weights + grads EP=2 / EP=1 = {wg / wg1:.2f}")
            )
    print("\ntargets")
    for ok, text in checks:
        print(f"  [{'ok' if ok else 'MISS'}] {text} (target <= {TARGET})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="smoke run: E=16, top-2")
    parser.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.experts, args.top_k = 16, 2
    if args.worker:
        worker(args.experts, args.top_k, Path(args.worker))
        return
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
        cmd += ["--experts", str(args.experts), "--top-k", str(args.top_k), "--worker", out]
        env = os.environ | {"OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit((proc.stdout + proc.stderr)[-4000:])
        ranks = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(2)]
    print_table(ranks, args.experts, args.top_k)


if __name__ == "__main__":
    main()
