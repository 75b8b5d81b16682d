"""Experiment trackers: the rows of `metrics.jsonl`, with the same names and steps, sent to TensorBoard,
Weights & Biases, MLflow or Trackio (`train --report-to tensorboard,wandb,mlflow,trackio`).

Each tracker is one class in TRACKERS with `open(where)`, `log(row, step)`, `close()` and `link()`; the
libraries are optional extras (`pip install alignpipe[trackers]`), imported only when asked for.

Names and places, derived from the output folder OUT (e.g. runs/demo/iter-1/policy):
    run root    the run folder: OUT's grandparent when OUT's parent is `iter-K`, else OUT's parent (runs/demo)
    project     the run root's name (demo): wandb project, MLflow experiment, Trackio project
    run name    OUT relative to the run root's parent, '-'-joined (demo-iter-1-policy)
    local store RUN_ROOT/trackers/{wandb,mlruns,trackio} unless the library's own variable says otherwise
                (WANDB_DIR, MLFLOW_TRACKING_URI, TRACKIO_DIR); wandb runs offline unless WANDB_MODE is set or
                an API key is configured, so nothing leaves the machine by default.
MLflow's file store cannot hold `tokens` and `tokens/s` both (one file per metric): there `tokens/s` is `tokens_s`.
Each run's links (local folders, URIs, ids) go to RUN_ROOT/trackers/RUN_NAME.json and to `trackers.json` in
the metrics folder; `alignpipe report` links them. Configs are redacted (no secret reaches a tracker).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from pathlib import Path

from alignpipe.core.errors import UserError

EXTRA = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny", "trackio": "trackio"}


def output_of(folder: Path) -> Path:
    """The output a metrics folder belongs to: OUT for train's `.OUT.partial`, else the folder itself."""
    folder = Path(folder).absolute()
    m = re.fullmatch(r"\.(.+)\.partial", folder.name)
    return folder.parent / m.group(1) if m else folder


def run_root(out: Path) -> Path:
    out = Path(out).absolute()
    return out.parent.parent if re.fullmatch(r"iter-\d+", out.parent.name) else out.parent


def run_name(out: Path) -> str:
    """demo-iter-1-policy for runs/demo/iter-1/policy; names are what the trackers show."""
    out = Path(out).absolute()
    return "-".join(out.relative_to(run_root(out).parent).parts)


def _numeric(row: dict) -> dict:
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
    def open(self, where: Path, project: str, name: str, config: dict, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = output_of(where.parent) / where.name  # where train copies it when the output is done
        self.writer = SummaryWriter(log_dir=str(where), purge_step=purge_step)

    def log(self, row: dict, step: int) -> None:
        for k, v in _numeric(row).items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()

    def link(self) -> dict:
        return {"dir": str(self.dir), "open": f"tensorboard --logdir {self.dir}"}


class WandB:
    def open(self, where: Path, project: str, name: str, config: dict, purge_step: int | None) -> None:
        import wandb

        base = Path(os.environ.get("WANDB_DIR") or where.parent)  # wandb writes BASE/wandb/RUN
        base.mkdir(parents=True, exist_ok=True)
        keyed = bool(os.environ.get("WANDB_API_KEY"))
        mode = os.environ.get("WANDB_MODE") or ("online" if keyed else "offline")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or project, name=name, config=config,
                              dir=str(base), mode=mode, reinit="create_new",
                              settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))

    def log(self, row: dict, step: int) -> None:
        self.run.log(_numeric(row), step=step)

    def close(self) -> None:
        import wandb

        self.run.finish()
        wandb.teardown()  # wait for wandb's service to have written the run (offline: the .wandb file) to disk

    def link(self) -> dict:
        url = self.run.url if self.run.settings.mode == "online" else None
        return {"dir": str(Path(self.run.dir).parent), "id": self.run.id, "project": self.run.project,
                **({"url": url} if url else {}), "mode": self.run.settings.mode}


