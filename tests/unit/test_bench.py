"""The benchmarks still run: each checks, before timing anything, that its variants compute the same math
(bench_layer: outputs and gradients against the per-expert loop; bench_train: Adam moments of our
optimizer against the per-matrix loop; bench_optim: each path's preconditioned gradients against a
per-expert float64 solve; bench_experts: sparse against dense; bench_ep_comm: dispatch against gather),
so a --quick run is also a test of those comparisons."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.parametrize(
    "script, plots, printed",
    [
        ("bench_layer.py", True, "targets"),
        ("bench_train.py", True, "targets"),
        ("bench_optim.py", False, "targets"),
        ("bench_experts.py", False, "targets"),
        ("bench_ep_memory.py", False, "targets"),  # 2 gloo processes, ZeRO 0/1/2 x EP 1/2
        ("bench_ep_comm.py", False, "measured crossover"),  # 2 gloo processes
    ],
)
def test_quick_run(script, plots, printed, tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            str(BENCH / script),
            "--quick",
            *(["--plot", str(tmp_path / "plot.png")] if plots else []),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert printed in run.stdout
