"""The recipes of the paper's experiments load and carry the paper's settings (DESIGN.md section 5);
they are not trained here (no 3B-9B weights or data sets on this machine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from molora_ds.data.formats import FORMATS
from molora_ds.recipe import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("paper_*.yaml"))


def test_one_recipe_per_paper_experiment():
    names = {p.stem.removeprefix("paper_") for p in RECIPES}
    assert names == {
        "science_qa",
        "commonsense_qa",
        "openbookqa",
        "social_iqa",
        "glue_mnli",
        "visual7w",
        "vmcbench",
    }


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_paper_settings(path):
    r = load_recipe(path)
    m = r.molora
    assert (m.num_experts, m.rank, m.top_k, m.alpha, m.dropout, m.target_modules) == (
        20,
        4,
        10,
        16.0,
        0.05,
        None,
    )
    assert (r.optim.method, r.optim.gate_lr, r.optim.gate_max_grad_norm) == ("gradamw", 3e-8, 1.0)
    assert (r.optim.betas, r.optim.eps, r.optim.weight_decay) == ((0.9, 0.999), 1e-6, 0.0)
    assert (r.train.max_steps, r.train.warmup_steps, r.train.decay_steps) == (2000, 0, None)
    vision = "llava" in r.model.name_or_path
    assert r.train.global_batch == (40 if vision else 80)
    assert r.optim.lr == (1e-6 if "glm" in r.model.name_or_path else 1e-5)  # SCALE_NOTES.md: per model
    assert r.data.format in FORMATS and r.data.prompt == "paper" and r.eval.method == "generate"
    assert r.model.dtype == "bfloat16" and r.model.gradient_checkpointing
