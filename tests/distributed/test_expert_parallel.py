"""Expert parallelism on 2 (and 4) gloo processes against the same runs without it.

- The real ``Trainer`` (tests/distributed/parity_worker.py, one torchrun launch): EP=2 against EP=1 on
  the same global batch, for both ways (``expert_parallel_mode`` gather and dispatch), rsgd and gradamw,
  ZeRO-0, 1 and 2, 4 steps: losses per step and every adapter tensor of the exported adapter (gathered by
  the EP run into one file of the unsharded shapes). Also on 4 processes (ZeRO-1/2, gradamw), where each
  expert shard has two data-parallel replicas whose gradients DeepSpeed averages over their group.
- One layer (tests/distributed/ep_layer_worker.py) whose rank-1 experts receive no token: it finishes,
  and its output and gradients equal the unsharded layer's, for weight gather (dense and sparse compute)
  and token dispatch.
- Resume with EP: a run resumed from its step-3 checkpoint gives the same step-4 loss and adapter as
  the uninterrupted run.
- Bad input: one line each, before the model loads.

Tolerances: the two sides compute the same products on the same values (the gathered experts are the
unsharded ones bit for bit; dispatched rows are the same rows); only the order of sums differs (gather:
all-reduce over the EP group, then DeepSpeed's reduction, against DeepSpeed's reduction alone; dispatch
also sums a token's k expert outputs, and an expert's gradient over its pairs, in another order), so
the float32 budget of test_zero_parity.py applies (loss rtol 1e-6, adapter rtol 2e-5 / atol 2e-6).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch.train import main as train_main
from molora_ds.inject import ADAPTER_WEIGHTS
from tests.distributed.ep_layer_worker import IN, OUT, TOKENS

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("parity_worker.py")
LAYER_WORKER = Path(__file__).with_name("ep_layer_worker.py")
TINY = ROOT / "recipes" / "tiny.yaml"
STEPS = 4
LRS = {"rsgd": (1e-2, 1.0), "gradamw": (1e-3, 1e-2)}  # as test_zero_parity.py: the router moves
STAGES = (0, 1, 2)
WAYS = ("gather", "dispatch")  # expert_parallel_mode of the EP=2 runs
RUNS = [(stage, method, way) for stage in STAGES for method in LRS for way in ("ep1", *WAYS)]
LOSS_RTOL = 1e-6
ADAPTER_TOL = {"rtol": 2e-5, "atol": 2e-6}


def _name(stage: int, method: str, way: str) -> str:
    return f"zero{stage}-{method}-{way}"


def _torchrun(args: list[str], timeout: int, procs: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *args]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc


def _spec(runs: list[tuple[int, str, str]]) -> list[dict]:
    spec = []
    for stage, method, way in runs:
        lr, gate_lr = LRS[method]
        ep = 1 if way == "ep1" else 2
        spec.append(
            {
                "name": _name(stage, method, way),
                "ds_config": f"zero{stage}.json",
                "recipe_overrides": [
                    f"optim.method={method}",
                    f"optim.lr={lr!r}",
                    f"optim.gate_lr={gate_lr!r}",
                    f"molora.expert_parallel_size={ep}",
                    f"molora.expert_parallel_mode={'gather' if ep == 1 else way}",
                    f"train.max_steps={STEPS}",
                    "train.save_every=1000000",
                    "eval.before=false",
                    "eval.after=false",
                ],
            }
        )
    return spec


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("expert_parallel")
    (root / "spec.json").write_text(json.dumps(_spec(RUNS)))
    _torchrun([str(WORKER), str(root / "spec.json"), str(root / "runs")], timeout=560)
    return root / "runs"


# 4 processes, EP=2: two expert-data-parallel groups of 2, so expert gradients are also averaged over a
# group (on 2 processes that group has one rank and the reduction does nothing).
# rsgd too: SGD's step is proportional to the gradient, so a wrong averaging factor shows (Adam would hide it).
RUNS_4 = [
    (stage, method, way)
    for stage, method in ((1, "rsgd"), (2, "rsgd"), (2, "gradamw"))
    for way in ("ep1", *WAYS)
]


@pytest.fixture(scope="module")
def runs_4(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("expert_parallel_4")
    (root / "spec.json").write_text(json.dumps(_spec(RUNS_4)))
    _torchrun([str(WORKER), str(root / "spec.json"), str(root / "runs")], timeout=560, procs=4)
    return root / "runs"


def _losses(out: Path) -> list[float]:
    errors = list(out.glob("error.rank*.txt"))
    assert not errors, errors[0].read_text()[-3000:]
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage,method,way", [(s, m, w) for s in STAGES for m in LRS for w in WAYS])
def test_ep2_equals_ep1(runs, stage, method, way):
    _assert_same_training(runs / _name(stage, method, "ep1"), runs / _name(stage, method, way))


@pytest.mark.parametrize("stage,method,way", [r for r in RUNS_4 if r[2] != "ep1"])
def test_ep2_equals_ep1_on_4_processes(runs_4, stage, method, way):
    _assert_same_training(runs_4 / _name(stage, method, "ep1"), runs_4 / _name(stage, method, way))


def _assert_same_training(one: Path, two: Path) -> None:
    losses = _losses(two)
    assert len(losses) == STEPS
    torch.testing.assert_close(losses, _losses(one), rtol=LOSS_RTOL, atol=0)
    want, got = load_file(one / "adapter" / ADAPTER_WEIGHTS), load_file(two / "adapter" / ADAPTER_WEIGHTS)
    assert got.keys() == want.keys()
    moved = 0.0
    for key in want:
        torch.testing.assert_close(got[key], want[key], **ADAPTER_TOL, msg=lambda m, key=key: f"{key}: {m}")
        if key.endswith("lora_B"):
            moved = max(moved, want[key].abs().max().item())
    assert moved > 1e-3, "B never left zero: the comparison would not bite"
    config = json.loads((two / "adapter" / "adapter_config.json").read_text())
    assert config["expert_parallel_size"] == 1  # the exported adapter loads without EP


@pytest.fixture(scope="module")
def layer_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ep_layer") / "layer.pt"
    _torchrun([str(LAYER_WORKER), str(out)], timeout=300)
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("way", ["dense", "sparse", "sparse_fp32", "dispatch", "dispatch_bf16"])
def test_rank_without_tokens(layer_results, way):
    """Rank 1's experts get no token; the layer neither hangs nor differs from the unsharded one (weight
    gather with either compute path, token dispatch). Both ranks see the same tokens, so an expert's
    gradient (summed over the EP group) is twice one rank's. float64: gather computes the same sums as the
    reference, dispatch sums each token's k pairs in another order (index_add after the all-to-all).
    bf16 autocast: test_autocast.py's norm-wise bound (5 roundings of unit roundoff 2^-8). fp32 (the fused
    router-and-experts path): the same operations on the same gathered weights, bit for bit; the summed expert
    gradients are a + a, exactly 2a."""
    assert layer_results[way + "_load"][2:].sum() == 0
    got, want = layer_results[way], layer_results[way + "_reference"]
    for what, g, w, factor in zip(("y", "dx", "dA", "dB", "d router"), got, want, (1, 1, 2, 2, 1)):
        assert w.abs().max() > 0, what
        if way == "sparse_fp32":
            assert torch.equal(g, factor * w), what
        elif way.endswith("bf16"):
            rel = ((g.double() - factor * w).norm() / (factor * w).norm()).item()
            assert rel < 5 * 2.0**-8, f"{what}: {rel}"
        else:
            torch.testing.assert_close(
                g, factor * w, rtol=1e-12, atol=1e-12, msg=lambda m, w=what: f"{w}: {m}"
            )


@pytest.mark.parametrize("way", ["dense", "sparse", "sparse_fp32"])
def test_weight_gather_keeps_no_gathered_experts(layer_results, way):
    """Weight gather recomputes the layer's adapter (gather included) in the backward, so between forward and
    backward autograd holds only the base layer's weight and the adapter's inputs (x, twice: the router's and
    the experts'), not the E experts (the unsharded copy holds them, or copies of them, and its intermediates)."""
    saved, saved_full = layer_results[way][-1].item(), layer_results[way + "_reference"][-1].item()
    assert saved <= OUT * IN + 2 * TOKENS * IN < saved_full


def test_resume_with_expert_parallelism(tmp_path):
    base = ["launch/train.py", "--config", "ds_configs/zero2.json", "--recipe", str(TINY)]
    flags = [
        "--set",
        "molora.expert_parallel_size=2",
        "--max-steps",
        str(STEPS),
        "--set",
        "eval.before=false",
    ]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _torchrun([*base, *flags, "--output-dir", str(whole), "--set", "eval.after=false"], timeout=400)
    # The resumed run starts from a copy of the step-3 checkpoint only, as after a kill before step 4's save.
    ckpt = resumed / "checkpoints"
    ckpt.mkdir(parents=True)
    subprocess.run(["cp", "-r", str(whole / "checkpoints" / "step00000003"), str(ckpt)], check=True)
    proc = _torchrun(
        [*base, *flags, "--output-dir", str(resumed), "--set", "eval.after=false", "--resume", "auto"], 400
    )
    assert "resumed from" in proc.stdout + proc.stderr
    assert _losses(resumed)[-1] == _losses(whole)[-1]
    a, b = (load_file(d / "adapter" / ADAPTER_WEIGHTS) for d in (whole, resumed))
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    "args,message",
    [
        (["--set", "molora.expert_parallel_size=2"], "needs 2 or more processes, this launch has 1"),
        (["--set", "molora.expert_parallel_size=3"], "does not divide the expert count 4"),
        (
            [
                "--set",
                "molora.expert_parallel_size=4",
                "--set",
                "train.global_batch=12",
                "--dry-run",
                "--world-size",
                "6",
            ],
            "does not divide the 6 processes",
        ),
    ],
)
def test_bad_input_one_line(args, message, capsys):
    assert train_main(["--config", "ds_configs/zero2.json", "--recipe", str(TINY), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_zero3_refused(capsys):
    args = ["--config", "ds_configs/zero3.json", "--recipe", str(TINY), "--dry-run", "--world-size", "2"]
    assert train_main([*args, "--set", "molora.expert_parallel_size=2"]) == 2
    assert "works under ZeRO stages (0, 1, 2), not 3" in capsys.readouterr().err