class MLflow:
    def open(self, where: Path, project: str, name: str, config: dict, purge_step: int | None) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            where.mkdir(parents=True, exist_ok=True)
            uri = where.as_uri()
        if uri.startswith("file:") or "://" not in uri:  # a local folder store, as asked
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.uri, self.client = uri, MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(project)
        self.experiment = experiment.experiment_id if experiment else self.client.create_experiment(project)
        self.run_id = self.client.create_run(self.experiment, run_name=name).info.run_id
        params = _flat(config)
        from mlflow.entities import Param

        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=[Param(k, v[:6000]) for k, v in list(params.items())[i:i + 100]])

    def log(self, row: dict, step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = _numeric(row)
        metrics = [Metric(mlflow_name(k, values), v, now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)

    def link(self) -> dict:
        return {"uri": self.uri, "experiment_id": self.experiment, "run_id": self.run_id,
                "open": f"mlflow ui --backend-store-uri {self.uri}"}


def mlflow_name(key: str, keys) -> str:
    """The MLflow name of a metric: its own, except that MLflow's file store keeps one file per metric, so a
    `X/Y` beside a metric `X` (`tokens/s` beside `tokens`) becomes `X_Y` (`tokens_s`)."""
    key = _mlflow_key(key)
    return key.replace("/", "_") if "/" in key and key.rsplit("/", 1)[0] in keys else key


def _mlflow_key(key: str) -> str:
    """MLflow keys allow [A-Za-z0-9_-./ ]: others (none today) become '_'."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", key)


def _flat(config: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in (config or {}).items():
        key = _mlflow_key(f"{prefix}{k}")
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = json.dumps(v, default=str) if not isinstance(v, str) else v
    return out


class Trackio:
    def open(self, where: Path, project: str, name: str, config: dict, purge_step: int | None) -> None:
        os.environ.setdefault("TRACKIO_DIR", str(where))  # read by trackio when first imported
        import trackio
        import trackio.utils

        self.dir, self.project, self.name = Path(trackio.utils.TRACKIO_DIR), project, name
        with contextlib.redirect_stdout(sys.stderr):  # stdout stays for the command's own output
            self.run = trackio.init(project=project, name=name, config=config, embed=False, auto_log_gpu=False,
                                    auto_log_cpu=False)

    def log(self, row: dict, step: int) -> None:
        self.run.log(_numeric(row), step=step)

    def close(self) -> None:
        with contextlib.redirect_stdout(sys.stderr):
            self.run.finish()

    def link(self) -> dict:
        return {"dir": str(self.dir), "project": self.project, "run": self.name,
                "open": f"TRACKIO_DIR={self.dir} trackio show --project {self.project}"}


TRACKERS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow, "trackio": Trackio}
_MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def parse(names) -> tuple[str, ...]:
    """`tensorboard,wandb` or a sequence of names -> checked tuple (unknown or not installed: UserError)."""
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    names = tuple(dict.fromkeys(n.strip().lower() for n in names if n and n.strip() and n.strip() != "none"))
    for n in names:
        if n not in TRACKERS:
            raise UserError(f"--report-to {n}: unknown tracker (known: {', '.join(TRACKERS)}, none)")
        try:
            __import__(_MODULES[n])
        except ImportError:
            raise UserError(f"--report-to {n}: the {EXTRA[n]} package is not installed "
                            f"(pip install 'alignpipe[trackers]' or pip install {EXTRA[n]})") from None
    return names


class Trackers:
    """The trackers of one training run: open them, send each metrics row, close them, record their links."""

    def __init__(self, folder: Path, names, *, run_name_: str | None = None, config: dict | None = None,
                 history: list[dict] | None = None):
        from alignpipe.core.secrets import redact

        self.folder = Path(folder)
        out = output_of(self.folder)
        self.root, self.name = run_root(out) / "trackers", run_name_ or run_name(out)
        project = run_root(out).name
        config = redact(json.loads(json.dumps(config or {}, default=str)))
        history = history or []
        purge = history[-1]["step"] + 1 if history else None
        self.open: dict[str, object] = {}
        for n in parse(names):
            where = self.folder / "tb" if n == "tensorboard" else self.root / {"mlflow": "mlruns"}.get(n, n)
            tracker = TRACKERS[n]()
            tracker.open(where, project, self.name, config, purge)
            self.open[n] = tracker
        for row in history:  # a resumed run: new tracker runs get the whole history (TensorBoard purges instead)
            self.log(row, skip=("tensorboard",))
        self._write_links()

    def log(self, row: dict, skip: tuple = ()) -> None:
        for n, t in self.open.items():
            if n not in skip:
                t.log(row, int(row["step"]))

    def links(self) -> dict:
        return {n: t.link() for n, t in self.open.items()}

    def _write_links(self) -> None:
        if not self.open:
            return
        text = json.dumps({"run_name": self.name, "trackers": self.links()}, indent=2)
        (self.folder / "trackers.json").write_text(text)
        if set(self.open) - {"tensorboard"}:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / f"{self.name}.json").write_text(text)

    def close(self) -> None:
        for t in self.open.values():
            t.close()
        self._write_links()
        self.open = {}
