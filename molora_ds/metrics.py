"""Run metrics: metrics.jsonl (one object per optimizer step), TensorBoard events, a loss plot."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)


class MetricsLogger:
    """Rank 0 only; other ranks get a logger whose methods do nothing."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int = 0) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self.plot_path = run_dir / "loss.png"
        if self.path.exists():  # drop steps a killed run logged after its last checkpoint
            rows = [r for r in self._rows() if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.file = self.path.open("a")
        self.tb = SummaryWriter(
            str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None
        )

    def _rows(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def step(self, row: dict, expert_load: dict[str, list[float]] | None = None) -> None:
        if not self.enabled:
            return
        # null, not NaN: NaN is not JSON, and strict readers (jq, JSON.parse) reject the whole file.
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        self.file.write(json.dumps(finite, allow_nan=False) + "\n")
        self.file.flush()
        for key, value in row.items():
            if key != "step" and isinstance(value, int | float):
                self.tb.add_scalar(key, value, row["step"])
        for layer, load in (expert_load or {}).items():
            self.tb.add_histogram(f"expert_load/{layer}", load, row["step"])
            self.tb.add_scalar(f"expert_load_max/{layer}", max(load), row["step"])

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.enabled:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        self.tb.close()
        self.plot_loss()

    def plot_loss(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in self._rows() if r.get("loss") is not None]
        if not rows:
            return
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
        ax.set(xlabel="optimizer step", ylabel="training loss", title="molora_ds training loss")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.plot_path, dpi=100)
        plt.close(fig)
        log.info("loss curve: %s", self.plot_path)
