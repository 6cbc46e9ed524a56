"""Helpers for the tests that launch real runs: free ports, process trees, and the run folder's
metrics. Imported as ``tests.distributed.launching`` (pytest's importlib mode names test modules
after their path, so this works without a package or a sys.path entry)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 420  # seconds; a run takes ~1 min alone, several when the 2 cores are shared


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """Pids of the processes whose parent is ``pid`` (for torchrun: the ranks)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                pids.append(int(stat.parent.name))
    return sorted(pids)


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and everything under it at once, as a node failure would. The launcher's
    process group alone is not enough: torchrun starts each rank in a session of its own."""
    tree, todo = [pid], [pid]
    while todo:
        kids = children(todo.pop())
        tree += kids
        todo += kids
    for member in tree:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(member), signal.SIGKILL)


def run(
    cmd: list[str], timeout: float = RUN_TIMEOUT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run in its own process group, so that a hung run is killed with all its ranks."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout} s:\n{(out + err)[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def check_ok(result: subprocess.CompletedProcess) -> str:
    text = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(result.args)} exited with {result.returncode}:\n{text[-4000:]}"
    return text


def metrics(out: Path) -> list[dict]:
    """The rows of ``out/metrics.jsonl``; none while the run has not logged a step."""
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(out: Path) -> dict[int, float]:
    rows = metrics(out)
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"{out}/metrics.jsonl: steps repeated or out of order: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def resumed_step(text: str) -> int:
    """The step a run's log says it resumed at."""
    lines = [ln for ln in text.splitlines() if "resumed from" in ln]
    assert lines, "the run did not resume: no 'resumed from' line in its output"
    return int(lines[0].rsplit("at step", 1)[1])


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
