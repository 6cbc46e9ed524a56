"""Recipes and DeepSpeed JSON: every bad input fails in ``load_recipe`` / ``load_ds_config`` /
``plan_batches`` with a message that names the key and what to change, before any model loads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from molora_ds.ds_config import finalize, load_ds_config, plan_batches
from molora_ds.recipe import Recipe, TrainConfig, load_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
DS_CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------- load_recipe
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.molora.gate_rescale == recipe.optim.gate_rescale


def test_no_file_gives_the_paper_defaults():
    recipe = load_recipe(None)
    assert recipe.model.name_or_path == "smollm2-135m"
    assert (recipe.molora.num_experts, recipe.molora.rank, recipe.molora.top_k) == (20, 4, 10)
    assert (recipe.optim.method, recipe.optim.gate_lr, recipe.optim.reg) == ("gradamw", 3e-8, 1e-6)


@pytest.mark.parametrize(
    ("method", "lr", "gate_rescale"),
    [("sgd", 3e-5, False), ("rsgd", 3e-5, False), ("grsgd", 3e-5, True),
     ("adamw", 1e-5, False), ("radamw", 1e-5, False), ("gradamw", 1e-5, True)],
)  # fmt: skip
def test_lr_and_gate_rescale_follow_the_method(method, lr, gate_rescale):
    recipe = load_recipe(None, [f"optim.method={method}"])
    assert recipe.optim.lr == lr  # paper: 3e-5 for the SGD family, 1e-5 for the AdamW family
    assert recipe.molora.gate_rescale is gate_rescale
    assert load_recipe(None, [f"optim.method={method}", "optim.lr=0.5"]).optim.lr == 0.5


def test_set_overrides_parse_values_as_yaml(tmp_path):
    path = write(tmp_path, "r.yaml", "model: tiny-llama\ntrain: {max_steps: 6, seed: 3}\n")
    recipe = load_recipe(
        path,
        [
            "train.max_steps=12",
            "molora.target_modules=[q_proj, k_proj]",
            "molora.dropout=0",
            "eval.before=false",
            "optim.betas=[0.8, 0.9]",
            "data.name=bigbench/timedial",
            "train.decay_steps=null",
        ],
    )
    assert recipe.model.name_or_path == "tiny-llama"
    assert (recipe.train.max_steps, recipe.train.seed, recipe.train.decay_steps) == (12, 3, None)
    assert recipe.molora.target_modules == ["q_proj", "k_proj"]
    assert recipe.molora.dropout == 0.0 and isinstance(recipe.molora.dropout, float)
    assert recipe.eval.before is False
    assert recipe.optim.betas == (0.8, 0.9)
    assert recipe.data.format == "bigbench/timedial"
    assert load_recipe(path, ["molora.target_modules=.*proj"]).molora.target_modules == ".*proj"  # a regex
    assert load_recipe(path, ["model=smollm2-135m"]).model.name_or_path == "smollm2-135m"


@pytest.mark.parametrize("text", ["1e-3", "1.0e-3", "0.001", "'1e-3'"])
def test_exponent_floats_are_numbers(tmp_path, text):
    """YAML 1.1 reads ``1e-3`` as a string; it used to reach the optimizer as one, after the model loaded."""
    assert load_recipe(None, [f"optim.lr={text}"]).optim.lr == 1e-3
    assert load_recipe(write(tmp_path, "r.yaml", f"optim: {{gate_lr: {text}}}\n")).optim.gate_lr == 1e-3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optimizer.lr=1"], "unknown section(s) ['optimizer']; known: ['data', 'eval', 'model', 'molora'"),
        (["molora.nonsense=1"], "unknown key(s) ['nonsense'] in molora; known: ['alpha', 'dropout'"),
        (["train.maxsteps=5"], "unknown key(s) ['maxsteps'] in train; known: ["),
        (["train.max_steps"], "--set 'train.max_steps': expected key=value, e.g. --set molora.top_k=4"),
        (["train=5"], "section 'train' must be a mapping, got 5"),
        (["model.name=x"], "unknown key(s) ['name'] in model; known: ['attn_implementation'"),
        (["model.dtype=fp8"], "model.dtype must be one of"),
        (["data.prompt=paper"], "data.prompt=paper is scored by generation"),
        (["data.format=commonsense_qa"], "data.format 'commonsense_qa' needs data.train"),
        (
            ["train.max_steps=3", "train.max_steps.x=1"],
            "recipe: cannot set train.max_steps.x: 'max_steps' is 3, not a section",
        ),
        (
            ["molora.top_k=5", "molora.num_experts=4"],
            "top_k=5 must be between 1 and the smallest expert count (4)",
        ),
        (["optim.method=adam"], "unknown optimizer method 'adam'; choose one of"),
        (["optim.lr=fast"], "optim.lr must be float | None, got 'fast'"),
        (["optim.betas=[0.9]"], "optim.betas must be tuple[float, float], got [0.9]"),
        (["train.max_steps=5.5"], "train.max_steps must be int, got 5.5"),
        (["train.global_batch=true"], "train.global_batch must be int, got True"),
        (["molora.gate_rescale=1"], "molora.gate_rescale must be bool, got 1"),
        (["molora.target_modules=5"], "molora.target_modules must be list[str] | str | None, got 5"),
        (["model=3"], "model must be str, got 3"),
        (["train.save_every=0"], "train.save_every must be >= 1, got 0"),
        (["train.global_batch=0"], "train.global_batch must be >= 1, got 0"),
        (["train.max_bad_steps=0"], "train.max_bad_steps must be >= 1, got 0"),
        (["train.warmup_steps=-1"], "train.warmup_steps must be >= 0, got -1"),
        (["train.warmup_steps=10", "train.decay_steps=10"], "train.decay_steps=10 must be greater than"),
        (["eval.method=exact"], "eval.method must be 'loglik' or 'generate', got 'exact'"),
        (["eval.batch_size=0"], "eval.batch_size must be >= 1, got 0"),
        (["data.eval_size=0"], "data.eval_size and data.max_len must be >= 1"),
        (["optim.reg=0"], "reg must be > 0"),
        (["optim.precondition=false"], "precondition=False contradicts method='gradamw', which sets"),
        (["optim.method=rsgd", "optim.gate_rescale=true"], "gate_rescale=True contradicts method='rsgd'"),
        (["optim.precondition=1"], "optim.precondition must be bool | None, got 1"),
    ],
)
def test_bad_recipe_values_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_recipe(None, overrides)


@pytest.mark.parametrize(
    ("method", "gate_rescale"), [("gradamw", False), ("grsgd", False), ("radamw", True), ("sgd", True)]
)
def test_gate_rescale_contradicting_the_method_is_an_error(method, gate_rescale):
    with pytest.raises(
        ValueError, match=re.escape(f"molora.gate_rescale={gate_rescale} contradicts optim.gate_rescale")
    ):
        load_recipe(None, [f"optim.method={method}", f"molora.gate_rescale={str(gate_rescale).lower()}"])


def test_gate_rescale_agreeing_with_the_method_is_fine():
    assert (
        load_recipe(None, ["optim.method=radamw", "molora.gate_rescale=false"]).molora.gate_rescale is False
    )
    assert load_recipe(None, ["optim.method=grsgd", "molora.gate_rescale=true"]).molora.gate_rescale is True


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train: [1, 2\n", "is not valid YAML"),
        ("- a\n- b\n", "must be a mapping of sections, got list"),
        ("optim: 3\n", "section 'optim' must be a mapping, got 3"),
        (
            "molora: {num_experts: 4, top_k: 8}\n",
            "top_k=8 must be between 1 and the smallest expert count (4)",
        ),
        ("bogus: {}\n", "unknown section(s) ['bogus']"),
    ],
)
def test_bad_recipe_files(tmp_path, text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_recipe(write(tmp_path, "r.yaml", text))


def test_missing_recipe_file(tmp_path):
    with pytest.raises(
        FileNotFoundError, match="recipe .*nope.yaml not found; pass --recipe with a YAML file"
    ):
        load_recipe(tmp_path / "nope.yaml")


def test_empty_recipe_file_is_the_default(tmp_path):
    assert load_recipe(write(tmp_path, "r.yaml", "")) == load_recipe(None)


@pytest.mark.parametrize(
    ("optim", "name", "precondition", "gate_rescale"),
    [
        (
            ["optim.method=adamw", "optim.gate_rescale=true"],
            "adamw+sqrt",
            False,
            True,
        ),  # the paper's ablation
        (["optim.method=sgd", "optim.precondition=true"], "rsgd", True, False),
        (["optim.method=adamw", "optim.precondition=true", "optim.gate_rescale=true"], "gradamw", True, True),
        (
            ["optim.method=grsgd", "optim.precondition=true"],
            "grsgd",
            True,
            True,
        ),  # agreeing switches are fine
    ],
)
def test_explicit_switches_set_the_layers(optim, name, precondition, gate_rescale):
    recipe = load_recipe(None, optim)
    assert recipe.optim.name == name
    assert recipe.optim.precondition is precondition
    assert recipe.optim.gate_rescale is recipe.molora.gate_rescale is gate_rescale


@pytest.mark.parametrize(
    "optim", [[], ["optim.method=adamw", "optim.gate_rescale=true"], ["optim.method=rsgd"]]
)
def test_to_dict_round_trips_through_yaml(tmp_path, optim):
    import yaml

    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml", ["optim.lr=2e-3", *optim])
    again = load_recipe(write(tmp_path, "saved.yaml", yaml.safe_dump(recipe.to_dict())))
    assert again == recipe


# ---------------------------------------------------------------------------- load_ds_config
@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_shipped_ds_configs_load(path):
    cfg = load_ds_config(path)
    micro, accumulation = plan_batches(TrainConfig(global_batch=16, max_micro_batch=4), 2, cfg)
    out = finalize(cfg, micro, accumulation, 2)
    assert out["train_batch_size"] == 16 and out["zero_allow_untested_optimizer"] is True
    assert out["bf16"]["enabled"] in (True, False)  # "auto" resolved


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        ('{"zero_optimization": {"stage": 2},}', ValueError, "is not valid JSON"),
        ('{"zero_optimization": ', ValueError, "is not valid JSON"),
        ("[1, 2]", ValueError, "must be a JSON object"),
        ('{"optim": {"lr": 1e-3}}', ValueError, "has recipe keys ['optim']: move them to the recipe YAML"),
        ('{"lr": 1e-3, "max_steps": 5}', ValueError, "has recipe keys ['lr', 'max_steps']"),
        (
            '{"optimizer": {"type": "AdamW"}}',
            ValueError,
            "sets 'optimizer'/'scheduler': molora_ds builds them",
        ),
        ('{"scheduler": {"type": "WarmupLR"}}', ValueError, "sets 'optimizer'/'scheduler'"),
    ],
)
def test_bad_ds_configs(tmp_path, text, error, message):
    with pytest.raises(error, match=re.escape(message)):
        load_ds_config(write(tmp_path, "ds.json", text))


def test_missing_ds_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"DeepSpeed config .*none.json not found; pass --config"):
        load_ds_config(tmp_path / "none.json")


# ---------------------------------------------------------------------------- plan_batches
@pytest.mark.parametrize(
    ("global_batch", "max_micro", "world", "expect"),
    [
        (16, 8, 1, (8, 2)),
        (16, 8, 2, (8, 1)),
        (16, 3, 2, (2, 4)),  # the largest divisor of 8 not above 3
        (12, 5, 1, (4, 3)),
        (8, 2, 2, (2, 2)),  # recipes/tiny.yaml on 2 processes
        (8, 2, 1, (2, 4)),  # ... and on 1: the same micro-batches
        (7, 8, 1, (7, 1)),
        (14, 8, 2, (7, 1)),
        (6, 4, 3, (2, 1)),
        (80, 8, 4, (5, 4)),
    ],
)
def test_derived_micro_batch_and_accumulation(global_batch, max_micro, world, expect):
    train = TrainConfig(global_batch=global_batch, max_micro_batch=max_micro)
    micro, accumulation = plan_batches(train, world, {})
    assert (micro, accumulation) == expect
    assert micro * accumulation * world == global_batch and micro <= max_micro


def test_micro_batch_fixed_by_the_ds_config():
    train = TrainConfig(global_batch=16, max_micro_batch=8)
    assert plan_batches(train, 2, {"train_micro_batch_size_per_gpu": 2}) == (2, 4)
    # Consistent values are accepted as they are.
    ds = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}
    assert plan_batches(train, 2, ds) == (4, 2)


@pytest.mark.parametrize(
    ("world", "ds", "message"),
    [
        (3, {}, "train.global_batch=16 is not divisible by the 3 processes; pick a multiple of 3"),
        (2, {"train_batch_size": 32}, "sets train_batch_size=32, but the recipe's global_batch=16 on 2 processes"),
        (2, {"gradient_accumulation_steps": 4}, "sets gradient_accumulation_steps=4, but the recipe's global_batch=16"),
        (2, {"train_micro_batch_size_per_gpu": 3}, "train_micro_batch_size_per_gpu=3 does not divide global_batch/world = 16/2 = 8"),
        (2, {"train_micro_batch_size_per_gpu": "auto"}, "sets train_micro_batch_size_per_gpu='auto'; it must be a positive integer"),
        (2, {"gradient_accumulation_steps": 0}, "sets gradient_accumulation_steps=0; it must be a positive integer"),
    ],
)  # fmt: skip
def test_contradicting_batch_settings(world, ds, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        plan_batches(TrainConfig(global_batch=16, max_micro_batch=8), world, ds)


def test_finalize_fills_the_batch_keys_and_keeps_the_input():
    ds = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}
    out = finalize(ds, 2, 4, 2)
    assert (
        out["train_batch_size"],
        out["train_micro_batch_size_per_gpu"],
        out["gradient_accumulation_steps"],
    ) == (
        16,
        2,
        4,
    )
    assert ds == {"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}
    assert json.loads(json.dumps(out)) == out
