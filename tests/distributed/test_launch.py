"""The product commands, run for real: the deepspeed launcher (2 ranks), plain python (1 process),
bad command lines (exit code 2 in seconds), and a run whose loss turns non-finite.

On a CPU box the deepspeed launcher counts NUMA nodes, not cores, and starts one process; with
``--num_gpus 2`` it starts two (it sets CUDA_VISIBLE_DEVICES=0,1, harmless without CUDA).
"""

from __future__ import annotations

import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from molora_ds import MoLoRAConfig, checkpoint, load_adapter
from tests.distributed.launching import ROOT, check_ok, free_port, metrics, run

METRIC_KEYS = {"step", "loss", "lr/experts", "lr/router", "grad_norm/experts", "grad_norm/router", "tokens_per_s",
               "seconds", "skipped"}  # fmt: skip


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of the TensorBoard event files, read with tensorboardX's protobufs (TFRecord framing:
    length u64, its crc u32, the Event, its crc u32)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


# ---------------------------------------------------------------------------- the product command
@pytest.mark.distributed
def test_deepspeed_launcher_trains_and_writes_every_output(tmp_path):
    out = tmp_path / "run"
    steps = 4
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
           "--config", "ds_configs/zero2.json", "--recipe", "recipes/tiny.yaml", "--output-dir", str(out),
           "--max-steps", str(steps)]  # fmt: skip
    text = check_ok(run(cmd))
    assert "2 processes x micro-batch 2 x accumulation 2 = global batch 8; ZeRO-2" in text

    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for row in rows:
        assert row.keys() >= METRIC_KEYS, f"missing {METRIC_KEYS - row.keys()} in {row}"
        assert all(math.isfinite(row[k]) for k in METRIC_KEYS), row
        assert row["tokens_per_s"] > 0 and row["seconds"] > 0 and row["skipped"] == 0
    assert rows[0]["lr/experts"] == 1e-3 and rows[0]["lr/router"] == 1e-3  # tiny.yaml, no warm-up
    assert rows[-1]["lr/experts"] < rows[0]["lr/experts"]  # linear decay

    scalars = tensorboard_scalars(out)
    for key in ("loss", "lr/experts", "grad_norm/router", "tokens_per_s"):
        assert [s for s, _ in scalars[key]] == list(range(1, steps + 1)), key
    assert [v for _, v in scalars["loss"]] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert "eval/accuracy" in scalars
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "finished" and results["step"] == steps and results["skipped_steps"] == 0
    for key in ("accuracy_before", "accuracy_after"):
        assert results[key]["n"] == 16

    # The adapter is the trained model: bit-equal to the final checkpoint's fp32 weights, and a
    # fresh tiny-llama with it scores the eval set exactly as the trained engine did.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from molora_ds.data.multiple_choice import load_mc_splits
    from molora_ds.eval import mc_accuracy
    from molora_ds.models.loading import load_model
    from molora_ds.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml")
    adapter_dir = out / "adapter"
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert MoLoRAConfig.from_dict(config) == recipe.molora
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    trained = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=f"step{steps:08d}")
    assert weights.keys() and all(torch.equal(v, trained[k]) for k, v in weights.items())
    assert any(k.endswith("lora_B") and v.abs().max() > 0 for k, v in weights.items()), "B never left zero"
    # Checkpoints hold what training changes, not the frozen base (18 GB a save for GLM-4-9B).
    states = torch.load(
        out / "checkpoints" / f"step{steps:08d}" / "mp_rank_00_model_states.pt", weights_only=False
    )
    assert set(states["module"]) == set(weights), sorted(set(states["module"]) - set(weights))[:3]

    model, tokenizer = load_model("tiny-llama")
    _, eval_set = load_mc_splits(recipe.data.name, recipe.data.eval_size, recipe.train.seed)
    ev = (recipe.eval.method, recipe.eval.batch_size, recipe.data.max_len)
    # Before training B = 0: the adapted model scores exactly as the bare one.
    assert mc_accuracy(model, tokenizer, eval_set, *ev) == results["accuracy_before"]
    assert load_adapter(model, adapter_dir) == recipe.molora
    assert mc_accuracy(model, tokenizer, eval_set, *ev) == results["accuracy_after"]


