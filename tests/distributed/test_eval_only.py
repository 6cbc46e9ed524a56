"""``launch/train.py --eval-only --adapter PATH``: a saved adapter scores the recipe's eval data exactly
as the training run that wrote it reported, on 1 and on 2 processes; bad flags fail in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.distributed.launching import ROOT, check_ok, free_port, run


@pytest.mark.distributed
def test_eval_only_reproduces_the_accuracy_training_reported(tmp_path):
    out = tmp_path / "run"
    # lr 1e-2: 6 steps move the tiny model's answers, so that an adapter left unloaded would show.
    check_ok(run([sys.executable, "launch/train.py", "--config", "ds_configs/zero0.json", "--recipe",
                  "recipes/tiny.yaml", "--output-dir", str(out), "--set", "optim.lr=1.0e-2"]))  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    before, after = results["accuracy_before"], results["accuracy_after"]
    assert before != after, (
        "training did not change the accuracy: the test could not tell the adapter was loaded"
    )
    for procs in (1, 2):
        where = tmp_path / f"eval{procs}"
        cmd = ["torchrun", "--nproc_per_node", str(procs), "--master_addr", "127.0.0.1", "--master_port",
               str(free_port()), "launch/train.py", "--config", "ds_configs/zero0.json", "--recipe",
               "recipes/tiny.yaml", "--output-dir", str(where), "--eval-only", "--adapter", str(out / "adapter")]  # fmt: skip
        text = check_ok(run(cmd))
        got = json.loads((where / "eval_results.json").read_text())
        assert (got["accuracy"], got["n"]) == (after["accuracy"], after["n"]), (procs, got, after)
        assert f"{procs} processes): accuracy {after['accuracy']:.4f}" in text


@pytest.mark.distributed
def test_eval_only_flags_fail_in_one_line(tmp_path):
    base = [sys.executable, "launch/train.py", "--config", "ds_configs/zero0.json", "--recipe", "recipes/tiny.yaml",
            "--output-dir", str(tmp_path / "run")]  # fmt: skip
    cases = [
        (["--eval-only"], "error: --eval-only and --adapter PATH go together"),
        (["--adapter", str(tmp_path)], "error: --eval-only and --adapter PATH go together"),
        (["--eval-only", "--adapter", str(tmp_path)], f"error: --adapter {tmp_path}: adapter_model.safetensors, "
                                                      "adapter_config.json not found; point it at a run's adapter/ folder"),
    ]  # fmt: skip
    for extra, message in cases:
        proc = subprocess.run(base + extra, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-500:]
