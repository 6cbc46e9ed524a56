"""Atomic, resumable checkpoints around DeepSpeed's ``engine.save_checkpoint``.

A checkpoint folder counts only once its ``COMPLETE`` marker exists; the marker is written by
rank 0 after every rank has finished writing, so a crash mid-save never leaves a half
checkpoint that ``--resume auto`` would pick. Resuming on another process count goes through
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

import torch.distributed as dist

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
META = "molora_meta.json"
UNIVERSAL_SUFFIX = "_universal"


def _tag(step: int) -> str:
    return f"step{step:08d}"


def _complete_tags(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    tags = [p for p in root.iterdir() if p.name.startswith("step") and not p.name.endswith(UNIVERSAL_SUFFIX)]
    return sorted((p for p in tags if (p / COMPLETE).exists()), key=lambda p: p.name)


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
    if (path / COMPLETE).exists():
        return path
    for root in (path, path / "checkpoints"):
        found = find_latest(root)
        if found:
            return found
    raise FileNotFoundError(f"--resume {arg}: no complete checkpoint there (a folder with a {COMPLETE} marker)")


def read_meta(tag_dir: Path) -> dict:
    return json.loads((tag_dir / META).read_text())


def save(engine, root: Path, step: int, meta: dict, keep_last: int) -> Path:
    """Collective: every rank writes its shards, then rank 0 marks the folder complete."""
    tag = _tag(step)
    rank = dist.get_rank()
    if rank == 0 and (root / tag).exists():
        shutil.rmtree(root / tag)  # leftovers of a save that a kill interrupted
    dist.barrier()
    engine.save_checkpoint(
        str(root),
        tag=tag,
        client_state={"molora": meta, "universal_checkpoint_info": {"universal_checkpoint_version": 0.2}},
        save_latest=False,
    )
    dist.barrier()
    if rank == 0:
        (root / tag / META).write_text(json.dumps(meta, indent=2))
        (root / tag / COMPLETE).touch()
        for old in _complete_tags(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(old.with_name(old.name + UNIVERSAL_SUFFIX), ignore_errors=True)
    dist.barrier()
    return root / tag


def to_universal(tag_dir: Path) -> Path:
    """Convert (once, on rank 0) to DeepSpeed's universal format for loading on another process count."""
    out = tag_dir.with_name(tag_dir.name + UNIVERSAL_SUFFIX)
    if dist.get_rank() == 0 and not (out / COMPLETE).exists():
        shutil.rmtree(out, ignore_errors=True)
        log.info("converting %s to a universal checkpoint for a different process count", tag_dir)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
               "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=os.environ)
        shutil.copy(tag_dir / META, out / META)
        (out / COMPLETE).touch()
    dist.barrier()
    return out


def load(engine, tag_dir: Path) -> dict:
    """Load model, optimizer and scheduler state; returns our metadata."""
    path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {tag_dir}")
    return read_meta(tag_dir)
