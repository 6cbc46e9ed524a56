"""Atomic, resumable checkpoints around DeepSpeed's ``engine.save_checkpoint``.

A checkpoint folder counts only once its ``COMPLETE`` marker is there and still matches the
folder: rank 0 writes it (atomically) after every rank has finished writing, listing each file
with its size, so neither a crash mid-save nor a file cut short later leaves a checkpoint that
``--resume auto`` would pick. Resuming on another process count goes through
DeepSpeed's universal checkpoint format (converted on the fly).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from molora_ds.inject import molora_layers

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
META = "molora_meta.json"
UNIVERSAL_SUFFIX = "_universal"


def _tag(step: int) -> str:
    return f"step{step:08d}"


def _manifest(tag_dir: Path) -> dict[str, int]:
    return {
        str(f.relative_to(tag_dir)): f.stat().st_size
        for f in sorted(tag_dir.rglob("*"))
        if f.is_file() and f.name != COMPLETE and not f.name.endswith(".tmp")
    }


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_complete(tag_dir: Path) -> None:
    """Write the ``COMPLETE`` marker: every file of the folder with its size, renamed into place.

    The files and the marker reach the disk before the rename, and the rename before we return:
    after a power loss the marker never names data that was still in the page cache.
    """
    manifest = _manifest(tag_dir)
    for name in manifest:
        _fsync(tag_dir / name)
    tmp = tag_dir / (COMPLETE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    _fsync(tmp)
    os.replace(tmp, tag_dir / COMPLETE)
    _fsync(tag_dir)


def is_complete(tag_dir: Path) -> bool:
    """The marker exists and every file it lists is there with its recorded size."""
    try:
        listed = json.loads((tag_dir / COMPLETE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(listed, dict) or not listed:
        return False
    return all(
        (tag_dir / name).is_file() and (tag_dir / name).stat().st_size == size
        for name, size in listed.items()
    )


def _complete_tags(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    tags = [p for p in root.iterdir() if p.name.startswith("step") and not p.name.endswith(UNIVERSAL_SUFFIX)]
    return sorted((p for p in tags if is_complete(p)), key=lambda p: p.name)


def find_latest(root: Path) -> Path | None:
    tags = _complete_tags(root)
    return tags[-1] if tags else None


def resolve_resume(arg: str | None, ckpt_root: Path) -> Path | None:
    """``auto``: newest complete checkpoint under ``ckpt_root`` or None; a path: that checkpoint (or the
    newest under a run/checkpoints folder). A path without a complete checkpoint is an error."""
    if arg is None:
        return None
    if arg == "auto":
        return find_latest(ckpt_root)
    path = Path(arg)
    if is_complete(path):
        return path
    for root in (path, path / "checkpoints"):
        found = find_latest(root)
        if found:
            return found
    raise FileNotFoundError(
        f"--resume {arg}: no complete checkpoint there (a folder with a {COMPLETE} marker)"
    )


def read_meta(tag_dir: Path) -> dict:
    return json.loads((tag_dir / META).read_text())


def check_stage(tag_dir: Path, stage: int) -> None:
    """DeepSpeed loads a checkpoint (universal ones included) only under the ZeRO stage that
    wrote it; otherwise it fails deep inside with a bare AssertionError, after the model loaded."""
    saved = read_meta(tag_dir).get("zero_stage")
    if saved is not None and saved != stage:
        raise ValueError(
            f"--resume: {tag_dir} was saved under ZeRO-{saved}, this run uses ZeRO-{stage}; DeepSpeed cannot "
            f"load a checkpoint into another stage: resume with a config of stage {saved} (e.g. "
            f"ds_configs/zero{saved}.json)"
        )


def check_expert_parallel(tag_dir: Path, size: int, world: int) -> None:
    """Expert-parallel checkpoints hold each rank's expert shard in DeepSpeed's per-rank optimizer files,
    which its universal conversion does not merge: resume them only on the same layout."""
    meta = read_meta(tag_dir)
    saved = (meta.get("expert_parallel_size", 1), meta["world_size"])
    if max(saved[0], size) > 1 and saved != (size, world):
        raise ValueError(
            f"--resume: {tag_dir} was saved with expert_parallel_size={saved[0]} on {saved[1]} processes, this "
            f"run has {size} on {world}: resume an expert-parallel run on the same layout (its exported adapter "
            "loads anywhere)"
        )


def _client_state(meta: dict) -> dict:
    """Our metadata, and the universal-format marker for a run without expert parallelism: with it,
    DeepSpeed's MoE save path writes that key itself and refuses ours."""
    state = {"molora": meta}
    if meta.get("expert_parallel_size", 1) == 1:
        state["universal_checkpoint_info"] = {"universal_checkpoint_version": 0.2}
    return state


