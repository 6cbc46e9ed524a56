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
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from molora_ds import MoLoRAConfig, checkpoint, load_adapter
from molora_ds.recipe import load_recipe
from molora_ds.run_dir import LOCK, RunDirError, claim
from tests.distributed.launching import (
    ROOT,
    RUN_TIMEOUT,
    check_ok,
    children,
    free_port,
    kill_tree,
    metrics,
    run,
    tensorboard_scalars,
)

METRIC_KEYS = {"step", "loss", "lr/experts", "lr/router", "grad_norm/experts", "grad_norm/router", "tokens_per_s",
               "seconds", "skipped"}  # fmt: skip


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
    # Checkpoints hold what training changes, not the frozen base (18 GB a save for GLM-4-9B), nor
    # the tied lm_head of tiny-llama (and SmolLM2), which DeepSpeed's own exclusion keeps.
    states = torch.load(
        out / "checkpoints" / f"step{steps:08d}" / "mp_rank_00_model_states.pt", weights_only=False
    )
    assert set(states["module"]) == set(weights), sorted(set(states["module"]) - set(weights))

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


@pytest.mark.distributed
def test_ranks_notice_a_dead_deepspeed_launcher_and_checkpoint(tmp_path):
    """Issue 9.4: SIGTERM to the ``deepspeed`` command alone ends it at once (-15) while its per-node
    process and the ranks train on, orphaned, to the end. The ranks now notice the launcher is gone
    (checked once per step): checkpoint at the end of the step, then exit 0."""
    out = tmp_path / "run"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
           "--config", "ds_configs/zero2.json", "--recipe", "recipes/tiny.yaml", "--output-dir", str(out),
           "--max-steps", "200", "--set", "train.save_every=100", "--set", "eval.before=false",
           "--set", "eval.after=false"]  # fmt: skip
    log_path, per_node = tmp_path / "log", None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while len(metrics(out)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        (per_node,) = children(proc.pid)
        ranks = children(per_node)
        assert len(ranks) == 2, ranks
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM
        deadline = time.monotonic() + 120
        while any(_alive(pid) for pid in ranks):
            assert time.monotonic() < deadline, "the ranks trained on after their launcher died"
            time.sleep(0.2)
    finally:  # a failed test leaves no rank behind (their launcher, once dead, cannot reap them)
        for pid in (proc.pid, per_node):
            if pid:
                kill_tree(pid)
    text = log_path.read_text()
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "preempted" and 2 <= results["step"] < 200, results
    assert "the launcher exited: exiting at step" in text, text[-3000:]
    tag = checkpoint.find_latest(out / "checkpoints")
    assert (
        tag is not None and checkpoint.read_meta(tag)["step"] == results["step"] == metrics(out)[-1]["step"]
    )


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------------------- bad command lines
# name: (arguments after the base command line, what the one error line must contain). {tmp} is the
# test's folder, prepared by _prepare_bad_inputs. The later --output-dir wins over the base's.
BAD_INPUTS = {
    "missing-config": (["--config", "ds_configs/nope.json"], "error: DeepSpeed config ds_configs/nope.json not found"),
    "malformed-json": (["--config", "{tmp}/bad.json"], "is not valid JSON"),
    "unknown-recipe-key": (["--set", "molora.nonsense=1"], "error: recipe: unknown key(s) ['nonsense'] in molora"),
    "recipe-key-in-ds-json": (["--config", "{tmp}/recipe_key.json"], "has recipe keys ['optim']: move them"),
    "top_k-above-num_experts": (["--set", "molora.top_k=8"], "top_k=8 must be between 1 and the smallest expert"),
    "indivisible-global-batch": (["--set", "train.global_batch=7"], "not divisible by the 2 processes"),
    "missing-recipe": (["--recipe", "recipes/nope.yaml"], "error: recipe recipes/nope.yaml not found"),
    "resume-path-without-checkpoint": (["--resume", "{tmp}"], "no checkpoint there"),
    "resume-into-another-zero-stage": (["--output-dir", "{tmp}/zero3_run", "--resume", "auto"],
                                       "was saved under ZeRO-3, this run uses ZeRO-2"),
    # issue 9.8: failed with a traceback after the model had loaded
    "zero-stage-7": (["--config", "{tmp}/stage7.json"], "zero_optimization.stage must be 0, 1, 2 or 3, got 7"),
    "zero-stage-two": (["--config", "{tmp}/stage_two.json"], "zero_optimization.stage must be 0, 1, 2 or 3, got 'two'"),
    "fp16-on-cpu": (["--config", "{tmp}/fp16.json"], "enables fp16, which needs a GPU"),
    "output-dir-is-a-file": (["--output-dir", "{tmp}/a_file"], "a_file is a file, not a folder"),
    "output-dir-unwritable": (["--output-dir", "/sys/molora_run"], "--output-dir /sys/molora_run cannot be created"),
    "lr-negative": (["--set", "optim.lr=-1"], "bad optim: lr must be a finite number > 0, got -1.0"),
    "lr-nan": (["--set", "optim.lr=.nan"], "bad optim: lr must be a finite number > 0, got nan"),
    "betas-out-of-range": (["--set", "optim.betas=[0.9,1.0]"], "betas must be two numbers in [0, 1), got [0.9, 1.0]"),
    "eps-negative": (["--set", "optim.eps=-1e-8"], "bad optim: eps must be a finite number >= 0, got -1e-08"),
    "resume-another-expert-count": (["--output-dir", "{tmp}/four_experts", "--resume", "auto",
                                     "--set", "molora.num_experts=8"],
                                    "cannot continue with a changed molora.num_experts 4 -> 8"),
    # issue 9.8: silently accepted
    "gate_lr-negative": (["--set", "optim.gate_lr=-1e-3"], "gate_lr must be a finite number >= 0, got -0.001"),
    "weight_decay-negative": (["--set", "optim.weight_decay=-0.1"], "weight_decay must be a finite number >= 0"),
    "alpha-negative": (["--set", "molora.alpha=-4"], "alpha must be a finite number > 0, got -4.0"),
    "unknown-ds-key": (["--config", "{tmp}/misspelt.json"], "unknown key(s) ['zero_optimisation']"),
    "unknown-zero-key": (["--config", "{tmp}/zero_key.json"], "unknown key(s) ['reduce_bucket'] in zero_optimization"),
    "nvme-without-path": (["--config", "{tmp}/nvme.json"], "offload_param offloads to nvme but sets no nvme_path"),
    # issue 9.8: misleading messages
    "config-is-a-folder": (["--config", "ds_configs"], "DeepSpeed config ds_configs is a folder"),
    "corrupt-meta": (["--resume", "{tmp}/bad_meta/checkpoints/step00000002"],
                     "bad_meta/checkpoints/step00000002/molora_meta.json is unreadable (Unterminated string"),
    "set-never-typed": (["--recipe", "{tmp}/scalar_train.yaml", "--max-steps", "5"],
                        "recipe: cannot set train.max_steps: 'train' is 3, not a section"),
    # issues 9.1, 9.2, 9.5, 9.6: run folders and resume
    "folder-holds-a-run": (["--output-dir", "{tmp}/old_run"], "old_run already holds a run; pass --resume auto"),
    "folder-in-use": (["--output-dir", "{tmp}/busy"], "busy is in use by pid"),
    "resume-and-overwrite": (["--resume", "auto", "--overwrite"], "--resume continues the run in --output-dir"),
    "every-checkpoint-corrupt": (["--output-dir", "{tmp}/corrupt", "--resume", "auto"],
                                 "none of the 1 checkpoints under"),
    "resume-past-max-steps": (["--output-dir", "{tmp}/four_experts", "--resume", "auto", "--max-steps", "1"],
                              "is at step 2, past train.max_steps=1"),
    "resume-an-older-checkpoint": (["--output-dir", "{tmp}/two_checkpoints", "--resume",
                                    "{tmp}/two_checkpoints/checkpoints/step00000002"],
                                   "has newer checkpoints ['step00000004']; to branch off an older one"),
    "resume-another-runs-checkpoint": (["--output-dir", "{tmp}/old_run", "--resume",
                                        "{tmp}/four_experts/checkpoints/step00000002"],
                                       "belongs to another run folder, and --output-dir"),
    "set-value-not-yaml": (["--set", "optim.lr=[1"], "--set 'optim.lr=[1': the value is not valid YAML"),
    # issue 9.8, checked since issue 10
    "unknown-model": (["--set", "model=nope"], "model 'nope' is not a local folder"),
    "unknown-data-set": (["--set", "data.format=nope"], "data.format 'nope' needs data.train"),
    # Found on the model built on the meta device, and on the data tokenised before the model loads.
    "max_len-too-small": (["--set", "data.max_len=8"], "data.max_len=8 is too short"),
    "eval_size-above-the-data": (["--set", "data.eval_size=1000000"], "data.eval_size=1000000"),
    "targets-match-nothing": (["--set", "molora.target_modules=[nope]"], "target_modules=['nope'] matched no module"),
}  # fmt: skip
if torch.cuda.is_available():  # then fp16 is fine
    del BAD_INPUTS["fp16-on-cpu"]

# Runs launch/train.py's main() on each bad command line in one interpreter (each alone is mostly
# the ~3 s torch import) and reports exit code, stderr and seconds. The trainer (which loads the model)
# cannot be imported: a case that gets that far was not rejected before the model loads.
CLI_PROBE = """
import contextlib, importlib.abc, io, json, sys, time, traceback
class NoModel(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "molora_ds.trainer":
            raise ImportError("REACHED_MODEL_LOAD " + name)
sys.meta_path.insert(0, NoModel())
sys.path.insert(0, "launch")
from train import main
import molora_ds.data.formats, molora_ds.models.loading  # the data and model checks' imports (transformers)
cases, report = json.loads(sys.argv[1]), {}
for name, argv in cases.items():
    err, t0 = io.StringIO(), time.perf_counter()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except BaseException:
            traceback.print_exc(file=err)
            rc = None
    report[name] = [rc, err.getvalue(), time.perf_counter() - t0]
print(json.dumps(report))
"""


def _prepare_bad_inputs(tmp: Path) -> subprocess.Popen:
    """The files the bad inputs name; returns a process that holds {tmp}/busy's lock (kill it)."""
    configs = {
        "bad.json": '{"zero_optimization": {"stage": 2}',
        "recipe_key.json": '{"zero_optimization": {"stage": 2}, "optim": {"lr": 1e-3}}',
        "stage7.json": '{"zero_optimization": {"stage": 7}}',
        "stage_two.json": '{"zero_optimization": {"stage": "two"}}',
        "fp16.json": '{"fp16": {"enabled": true}, "zero_optimization": {"stage": 2}}',
        "misspelt.json": '{"zero_optimisation": {"stage": 2}}',
        "zero_key.json": '{"zero_optimization": {"stage": 2, "reduce_bucket": 100}}',
        "nvme.json": '{"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}',
    }
    for name, text in configs.items():
        (tmp / name).write_text(text)
    (tmp / "a_file").write_text("")
    (tmp / "scalar_train.yaml").write_text("model: tiny-llama\ntrain: 3\n")
    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml").to_dict()

    def fake_checkpoint(run: str, meta: dict, corrupt_after: bool = False, step: int = 2) -> Path:
        tag = tmp / run / "checkpoints" / f"step{step:08d}"
        tag.mkdir(parents=True)
        (tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"0" * 10)
        (tag / checkpoint.META).write_text(json.dumps(meta) if isinstance(meta, dict) else meta)
        checkpoint.mark_complete(tag)
        if corrupt_after:
            (tag / checkpoint.META).write_text(json.dumps(meta).replace("2", "4", 1))
        return tag

    meta = {"step": 2, "world_size": 2, "zero_stage": 2, "recipe": recipe}
    fake_checkpoint("zero3_run", meta | {"zero_stage": 3})
    fake_checkpoint("four_experts", meta)
    fake_checkpoint("bad_meta", '{"step": 2, "world')  # written damaged: its checksum matches
    fake_checkpoint("corrupt", meta, corrupt_after=True)
    fake_checkpoint("two_checkpoints", meta)
    fake_checkpoint("two_checkpoints", meta | {"step": 4}, step=4)
    (tmp / "old_run").mkdir()
    (tmp / "old_run" / "metrics.jsonl").write_text('{"step": 1, "loss": 10.8}\n')
    (tmp / "busy").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from molora_ds.run_dir import claim; "
         "claim(Path(sys.argv[1]), resume=False, overwrite=False); print('locked', flush=True); time.sleep(600)",
         str(tmp / "busy")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    return holder


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"" for p in sorted(root.rglob("*"))}


