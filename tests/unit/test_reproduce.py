"""bench/reproduce.py --quick end to end: every method trains (its loss falls) and the report is written.

Eight real runs of SmolLM2-135M on Rotten Tomatoes, 12 steps each: minutes, hence ``slow``. The
assertion is deliberately loose (the quick scale says nothing about which method is better).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_quick_reproduction_trains_every_method(tmp_path):
    out, work = tmp_path / "results", tmp_path / "work"
    cmd = [sys.executable, "bench/reproduce.py", "--quick", "--out", str(out), "--work-dir", str(work)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1700)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    summaries = [json.loads(p.read_text()) for p in sorted((out / "quick" / "runs").glob("*.json"))]
    assert sorted(s["method"] for s in summaries) == sorted(
        ["sgd", "sgd+sqrt", "rsgd", "grsgd", "adamw", "adamw+sqrt", "radamw", "gradamw"]
    )
    for s in summaries:
        losses = [x for x in s["loss"] if x is not None]
        assert len(losses) == s["steps"] == 12, s["method"]
        assert sum(losses[-3:]) / 3 < losses[0], f"{s['method']}: loss did not fall: {losses}"
    table = (out / "quick" / "table.md").read_text()
    assert all(f"| {s['method']} |" in table for s in summaries), table
    assert "(one value, no choice)" in (out / "quick" / "lr_choice.md").read_text()
    for png in ("figure2.png", "loss_rotten_tomatoes.png"):
        assert (out / "quick" / png).read_bytes()[:4] == b"\x89PNG"
