"""Experiment trackers, offline: what each one logged, read back with its own reader, equals metrics.jsonl
(same names, same steps, same values). wandb in offline mode, MLflow with a local file store, Trackio local,
TensorBoard through its event reader. A tracker whose package is not installed is skipped, saying so."""
from __future__ import annotations

import importlib.util
import json
import math
import struct
from pathlib import Path

import pytest

from alignpipe.core.errors import UserError
from alignpipe.training.metrics import MetricsLog, read_metrics
from alignpipe.training.trackers import mlflow_name, parse, run_name

ROWS = [{"step": s, "epoch": s / 4, "batch_index": s - 1, "loss": 0.7 / s, "rewards/accuracy": 0.25 * (s % 4),
         "kl": 0.01 * s * s, "grad_norm": float("nan") if s == 3 else 1.5 / s, "lr": 5e-4, "tokens": 100 + s,
         "seconds": 0.1, "tokens/s": 1000.0 + s} for s in range(1, 6)]


def needs(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"{module} is not installed (pip install 'alignpipe[trackers]')")


def expected(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as {name: [(step, value)]}: every numeric entry (nan is logged as the string 'nan')."""
    out: dict[str, list] = {}
    for r in read_metrics(folder / "metrics.jsonl"):
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)):
                out.setdefault(k, []).append((r["step"], float(v)))
    return out


def log_rows(tmp_path: Path, names: tuple, history: list | None = None) -> tuple[Path, dict]:
    folder = tmp_path / "runs" / "demo" / "iter-0" / ".policy.partial"  # as train gives it
    log = MetricsLog(folder, history, tensorboard=False, report_to=names,
                     config={"lr": 5e-4, "loss": "dpo", "api_key": "sk-should-not-appear-anywhere"})
    for row in ROWS[len(history or []):]:
        log.write(row)
    log.close()
    links = json.loads((folder / "trackers.json").read_text())
    assert links["run_name"] == "demo-iter-0-policy" == run_name(folder.parent / "policy")
    assert len(read_metrics(folder / "metrics.jsonl")) == len(ROWS)
    return folder, links["trackers"]


@needs("tensorboard")
def test_tensorboard_equals_metrics_jsonl(tmp_path):
    folder, links = log_rows(tmp_path, ("tensorboard",))
    assert links["tensorboard"]["dir"] == str(folder.parent / "policy" / "tb")  # where train copies it
    assert_tb_equal(tb_metrics(folder / "tb"), expected(folder))


def tb_metrics(folder: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_tb_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, points in want.items():
        assert [s for s, _ in got[k]] == [s for s, _ in points]
        assert [v for _, v in got[k]] == pytest.approx([v for _, v in points], rel=1e-6)  # float32 events


def _wandb_records(path: Path):
    """The records of a .wandb file: W&B's LevelDB-style log (7-byte file header, 32 KiB blocks, each record
    chunk with a 7-byte header crc32/length/type), each record a protobuf `Record`."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, payload = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        payload = chunk if kind in (1, 2) else payload + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(payload)
            yield rec


@needs("wandb")
def test_wandb_offline_equals_metrics_jsonl(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    folder, links = log_rows(tmp_path, ("wandb",))
    run_dir = Path(links["wandb"]["dir"])
    assert links["wandb"]["mode"] == "offline" and run_dir.parent.parent == tmp_path / "wandb-dir"
    got, config = wandb_metrics(run_dir)
    assert got == expected(folder)
    assert config["loss"] == "dpo" and config["api_key"] == "***"  # the config, redacted
    assert links["wandb"]["project"] == "demo"


def wandb_metrics(run_dir: Path) -> tuple[dict, dict]:
    got: dict[str, list] = {}
    config = {}
    for rec in _wandb_records(next(run_dir.glob("*.wandb"))):
        if rec.HasField("history"):
            step = rec.history.step.num
            for item in rec.history.item:
                key = "/".join(item.nested_key) if item.nested_key else item.key
                if not key.startswith("_"):
                    got.setdefault(key, []).append((step, float(json.loads(item.value_json))))
        if rec.HasField("run"):
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
    return got, config


@needs("mlflow")
def test_mlflow_file_store_equals_metrics_jsonl(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    folder, links = log_rows(tmp_path, ("mlflow",), history=ROWS[:2])  # resumed after step 2: whole history
    client = MlflowClient(tracking_uri=links["mlflow"]["uri"])
    run = client.get_run(links["mlflow"]["run_id"])
    assert run.info.run_name == "demo-iter-0-policy" and run.info.status == "FINISHED"
    assert run.data.params["loss"] == "dpo" and run.data.params["api_key"] == "***"
    got = mlflow_metrics(links["mlflow"])
    want = expected(folder)
    assert got == {mlflow_name(k, want): v for k, v in want.items()}
    assert mlflow_name("tokens/s", want) == "tokens_s" and mlflow_name("rewards/accuracy", want) == "rewards/accuracy"
    assert (tmp_path / "mlruns").is_dir() and client.get_experiment(links["mlflow"]["experiment_id"]).name == "demo"


def mlflow_metrics(link: dict) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=link["uri"])
    run = client.get_run(link["run_id"])
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k))
            for k in run.data.metrics}


