"""The benchmarks still run: each checks, before timing anything, that its variants compute the same math
(bench_layer: outputs and gradients against the per-expert loop; bench_train: Adam moments of our
optimizer against the per-matrix loop; bench_optim: each path's preconditioned gradients against a
per-expert float64 solve; bench_experts: sparse against dense), so a --quick run is also a test of those
comparisons."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.parametrize(
    "script, plots",
    [
        ("bench_layer.py", True),
        ("bench_train.py", True),
        ("bench_optim.py", False),
        ("bench_experts.py", False),
    ],
)
def test_quick_run(script, plots, tmp_path):
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
    assert "targets" in run.stdout