@pytest.mark.distributed
def test_plain_python_trains_on_one_process(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "launch/train.py", "--config", "ds_configs/zero0.json", "--recipe", "recipes/tiny.yaml",
           "--output-dir", str(out), "--max-steps", "2", "--set", "eval.before=false"]  # fmt: skip
    text = check_ok(run(cmd))
    assert "1 processes x micro-batch 2 x accumulation 4 = global batch 8; ZeRO-0" in text
    assert [r["step"] for r in metrics(out)] == [1, 2]
    results = json.loads((out / "results.json").read_text())
    assert (
        results["status"] == "finished" and "accuracy_after" in results and "accuracy_before" not in results
    )
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.distributed
def test_signal_during_first_evaluation_stops_before_training(tmp_path):
    """SIGTERM while the accuracy before training is computed (3 s on 1000 questions): the run
    finishes that evaluation, trains no step, writes no checkpoint or adapter, and exits 0."""
    out = tmp_path / "run"
    cmd = [sys.executable, "launch/train.py", "--config", "ds_configs/zero0.json", "--recipe", "recipes/tiny.yaml",
           "--output-dir", str(out), "--set", "data.eval_size=1000"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # the set-up line is logged after the signal handlers are installed
        lines.append(line)
        if "= global batch" in line:
            proc.send_signal(signal.SIGTERM)
            break
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=120) == 0, "".join(lines)[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "preempted" and results["step"] == 0, results
    assert "accuracy_before" in results and "accuracy_after" not in results
    assert (
        not metrics(out) and not list((out / "checkpoints").glob("step*")) and not (out / "adapter").exists()
    )


# ---------------------------------------------------------------------------- bad command lines
BAD_INPUTS = {
    "missing-config": (["--config", "ds_configs/nope.json"], "error: DeepSpeed config ds_configs/nope.json not found"),
    "malformed-json": (["--config", "{tmp}/bad.json"], "is not valid JSON"),
    "unknown-recipe-key": (["--set", "molora.nonsense=1"], "error: recipe: unknown key(s) ['nonsense'] in molora"),
    "recipe-key-in-ds-json": (["--config", "{tmp}/recipe_key.json"], "has recipe keys ['optim']: move them"),
    "top_k-above-num_experts": (["--set", "molora.top_k=8"], "top_k=8 must be between 1 and the smallest expert"),
    "indivisible-global-batch": (["--set", "train.global_batch=7"], "not divisible by the 2 processes"),
    "missing-recipe": (["--recipe", "recipes/nope.yaml"], "error: recipe recipes/nope.yaml not found"),
    "resume-path-without-checkpoint": (["--resume", "{tmp}"], "no complete checkpoint there"),
    "resume-into-another-zero-stage": (["--output-dir", "{tmp}/zero3_run", "--resume", "auto"],
                                       "was saved under ZeRO-3, this run uses ZeRO-2"),
}  # fmt: skip

# Runs launch/train.py's main() on each bad command line in one interpreter (each alone is mostly
# the ~3 s torch import) and reports exit code, stderr, seconds, and whether the heavy modules
# (DeepSpeed, transformers: the model) were ever imported.
CLI_PROBE = """
import contextlib, io, json, sys, time
sys.path.insert(0, "launch")
from train import main
cases, report = json.loads(sys.argv[1]), {}
for name, argv in cases.items():
    err, t0 = io.StringIO(), time.perf_counter()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    report[name] = [rc, err.getvalue(), time.perf_counter() - t0]
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("deepspeed", "transformers"))
print(json.dumps({"cases": report, "heavy": heavy}))
"""


@pytest.mark.distributed
def test_bad_inputs_exit_2_with_one_line_before_the_model_loads(tmp_path):
    (tmp_path / "bad.json").write_text('{"zero_optimization": {"stage": 2}')
    (tmp_path / "recipe_key.json").write_text('{"zero_optimization": {"stage": 2}, "optim": {"lr": 1e-3}}')
    zero3 = tmp_path / "zero3_run" / "checkpoints" / "step00000002"  # a complete checkpoint of a ZeRO-3 run
    zero3.mkdir(parents=True)
    (zero3 / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"0" * 10)
    (zero3 / checkpoint.META).write_text(json.dumps({"step": 2, "world_size": 2, "zero_stage": 3}))
    checkpoint.mark_complete(zero3)
    base = [
        "--config",
        "ds_configs/zero2.json",
        "--recipe",
        "recipes/tiny.yaml",
        "--output-dir",
        str(tmp_path / "run"),
    ]
    cases = {name: base + [a.format(tmp=tmp_path) for a in args] for name, (args, _) in BAD_INPUTS.items()}
    # WORLD_SIZE as torchrun sets it: the batch arithmetic is checked before the process group exists.
    env = os.environ | {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}

    # The real command, as a user types it: exit code 2, one line on stderr, nothing on stdout.
    t0 = time.monotonic()
    cli = subprocess.run(
        [sys.executable, "launch/train.py", *cases["malformed-json"]],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    seconds = time.monotonic() - t0
    assert cli.returncode == 2, cli.stderr
    assert cli.stdout == "" and len(cli.stderr.strip().splitlines()) == 1, cli.stderr
    assert cli.stderr.startswith("error: DeepSpeed config") and "is not valid JSON" in cli.stderr
    # A few seconds alone (python + the torch import); loose, as other jobs share the 2 cores.
    assert seconds < 60, f"took {seconds:.0f} s"

    probe = subprocess.run(
        [sys.executable, "-c", CLI_PROBE, json.dumps(cases)],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-3000:]
    report = json.loads(probe.stdout.strip().splitlines()[-1])
    for name, (rc, err, secs) in report["cases"].items():
        lines = err.strip().splitlines()
        assert rc == 2, f"{name}: exit code {rc}: {err}"
        assert len(lines) == 1 and lines[0].startswith("error: ") and BAD_INPUTS[name][1] in lines[0], (
            name,
            err,
        )
        assert secs < 5, f"{name}: {secs:.1f} s after the imports"
    assert report["heavy"] == [], "rejected before the model loads, but imported " + ", ".join(
        report["heavy"][:5]
    )
    assert not (tmp_path / "run").exists(), "a rejected run must not create its output folder"


# ---------------------------------------------------------------------------- non-finite losses
@pytest.mark.distributed
def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path):
    """Through the real code path (no mock, both ranks, ZeRO-2): an absurd lr (1e37) sends the
    experts' B to ~1e37 on step 1 (B starts at 0, so step 1 itself is fine), and alpha 1000 makes
    the next forwards overflow to inf/NaN. lr alone is not enough: at lr 1e30 the RMSNorms scale
    the huge activations back to 0 and the loss stays finite (ln of the vocabulary size).
    Skipped steps leave the weights as they are, so every later step is non-finite too."""
    out = tmp_path / "run"
    max_bad = 3
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "launch/train.py", "--config", "ds_configs/zero2.json", "--recipe", "recipes/tiny.yaml",
           "--output-dir", str(out), "--set", "optim.lr=1e37", "--set", "molora.alpha=1000",
           "--set", f"train.max_bad_steps={max_bad}", "--set", "train.max_steps=10",
           "--set", "eval.before=false"]  # fmt: skip
    result = run(cmd)
    text = result.stdout + result.stderr
    assert result.returncode != 0, f"the run did not stop:\n{text[-4000:]}"
    message = f"loss was non-finite in {max_bad} steps (last at step {max_bad + 1}); lower optim.lr"
    error_lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert error_lines and all(message in ln for ln in error_lines), text[-4000:]
    # The ranks end with that line, not a traceback (torchrun still reports the failed workers).
    assert "NonFiniteLossError" not in text, text[-4000:]

    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, max_bad + 2))
    assert rows[0]["skipped"] == 0 and math.isfinite(rows[0]["loss"])
    for row in rows[1:]:
        assert row["skipped"] == 1 and row["loss"] is None, row  # NaN is written as null: strict JSON
        assert row["grad_norm/experts"] is None and row["grad_norm/router"] is None, row
    assert not (out / "adapter").exists()