def save(engine, root: Path, step: int, meta: dict, keep_last: int, experts=None) -> Path:
    """Collective: every rank writes its shards, then rank 0 marks the folder complete.

    ``experts``: the run's ``expert_parallel.ExpertGroup`` under expert parallelism, else None.
    """
    tag = _tag(step)
    rank = dist.get_rank()
    if rank == 0:
        # Leftovers of a save that a kill interrupted, or of a run resumed from an older step: the
        # conversion of a replaced checkpoint would be stale.
        shutil.rmtree(root / tag, ignore_errors=True)
        shutil.rmtree(root / (tag + UNIVERSAL_SUFFIX), ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(
        str(root),
        tag=tag,
        client_state=_client_state(meta),
        save_latest=False,
        # Only what training changes: the frozen base (18 GB for GLM-4-9B under ZeRO 0-2) comes
        # from its own files at every start, and must not eat the preemption signal's margin.
        exclude_frozen_parameters=True,
    )
    if experts is not None:
        save_expert_shards(engine.module, root / tag, experts)
    dist.barrier()
    if rank == 0:
        (root / tag / META).write_text(json.dumps(meta, indent=2))
        mark_complete(root / tag)
        for old in _complete_tags(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(old.with_name(old.name + UNIVERSAL_SUFFIX), ignore_errors=True)
    dist.barrier()
    return root / tag


def _shard_file(tag_dir: Path, experts) -> Path:
    return tag_dir / f"expert_shard_{experts.rank:03d}_of_{experts.size:03d}.pt"


def save_expert_shards(model, tag_dir: Path, experts) -> None:
    """Write this rank's expert weights (the model's working copy) if it is its shard's writer.

    DeepSpeed saves expert parameters in no model file (its own MoE experts go to per-expert files
    this layer does not have), and on load restores only ZeRO's fp32 master copy: without this file the
    first step after a resume would run on the initial experts.
    """
    if experts.writes_shard:
        state = {
            f"{name}.{n}": p.detach().cpu()
            for name, m in molora_layers(model).items()
            for n, p in (("lora_A", m.lora_A), ("lora_B", m.lora_B))
        }
        torch.save(state, _shard_file(tag_dir, experts))


def load_expert_shards(model, tag_dir: Path, experts) -> None:
    state = torch.load(_shard_file(tag_dir, experts), weights_only=True)
    with torch.no_grad():
        for name, m in molora_layers(model).items():
            m.lora_A.copy_(state[f"{name}.lora_A"])
            m.lora_B.copy_(state[f"{name}.lora_B"])


def to_universal(tag_dir: Path) -> Path:
    """Convert (once, on rank 0) to DeepSpeed's universal format for loading on another process count."""
    out = tag_dir.with_name(tag_dir.name + UNIVERSAL_SUFFIX)
    if dist.get_rank() == 0 and not is_complete(out):
        shutil.rmtree(out, ignore_errors=True)
        log.info("converting %s to a universal checkpoint for a different process count", tag_dir)
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(tag_dir),
            "--output_folder",
            str(out),
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
        ]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=os.environ)
        shutil.copy(tag_dir / META, out / META)
        mark_complete(out)
    dist.barrier()
    return out


def load(engine, tag_dir: Path, experts=None) -> dict:
    """Load model, optimizer and scheduler state; returns our metadata. ``experts`` as in ``save``."""
    # Not strict: the checkpoint holds the trainable parameters only (see ``save``).
    path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_module_strict=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {tag_dir}")
    if experts is not None:
        load_expert_shards(engine.module, tag_dir, experts)
    if tag_dir.name.endswith(UNIVERSAL_SUFFIX) and engine.zero_optimization_stage() == 3:
        _repair_zero3_universal_load(engine.optimizer.optimizer, tag_dir)
    return read_meta(tag_dir)


def _repair_zero3_universal_load(optimizer, universal_dir: Path) -> None:
    """Undo two slips of DeepSpeed's (0.19) ZeRO-3 universal load, which the other stages lack.

    - It copies ``param_groups[0]``'s settings into every group: the router group would come
      back named "experts", with the experts' lr (x300 at the paper's defaults) until the
      scheduler's next step, and the metrics would merge the two groups.
    - It gives every param group's Adam state one shared ``step`` tensor; ZeRO-3 steps the
      groups one after the other, so that tensor advanced once per group and optimizer step,
      and the bias corrections drifted (losses off by ~1e-4 within 5 steps on the tiny recipe).
    """
    # Tensors and plain containers, plus two DeepSpeed classes it pickles; nothing else may load.
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler]):
        saved = torch.load(universal_dir / "zero" / "optimizer_state.pt", weights_only=True)
    groups = saved["optimizer_state_dict"]["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise RuntimeError(
            f"{universal_dir} has {len(groups)} param groups, the optimizer {len(optimizer.param_groups)}"
        )
    for group, want in zip(optimizer.param_groups, groups):
        params = group["params"]
        group.clear()
        group.update({k: v for k, v in want.items() if k != "params"}, params=params)
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
