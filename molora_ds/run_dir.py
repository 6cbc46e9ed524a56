"""Run-folder ownership: one run per ``--output-dir``, and never a run written over another.

``claim`` is called on rank 0 after every other input was checked, before the model loads. It
takes an exclusive ``flock`` on the folder for the run's lifetime: the kernel drops it when the
process exits, however it exits, so a crashed run never leaves a stale lock; ``run.lock`` inside
says who holds it. A folder that already holds a run is refused unless the user resumes it or
passes ``--overwrite``, which moves it aside (never deletes it).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from molora_ds import checkpoint

LOCK = "run.lock"
# What a run writes: any of these means the folder holds a run (an empty folder, or one with only a
# stale lock file, does not).
RUN_FILES = ("metrics.jsonl", "checkpoints", "results.json", "adapter", "recipe.yaml", "tensorboard")


class RunDirError(ValueError):
    """A run folder that cannot be used as asked; the message says what to do instead."""


def holds_run(run_dir: Path) -> bool:
    return run_dir.is_dir() and any((run_dir / name).exists() for name in RUN_FILES)


def check_usable(run_dir: Path) -> None:
    """Cheap checks that create nothing: the folder, or its nearest existing parent, must be a writable folder."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--output-dir {run_dir} is a file, not a folder; pass a folder path")
    existing = next(p for p in (run_dir, *run_dir.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(
            f"--output-dir {run_dir}: {existing} is not writable; pass a folder you can write to"
        )


@dataclass
class RunLock:
    """An open descriptor holding the folder's ``flock``; ``release`` (or process exit) lets it go."""

    run_dir: Path
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            (self.run_dir / LOCK).unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = -1


def _flock(run_dir: Path) -> int:
    """A descriptor of ``run_dir`` holding its exclusive lock, or an error naming who holds it."""
    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            holder = (run_dir / LOCK).read_text().strip()
        except OSError:
            holder = "another process"
        raise RunDirError(
            f"--output-dir {run_dir} is in use by {holder}; wait for that run to end, or pass another --output-dir"
        ) from None
    return fd


def _lock(run_dir: Path) -> RunLock:
    fd = _flock(run_dir)
    (run_dir / LOCK).write_text(
        f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
    )
    return RunLock(run_dir, fd)


def _check_owner(run_dir: Path, resume: bool, overwrite: bool) -> None:
    if holds_run(run_dir) and not (resume or overwrite):
        raise RunDirError(
            f"--output-dir {run_dir} already holds a run; pass --resume auto to continue it, --overwrite "
            "to move it aside and start over, or another --output-dir"
        )


def check_resume_target(tag_dir: Path, run_dir: Path) -> None:
    """A run folder holds one line of checkpoints. Resuming from an older one of its own while newer
    valid ones exist, or from another folder's checkpoint into a folder that holds a run, would
    interleave two runs (and keep-last rotation would delete the new checkpoints, which sort first)."""
    own = run_dir / "checkpoints"
    if tag_dir.parent.resolve() != own.resolve():
        if holds_run(run_dir):
            raise RunDirError(
                f"--resume {tag_dir} belongs to another run folder, and --output-dir {run_dir} holds a run of "
                "its own; resume into a new --output-dir"
            )
        return
    newer = [t.name for t in checkpoint.tags(own) if t.name > tag_dir.name and checkpoint.problem(t) is None]
    if newer:
        raise RunDirError(
            f"--resume {tag_dir}: {own} has newer checkpoints {newer}; to branch off an older one, resume into a "
            "new --output-dir"
        )


def check_claim(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """``claim``'s refusals without creating or changing anything: called before the slower checks
    (data, model), so that a busy or owned folder is reported at once. ``claim`` checks again."""
    check_usable(run_dir)
    if run_dir.is_dir():
        os.close(_flock(run_dir))
        _check_owner(run_dir, resume, overwrite)


def claim(run_dir: Path, resume: bool, overwrite: bool) -> tuple[RunLock, Path | None]:
    """Lock ``run_dir`` for this run; returns the lock and where an overwritten run was moved (or None)."""
    check_usable(run_dir)
    moved = None
    if run_dir.is_dir():
        lock = _lock(run_dir)  # first: a run in progress is "in use", not "holds a run"
        try:
            _check_owner(run_dir, resume, overwrite)
        except RunDirError:
            lock.release()
            raise
        if not holds_run(run_dir) or resume:
            return lock, None
        moved = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        os.rename(run_dir, moved)  # the old run's lock goes with it, and is released just after
        lock.run_dir = moved
        lock.release()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # e.g. a read-only file system, which os.access does not see for root
        raise RunDirError(
            f"--output-dir {run_dir} cannot be created ({e.strerror}); pass a folder you can write to"
        ) from None
    return _lock(run_dir), moved