def _probe(tmp: Path, bad_inputs: dict) -> dict[str, str]:
    """Each case's verdict: clear, traceback, reached-model-load or unclear (with the reason)."""
    base = [
        "--config",
        "ds_configs/zero2.json",
        "--recipe",
        "recipes/tiny.yaml",
        "--output-dir",
        str(tmp / "run"),
    ]
    cases = {name: base + [a.format(tmp=tmp) for a in args] for name, (args, _) in bad_inputs.items()}
    # WORLD_SIZE as torchrun sets it: the batch arithmetic is checked before the process group exists.
    env = os.environ | {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    before = _tree(tmp)
    probe = subprocess.run(
        [sys.executable, "-c", CLI_PROBE, json.dumps(cases)],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-3000:]
    verdicts = {}
    for name, (rc, err, secs) in json.loads(probe.stdout.strip().splitlines()[-1]).items():
        lines = err.strip().splitlines()
        if "REACHED_MODEL_LOAD" in err:
            verdicts[name] = "reached-model-load"
        elif "Traceback" in err:
            verdicts[name] = "traceback"
        elif rc != 2 or len(lines) != 1 or not lines[0].startswith("error: "):
            verdicts[name] = f"unclear: exit code {rc}, {err!r}"
        elif bad_inputs[name][1] not in lines[0]:
            verdicts[name] = f"unclear: {lines[0]!r} lacks {bad_inputs[name][1]!r}"
        elif secs > 5:
            verdicts[name] = f"slow: {secs:.1f} s after the imports"
        else:
            verdicts[name] = "clear"
    counts = {v: sum(x.split(":")[0] == v for x in verdicts.values()) for v in ("clear", "traceback",
              "reached-model-load", "unclear", "slow")}  # fmt: skip
    print(f"bad inputs tried {len(verdicts)}: " + ", ".join(f"{k} {n}" for k, n in counts.items()))
    assert _tree(tmp) == before, f"a rejected run created or changed files; verdicts: {verdicts}"
    return verdicts


@pytest.mark.distributed
def test_bad_inputs_exit_2_with_one_line_before_the_model_loads(tmp_path):
    """The catalogue (issue 9.8): each bad input exits 2 with one line naming the key or file, without
    a traceback, before DeepSpeed or the model is imported, and creates or changes no file."""
    holder = _prepare_bad_inputs(tmp_path)
    try:
        # The real command, as a user types it: exit code 2, one line on stderr, nothing on stdout.
        t0 = time.monotonic()
        cli = subprocess.run(
            [sys.executable, "launch/train.py", "--config", str(tmp_path / "bad.json"), "--output-dir",
             str(tmp_path / "run")],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        seconds = time.monotonic() - t0
        assert cli.returncode == 2, cli.stderr
        assert cli.stdout == "" and len(cli.stderr.strip().splitlines()) == 1, cli.stderr
        assert cli.stderr.startswith("error: DeepSpeed config") and "is not valid JSON" in cli.stderr
        # A few seconds alone (python + the torch import); loose, as other jobs share the 2 cores.
        assert seconds < 60, f"took {seconds:.0f} s"

        verdicts = _probe(tmp_path, BAD_INPUTS)
    finally:
        holder.kill()
        holder.wait()
    assert {n: v for n, v in verdicts.items() if v != "clear"} == {}


def test_run_folder_lock_is_exclusive_and_dropped_by_any_exit(tmp_path):
    """Issue 9.2: a second run on a folder in use is refused, naming the holder; a SIGKILLed holder
    leaves no stale lock; the lock is no run (the folder may then be used without --resume)."""
    run = tmp_path / "run"
    code = ("import sys, time; from pathlib import Path; from molora_ds.run_dir import claim; "
            "claim(Path(sys.argv[1]), resume=False, overwrite=False); print('locked', flush=True); time.sleep(600)")  # fmt: skip
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(
        RunDirError, match=rf"{run} is in use by pid {holder.pid} on {socket.gethostname()} since"
    ):
        claim(run, resume=True, overwrite=False)
    holder.kill()
    assert holder.wait() == -signal.SIGKILL
    lock, moved = claim(run, resume=False, overwrite=False)
    assert moved is None and (run / LOCK).read_text().startswith(f"pid {os.getpid()} on")
    lock.release()
    assert not (run / LOCK).exists()


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
    # A skipped step uses its lr slot (issue 9.7): the schedule is a function of the step number,
    # linear decay to 0 at ceil(10 / 0.9) = 12 steps. (Before, ZeRO-2's overflow check kept DeepSpeed
    # from stepping the scheduler, and the lr stayed at step 2's value.)
    for row in rows:
        assert row["lr/experts"] == pytest.approx(1e37 * (1 - (row["step"] - 1) / 12), rel=1e-12), row
    assert rows[0]["skipped"] == 0 and math.isfinite(rows[0]["loss"])
    for row in rows[1:]:
        assert row["skipped"] == 1 and row["loss"] is None, row  # NaN is written as null: strict JSON
        assert row["grad_norm/experts"] is None and row["grad_norm/router"] is None, row
    assert not (out / "adapter").exists()
