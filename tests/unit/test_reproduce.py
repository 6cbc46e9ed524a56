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


def test_report_of_a_partial_comparison(tmp_path):
    """``--report`` on committed summaries (two validation runs, three test runs): the cells give how many seeds
    finished, a pair whose lr grid has not finished gets no lr, and nothing is trained."""
    runs = ROOT / "docs" / "results" / "small" / "runs"
    names = ["rotten_tomatoes__E20k10r4__rsgd__seed0__lr0.001__val.json",
             "rotten_tomatoes__E20k10r4__rsgd__seed0__lr0.003__val.json",
             "rotten_tomatoes__E20k10r4__rsgd__seed0__lr0.001__test.json",
             "rotten_tomatoes__E20k10r4__rsgd__seed1__lr0.001__test.json",
             "rotten_tomatoes__E20k10r4__grsgd__seed0__lr0.001__test.json"]  # fmt: skip
    (tmp_path / "small" / "runs").mkdir(parents=True)
    for name in names:
        (tmp_path / "small" / "runs" / name).write_text((runs / name).read_text())
    cmd = [sys.executable, "bench/reproduce.py", "--report", "--out", str(tmp_path)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    table = (tmp_path / "small" / "table.md").read_text()
    assert "Partial: 5 of 120 runs finished" in table
    acc = [json.loads((runs / n).read_text())["accuracy_after"] for n in names[2:]]
    mean, sd = (acc[0] + acc[1]) / 2, abs(acc[0] - acc[1]) / 2**0.5
    assert f"| rsgd | {mean:.3f} ± {sd:.3f} (n=2) |" in table, table
    assert f"| grsgd | {acc[2]:.3f} (n=1) |" in table, table
    assert (
        "| rotten_tomatoes | rsgd |" not in (tmp_path / "small" / "lr_choice.md").read_text()
    )  # 2 of 3 lrs ran
    assert (tmp_path / "small" / "figure2.png").read_bytes()[:4] == b"\x89PNG"
    assert not list((tmp_path / "small").glob("loss_bigbench*"))  # no run of that task yet: no empty plot
