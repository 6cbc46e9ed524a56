"""A tiny GlmForCausalLM and a tiny LlavaForConditionalGeneration (CLIP tower + Llama), saved with
save_pretrained and trained through the path API with launch/train.py on 2 processes, ZeRO-2 and
ZeRO-3 (the base model then loads partitioned): the loss on a repeated batch falls. The LLaVA run
trains on easy-VQA's images (real PNGs of the easy-vqa package), through its processor."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.launching import ROOT, check_ok, free_port, losses, run
from tests.unit.test_models import save_tiny

QUESTIONS = [
    ("Which colour is the sky on a clear day?", ["green", "blue", "red"], 1),
    ("How many legs has a spider?", ["eight", "six", "four"], 0),
    ("What do bees make?", ["milk", "silk", "honey"], 2),
    ("Which is a fruit?", ["apple", "brick", "spoon"], 0),
    ("Which animal barks?", ["cat", "dog", "fish"], 1),
    ("What is frozen water?", ["steam", "sand", "ice"], 2),
    ("Which is the largest?", ["whale", "mouse", "ant"], 0),
    ("Where do fish live?", ["trees", "water", "deserts"], 1),
]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text(
        "".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS)
    )
    return path


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    """8 easy-VQA questions as ``mc`` rows, each with its image's path."""
    from molora_ds.data.multiple_choice import easy_vqa

    ds = easy_vqa()[0].select(range(0, 80, 10))
    path = tmp_path_factory.mktemp("vqa") / "train.jsonl"
    path.write_text(
        "".join(
            json.dumps({"question": q, "choices": c, "answer": a, "image": im["path"]}) + "\n"
            for q, c, a, im in zip(ds["question"], ds["choices"], ds["answer_index"], ds["image"])
        )
    )
    return path


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("kind", ["glm", "llava"])
def test_tiny_family_trains_on_two_processes(kind, stage, tmp_path, data_file, image_file):
    folder = save_tiny(kind, tmp_path / kind)
    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    # LLaVA: 16 image tokens per image count toward max_len; one worker per rank decodes the images.
    data = data_file if kind == "glm" else image_file
    recipe.write_text(
        f"model: {{name_or_path: {folder}, gradient_checkpointing: true}}\n"
        f"data: {{format: mc, train: {data}, eval: {data}, max_len: 96, image_workers: 1}}\n"
        "molora: {num_experts: 4, rank: 2, top_k: 2, alpha: 4.0, dropout: 0.0}\n"
        "optim: {method: gradamw, lr: 2.0e-2, gate_lr: 1.0e-3}\n"
        "train: {global_batch: 8, max_micro_batch: 4, max_steps: 4, save_every: 4, log_every: 1}\n"
        "eval: {before: false, after: false}\n"
    )
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "launch/train.py", "--config", f"ds_configs/zero{stage}.json", "--recipe", str(recipe),
           "--output-dir", str(out)]  # fmt: skip
    # transformers logs at info level whether from_pretrained ran under zero.Init.
    text = check_ok(run(cmd, env=os.environ | {"TRANSFORMERS_VERBOSITY": "info"}))
    assert re.search(r"4 MoLoRA layers, [\d,]+ trainable", text), text[-2000:]
    if kind == "llava":
        assert "8 training rows with an image, 16 image tokens each" in text, text[-2000:]
    loss = losses(out)
    assert sorted(loss) == [1, 2, 3, 4]
    # Every step sees the same 8 rows: the loss falls at every step (from ~ln(vocab) = 10.8, the
    # random head), by far more than run-to-run rounding (~1e-6).
    assert all(loss[s + 1] < loss[s] - 0.02 for s in (1, 2, 3)), loss
    if stage == 3:  # transformers' own line: the weights went straight into ZeRO-3 partitions
        assert "activating zero.init()" in text, text[-3000:]
    print(kind, stage, loss)


PROBE = """
import contextlib, io, json, sys
sys.argv = ["train.py"]
sys.path.insert(0, "launch")
from train import main
err = io.StringIO()
with contextlib.redirect_stderr(err):
    rc = main(%r)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("deepspeed", "transformers"))
print(json.dumps({"rc": rc, "err": err.getvalue(), "heavy": heavy}))
"""


@pytest.mark.distributed
def test_bad_data_is_rejected_before_the_model_loads(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5}) + "\n")
    argv = ["--config", "ds_configs/zero2.json", "--recipe", "recipes/tiny.yaml", "--output-dir", str(tmp_path / "run"),
            "--set", "data.format=mc", "--set", f"data.train={bad}", "--set", f"data.eval={bad}"]  # fmt: skip
    probe = subprocess.run(
        [sys.executable, "-c", PROBE % (argv,)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    report = json.loads(probe.stdout.strip().splitlines()[-1])
    assert report["rc"] == 2
    assert (
        report["err"].strip()
        == f"error: data.train {bad}: row 0: answer index 5 is out of range for 2 choices"
    )
    assert report["heavy"] == [], report["heavy"][:5]
    assert not (tmp_path / "run").exists()
