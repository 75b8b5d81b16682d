"""Training metrics: one JSON object per optimisation step in `metrics.jsonl`, and TensorBoard scalars under
`tb/` when tensorboard is installed. Only rank 0 writes.

On resume the JSONL file is rewritten from the metrics stored in the checkpoint (steps after the checkpoint
that a killed run had logged are dropped), and TensorBoard is opened with `purge_step` so its events after the
checkpoint are discarded too; the log then reads as one uninterrupted run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

TIMING_KEYS = ("seconds", "tokens/s", "examples/s")  # wall-clock figures: differ between identical runs


def _tensorboard_writer(folder: Path, purge_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        return None
    return SummaryWriter(log_dir=str(folder), purge_step=purge_step)


def _clean(value):
    """JSON-safe scalar: floats stay floats, nan/inf become strings (JSON has no nan)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    """Append-only metrics sink for one run folder (JSONL + optional TensorBoard)."""

    def __init__(self, folder: Path, history: list[dict] | None = None, tensorboard: bool = True):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "metrics.jsonl"
        self.history = list(history or [])
        with open(self.path, "w") as f:  # rewrite: exactly the steps the (resumed) state has seen
            for row in self.history:
                f.write(json.dumps(row) + "\n")
        purge = self.history[-1]["step"] + 1 if self.history else None
        self.tb = _tensorboard_writer(self.folder / "tb", purge) if tensorboard else None

    def write(self, row: dict) -> None:
        row = {k: _clean(v) for k, v in row.items()}
        self.history.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def summary(history: list[dict]) -> dict:
    """What goes into the manifest's report: the last step's metrics and mean throughput."""
    if not history:
        return {}
    last = {k: v for k, v in history[-1].items() if k not in TIMING_KEYS}
    steady = history[1:] or history  # the first step includes warm-up (allocation, lazy init)
    rates = {k: sum(r[k] for r in steady) / len(steady) for k in ("tokens/s", "examples/s") if k in steady[0]}
    return {"final": last, "mean_throughput": rates, "steps": history[-1]["step"]}
