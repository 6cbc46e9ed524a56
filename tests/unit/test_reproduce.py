"""bench/reproduce.py --quick end to end: every method trains (its loss falls) and the report is written.

Eight real runs on Rotten Tomatoes, 12 steps each, of the built-in tiny Llama (the real architecture, random
weights, SmolLM2's tokenizer): about a minute, ``slow`` for the launches. The same eight runs of SmolLM2-135M
(``--quick`` as documented) took 10 minutes of CI; the trainer's path with that model is run by
test_head_to_head.py's SmolLM2 test. The assertion is deliberately loose (the quick scale says nothing about
which method is better).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_quick_reproduction_trains_every_method(tmp_path):
    out, work = tmp_path / "results", tmp_path / "work"
    cmd = [sys.executable, "bench/reproduce.py", "--quick", "--model", "tiny-llama", "--out", str(out),
           "--work-dir", str(work)]  # fmt: skip
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


def test_paper_scale_trains_on_the_users_files_in_their_schemas(tmp_path):
    """``--scale paper`` reads the four QA tasks from the files paper_<task>.yaml names (here the published-schema
    fixtures of test_formats.py): train from data.train, the test split from data.eval; each run's recipe has
    the paper's prompt (scored by generation), batch, steps and lr. A missing file: one line, exit 2."""
    sys.path.insert(0, str(ROOT / "bench"))
    import reproduce
    import yaml

    # a copy: reading caches beside the data, which must not land in the repo
    fixtures = Path(shutil.copytree(ROOT / "tests" / "fixtures" / "formats", tmp_path / "formats"))
    for task in reproduce.PAPER_TASKS:
        spec = yaml.safe_load((ROOT / "recipes" / f"paper_{task}.yaml").read_text())
        spec["data"] |= {"train": str(fixtures / f"{task}.jsonl"), "eval": str(fixtures / f"{task}.jsonl")}
        (tmp_path / f"paper_{task}.yaml").write_text(yaml.safe_dump(spec))
    recipes = {t: str(tmp_path / f"paper_{t}.yaml") for t in reproduce.PAPER_TASKS}
    scale = dataclasses.replace(reproduce.SCALES["paper"], data_recipes=recipes)
    splits = reproduce.write_splits(scale, "commonsense_qa", tmp_path / "work")
    rows = [json.loads(line) for line in splits["train"].read_text().splitlines()]
    assert [(r["question"], r["answer"]) for r in rows] == [
        ("Where would you put a cup after washing it?", 0), ("What do people use to cut paper?", 1)]  # fmt: skip
    assert len(splits["test"].read_text().splitlines()) == 2 and splits["val"].read_text() == ""
    science = reproduce.write_splits(scale, "science_qa", tmp_path / "work")
    assert len(science["train"].read_text().splitlines()) == 2  # the image question is not for a text model
    run = reproduce.Run("commonsense_qa", (20, 10, 4), "gradamw", 0, 1e-5, "test")
    spec = reproduce.recipe(scale, run, splits)
    assert spec["data"]["prompt"] == "paper" and spec["eval"]["method"] == "generate"
    assert (spec["train"]["global_batch"], spec["train"]["max_steps"], spec["optim"]["lr"]) == (
        80,
        2000,
        1e-5,
    )

    (tmp_path / "paper_openbookqa.yaml").write_text(
        (tmp_path / "paper_openbookqa.yaml").read_text().replace(str(fixtures), "/no/such/dir"))  # fmt: skip
    cmd = [sys.executable, "bench/reproduce.py", "--scale", "paper", "--data-recipes", str(tmp_path),
           "--work-dir", str(tmp_path / "w2"), "--out", str(tmp_path / "out")]  # fmt: skip
    bad = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "/no/such/dir" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_each_pair_takes_the_lr_its_baseline_chose():
    """Only the baseline runs the grid, so its validation accuracy alone sets the pair's lr (ties: the smaller
    lr; a diverged run, accuracy None, never wins); a grid of one value is taken as it is."""
    sys.path.insert(0, str(ROOT / "bench"))
    import reproduce

    scale = reproduce.SCALES["small"]
    assert {r.method for r in reproduce.choice_runs(scale)} == {base for base, _ in reproduce.PAIRS}
    accuracy = {"rsgd": {1e-3: 0.40, 3e-3: 0.45, 1e-2: None}, "radamw": {5e-4: 0.7, 2e-3: 0.7, 5e-3: 0.6},
                "sgd": {0.03: 0.5, 0.1: 0.55, 0.3: 0.52}, "adamw": {5e-4: 0.3, 2e-3: 0.8, 5e-3: 0.79}}  # fmt: skip
    results = [{"task": t, "method": m, "lr": lr, "accuracy_after": a}
               for t in scale.tasks for m, grid in accuracy.items() for lr, a in grid.items()]  # fmt: skip
    lrs = reproduce.chosen_lrs(scale, results)
    assert {base: lrs[scale.tasks[0], base] for base in accuracy} == {
        "rsgd": 3e-3, "radamw": 5e-4, "sgd": 0.1, "adamw": 2e-3}  # fmt: skip
    runs = reproduce.final_runs(scale, lrs)
    for base, treated in reproduce.PAIRS:
        assert {r.lr for r in runs if r.method in (base, treated)} == {lrs[scale.tasks[0], base]}
    quick = reproduce.SCALES["quick"]
    assert reproduce.chosen_lrs(quick, [])[quick.tasks[0], "adamw"] == quick.grids["adamw"][0]