@needs("mlflow")
def test_mlflow_default_store_is_under_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _, links = log_rows(tmp_path, ("mlflow",))
    assert links["mlflow"]["uri"] == (tmp_path / "runs" / "demo" / "trackers" / "mlruns").as_uri()
    linked = json.loads((tmp_path / "runs" / "demo" / "trackers" / "demo-iter-0-policy.json").read_text())
    assert linked["trackers"]["mlflow"]["run_id"] == links["mlflow"]["run_id"]  # what the report links


@needs("trackio")
def test_trackio_local_equals_metrics_jsonl(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    folder, links = log_rows(tmp_path, ("trackio",))
    assert trackio_metrics(links["trackio"], monkeypatch) == expected(folder)
    assert Path(links["trackio"]["dir"]).is_dir()


def trackio_metrics(link: dict, monkeypatch) -> dict:
    """The run's logs from the local database in link["dir"] (wherever this process's trackio points)."""
    from trackio import sqlite_storage

    monkeypatch.setattr(sqlite_storage, "TRACKIO_DIR", Path(link["dir"]))
    got: dict[str, list] = {}
    for row in sqlite_storage.SQLiteStorage.get_logs(project=link["project"], run=link["run"]):
        for k, v in row.items():
            if k not in ("step", "timestamp") and not k.startswith("_") and isinstance(v, (int, float)) \
                    and not (isinstance(v, float) and math.isnan(v)):
                got.setdefault(k, []).append((row["step"], float(v)))
    return got


def test_unknown_or_missing_tracker_is_one_line_error(monkeypatch):
    with pytest.raises(UserError, match="unknown tracker"):
        parse("tensorboard,comet")
    assert parse(" none,") == () and parse(()) == ()
    monkeypatch.setitem(__import__("sys").modules, "trackio", None)  # as if not installed
    with pytest.raises(UserError, match="pip install"):
        parse(("trackio",))


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("tensorboard", "wandb", "mlflow", "trackio")),
                    reason="needs tensorboard, wandb, mlflow and trackio (pip install 'alignpipe[trackers]')")
def test_train_report_to_every_tracker_end_to_end(tmp_path, tiny_lm_dir, monkeypatch):
    """`alignpipe train --report-to tensorboard,wandb,mlflow,trackio` in a child process, as a user runs it: each
    tracker's record equals the policy's metrics.jsonl, and the report links them."""
    from helpers import ok, run_child
    from test_train import task_examples, write_batches

    run = tmp_path / "runs" / "e2e"
    batches = write_batches(run / "iter-0" / "batches", "sft", task_examples("sft", 6), tiny_lm_dir)
    policy = run / "iter-0" / "policy"
    done = run_child(["train", batches, "--policy", tiny_lm_dir, "--loss", "sft", "--lr", "1e-3", "--out", policy,
                      "--report-to", "tensorboard,wandb,mlflow,trackio"],
                     WANDB_MODE="offline", WANDB_DIR=tmp_path / "wandb", TRACKIO_DIR=tmp_path / "trackio",
                     MLFLOW_TRACKING_URI=(tmp_path / "mlruns").as_uri(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    links = json.loads((policy / "trackers.json").read_text())
    assert links["run_name"] == "e2e-iter-0-policy" and set(links["trackers"]) == {"tensorboard", "wandb", "mlflow",
                                                                                       "trackio"}
    want = expected(policy)
    assert len(want["loss"]) == 3  # 6 examples, batch 2
    assert_tb_equal(tb_metrics(policy / "tb"), want)
    assert wandb_metrics(Path(links["trackers"]["wandb"]["dir"]))[0] == want
    assert mlflow_metrics(links["trackers"]["mlflow"]) == {mlflow_name(k, want): v for k, v in want.items()}
    assert trackio_metrics(links["trackers"]["trackio"], monkeypatch) == want
    ok("report", run)
    html = (run / "report" / "report.html").read_text()
    assert "Experiment trackers" in html and (tmp_path / "mlruns").as_uri() in html
