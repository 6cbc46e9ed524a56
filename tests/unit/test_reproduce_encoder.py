"""bench/reproduce_encoder.py --quick end to end on the real all-MiniLM-L6-v2 and Rotten Tomatoes: every
method trains (its loss falls, the classification head included) and the report is written.

Eight runs of 12 steps of batch 16 on one thread. The assertion is deliberately loose (the quick
scale says nothing about which method is better).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_encoder_reproduction_trains_every_method(tmp_path):
    out, work = tmp_path / "results", tmp_path / "work"
    cmd = [
        sys.executable,
        "bench/reproduce_encoder.py",
        "--quick",
        "--out",
        str(out),
        "--work-dir",
        str(work),
    ]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=850)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    summaries = [json.loads(p.read_text()) for p in sorted((out / "quick" / "runs").glob("*.json"))]
    assert sorted(s["method"] for s in summaries) == sorted(
        ["sgd", "sgd+sqrt", "rsgd", "grsgd", "adamw", "adamw+sqrt", "radamw", "gradamw"]
    )
    for s in summaries:
        assert s["model"] == "all-MiniLM-L6-v2" and s["classes"] == ["negative", "positive"], s
        assert len(s["loss"]) == s["steps"] == 12 and s["skipped_steps"] == 0, s["method"]
        assert sum(s["loss"][-3:]) / 3 < s["loss"][0], f"{s['method']}: loss did not fall: {s['loss']}"
        assert 0 <= s["accuracy_before"] <= 1 and 0 <= s["accuracy_after"] <= 1, s["method"]
    # the pairs' members start from the same model (same seed: same head; B = 0): the same accuracy before
    assert len({s["accuracy_before"] for s in summaries}) == 1, [s["accuracy_before"] for s in summaries]
    table = (out / "quick" / "table.md").read_text()
    assert "all-MiniLM-L6-v2, 12 steps of 16" in table, table
    assert all(f"| {s['method']} |" in table for s in summaries), table
    assert "(one value, no choice)" in (out / "quick" / "lr_choice.md").read_text()
    for png in ("figure2.png", "loss_rotten_tomatoes.png"):
        assert (out / "quick" / png).read_bytes()[:4] == b"\x89PNG"
    # a rerun reads every finished run back instead of training it again
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and " step " not in again.stdout, again.stdout[-2000:]
