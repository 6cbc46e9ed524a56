"""Stop requests: SIGTERM, SIGUSR1, Ctrl-C and a launcher that died become "checkpoint, then exit 0".

The handlers only set a flag; the trainer reads it once per step on every rank and stops all ranks
together (one rank's signal is enough). Ctrl-C is the same request; a second Ctrl-C aborts at once,
without saving.

A launcher killed alone leaves its ranks training on, orphaned, to the end: the ``deepspeed``
command exits at once on SIGTERM (its per-node ``deepspeed.launcher.launch`` process stays up and
is no help), and a SIGKILLed ``torchrun`` passes nothing on. So ranks started by a launcher watch
it: when their parent, or the deepspeed per-node process's own parent, changes (the orphan was
re-parented), that counts as a SIGTERM. A plain ``python`` run watches nothing (``nohup`` must survive
its shell).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

_DEEPSPEED_PER_NODE = b"deepspeed.launcher.launch"


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


class StopRequests:
    """Installs the handlers when built; ``requested()`` is polled once per step."""

    def __init__(self, watch_launcher: bool) -> None:
        self.reason: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        # (process, its parent) pairs that hold while the launcher lives.
        self._watched: list[tuple[int, int | None]] = []
        if watch_launcher:
            parent = os.getppid()
            self._watched.append((os.getpid(), parent))
            if _DEEPSPEED_PER_NODE in _cmdline(parent):
                self._watched.append((parent, _parent_of(parent)))

    def _on_signal(self, signum: int, frame) -> None:
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # the next Ctrl-C ends the process at once
            # os.write, not logging: a handler may run while the logging lock is held.
            os.write(
                2, b"Ctrl-C: saving a checkpoint at the end of this step, then exiting; Ctrl-C again aborts\n"
            )
        self.reason = self.reason or signal.Signals(signum).name

    def requested(self) -> bool:
        if self.reason is None and any(_parent_of(pid) != parent for pid, parent in self._watched):
            self.reason = "the launcher exited"
        return self.reason is not None
