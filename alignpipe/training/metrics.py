"""Training metrics: one JSON object per optimisation step in `metrics.jsonl`, TensorBoard scalars under `tb/`
when tensorboard is installed (same names and steps), and the experiment trackers asked for
(`--report-to wandb,mlflow,trackio`, alignpipe.training.trackers). Only rank 0 writes.

On resume the JSONL file is rewritten from the metrics stored in the checkpoint (steps after the checkpoint
that a killed run had logged are dropped), and TensorBoard is opened with `purge_step` so its events after the
checkpoint are discarded too; the log then reads as one uninterrupted run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

TIMING_KEYS = ("seconds", "tokens/s", "examples/s")  # wall-clock figures: differ between identical runs


def _tensorboard_installed() -> bool:
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:  # tensorboard is an optional extra
        return False
    return True


def _clean(value):
    """JSON-safe scalar: floats stay floats, nan/inf become strings (JSON has no nan)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    """Append-only metrics sink for one run folder: JSONL, TensorBoard (on when installed) and the trackers
    named by `report_to` (see alignpipe.training.trackers), each given the same names and steps.

    `run_name` names the run in the trackers (default: derived from the output folder), `config` is the
    resolved config they record (redacted)."""

    def __init__(self, folder: Path, history: list[dict] | None = None, tensorboard: bool = True,
                 report_to: tuple = (), run_name: str | None = None, config: dict | None = None):
        from alignpipe.training.trackers import Trackers, parse

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "metrics.jsonl"
        self.history = list(history or [])
        names = parse(report_to)
        if tensorboard and "tensorboard" not in names and _tensorboard_installed():
            names = ("tensorboard",) + names
        with open(self.path, "w") as f:  # rewrite: exactly the steps the (resumed) state has seen
            f.writelines(json.dumps(row) + "\n" for row in self.history)
        self.trackers = Trackers(self.folder, names, run_name_=run_name, config=config, history=self.history)

    @property
    def tb(self):
        """The TensorBoard tracker when it is on (None otherwise)."""
        return self.trackers.open.get("tensorboard") if self.trackers else None

    def write(self, row: dict) -> None:
        row = {k: _clean(v) for k, v in row.items()}
        self.history.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.trackers is not None:
            self.trackers.log(row)

    def links(self) -> dict:
        """Where each tracker keeps this run (folders, URIs, ids)."""
        return self.trackers.links() if self.trackers else {}

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# Metric names that changed, old -> {loss: new}: older metrics.jsonl files read under today's names. DPO-family
# losses logged the answers' mean policy/reference log-ratio as `kl` (it is no KL: it can be negative), KTO its
# reference point z0; `kl` stays the name of true KL estimates (the k3 of the policy-gradient losses).
RENAMED = {"kl": {**dict.fromkeys(("dpo", "cdpo", "robust-dpo", "ipo"), "logratio"), "kto": "z0"}}


def policy_metrics(folder: Path) -> list[dict]:
    """The rows of a policy folder's metrics.jsonl under today's metric names ([] when it has none); the loss
    that logged them is the one in the folder's manifest."""
    from alignpipe.data.manifest import read_manifest

    f = Path(folder) / "metrics.jsonl"
    if not f.is_file():
        return []
    loss = str(((read_manifest(folder) or {}).get("config") or {}).get("loss") or "").split(",")[0]
    renames = {old: new[loss] for old, new in RENAMED.items() if loss in new}
    return [{renames.get(k, k): v for k, v in row.items()} for row in read_metrics(f)]


def summary(history: list[dict]) -> dict:
    """What goes into the manifest's report: the last step's metrics and mean throughput."""
    if not history:
        return {}
    last = {k: v for k, v in history[-1].items() if k not in TIMING_KEYS}
    steady = history[1:] or history  # the first step includes warm-up (allocation, lazy init)
    rates = {k: sum(r[k] for r in steady) / len(steady) for k in ("tokens/s", "examples/s") if k in steady[0]}
    return {"final": last, "mean_throughput": rates, "steps": history[-1]["step"]}
