"""Foundation: schemas, stage I/O (validation, atomic write, manifest, lock, up-to-date, shards), the CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alignpipe import schemas
from alignpipe.cli import app
from alignpipe.core.errors import LockedError, UserError
from alignpipe.data.io import read_input
from alignpipe.data.output import StageOutput, map_shards

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def _row(kind: str) -> dict:
    """One valid row of any kind, built from the schema table itself."""
    fill = {"string": "x", "int32": 1, "int64": 1, "float64": 0.5, "bool": True, "ids": [1, 2], "mask": [1, 1], "floats": [-0.5, -1.5],
            "messages": [{"role": "user", "content": "hi"}],
            "raw": [{"name": "a", "score1": 1.0, "score2": 0.0, "preference": 0.7, "preference_12": 0.7,
                     "preference_21": 0.3, "abstained": False, "reason": ""}]}
    return {c.name: fill[c.dtype] for c in schemas.columns(kind)}


def write_kind(path: Path, kind: str, rows: list[dict] | None = None, version: str | None = None) -> Path:
    from datasets import Dataset

    rows = rows if rows is not None else [_row(kind), _row(kind)]
    ds = Dataset.from_dict({c.name: [r[c.name] for r in rows] for c in schemas.columns(kind)},
                           features=schemas.features(kind))
    with StageOutput(path, stage="test", kind=kind, config={}, inputs=[], force=True) as so:
        so.finish(ds)
    if version:
        m = json.loads((path / "manifest.json").read_text())
        m["schema"]["version"] = version
        (path / "manifest.json").write_text(json.dumps(m))
    return path


@pytest.mark.parametrize("kind", list(schemas.KINDS))
def test_every_kind_round_trips_and_documents_every_column(kind, tmp_path):
    assert all(c.doc and c.doc.endswith((".", ")")) for c in schemas.columns(kind))
    ds, found = read_input(write_kind(tmp_path / kind, kind), kind, stage="test")
    assert found == kind and len(ds) == 2 and ds[0] == {**_row(kind), **ds[0]}
    assert ds.features == schemas.features(kind)
    result = runner.invoke(app, ["inspect", str(tmp_path / kind), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["verdict"] == "valid"


def _bad_cases(tmp_path: Path, kind: str):
    from datasets import Dataset

    first = schemas.columns(kind)[0].name
    no_col = tmp_path / "missing"
    rows = [{k: v for k, v in _row(kind).items() if k != first}]
    Dataset.from_list(rows).save_to_disk(str(no_col))
    (no_col / "manifest.json").write_text(json.dumps({"schema": {"kind": kind, "version": "1.0"}}))
    mistyped = tmp_path / "mistyped"
    Dataset.from_list([{**_row(kind), first: [1, 2, 3]}]).save_to_disk(str(mistyped))
    (mistyped / "manifest.json").write_text(json.dumps({"schema": {"kind": kind, "version": "1.0"}}))
    other = "prompts" if kind != "prompts" else "generations"
    not_dataset = tmp_path / "plain"
    not_dataset.mkdir()
    (not_dataset / "a.txt").write_text("hello")
    return {
        "missing column": (no_col, f"missing column '{first}'"),
        "wrong type": (mistyped, f"column '{first}' has type list<int64>"),
        "wrong kind": (write_kind(tmp_path / "other", other), f"is a '{other}' dataset"),
        "newer version": (write_kind(tmp_path / "newer", kind, version="9.0"), "schema version 9.0 is newer"),
        "empty": (write_kind(tmp_path / "empty", kind, rows=[]), "empty (0 rows)"),
        "not a dataset": (not_dataset, "not a dataset folder"),
        "no such path": (tmp_path / "nope", "no such file or folder"),
    }


@pytest.mark.parametrize("kind", list(schemas.KINDS))
def test_bad_inputs_give_one_line_naming_the_problem(kind, tmp_path):
    for case, (path, message) in _bad_cases(tmp_path, kind).items():
        with pytest.raises(UserError) as e:
            read_input(path, kind, stage="test")
        text = str(e.value)
        assert message in text and str(path) in text and "\n" not in text, (case, text)
        if case in ("missing column", "wrong type"):
            assert schemas.producer(kind) in text and "expected" in text


def test_bad_input_through_cli_exit_2_no_traceback(tmp_path):
    result = runner.invoke(app, ["inspect", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "Traceback" not in result.output and result.output.strip().count("\n") == 0


def test_help_lists_every_command_fast():
    t = time.time()
    out = subprocess.run([sys.executable, "-m", "alignpipe", "--help"], capture_output=True, text=True, cwd=ROOT)
    elapsed = time.time() - t
    assert out.returncode == 0
    for name in ("generate", "annotate", "reweight", "build-batches", "train", "import", "inspect", "schema"):
        assert f" {name} " in out.stdout, name
    assert elapsed < 1.0, elapsed
    cmd = "import sys, alignpipe.cli; print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    heavy = subprocess.run([sys.executable, "-c", cmd], capture_output=True, text=True, cwd=ROOT)
    assert heavy.stdout.strip() == "[]", heavy.stdout + heavy.stderr


def test_schema_command_prints_every_kind():
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    for kind in schemas.KINDS:
        assert kind in result.output
    assert runner.invoke(app, ["schema", "nope"]).exit_code == 2


# -- atomic output, up to date, force, lock -----------------------------------------------------------------

def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rerun_is_up_to_date_and_force_redoes(tmp_path):
    src = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    out = tmp_path / "prompts"
    assert runner.invoke(app, ["import", str(src), "--out", str(out)]).exit_code == 0
    m1 = json.loads((out / "manifest.json").read_text())
    again = runner.invoke(app, ["import", str(src), "--out", str(out)])
    assert again.exit_code == 0 and "up to date" in again.output
    assert json.loads((out / "manifest.json").read_text()) == m1
    forced = runner.invoke(app, ["import", str(src), "--out", str(out), "--force"])
    assert forced.exit_code == 0 and "up to date" not in forced.output
    assert json.loads((out / "manifest.json").read_text())["finished_at"] >= m1["finished_at"]
    _jsonl(src, [{"prompt": "a"}, {"prompt": "c"}])  # a changed input is not up to date
    changed = runner.invoke(app, ["import", str(src), "--out", str(out)])
    assert "up to date" not in changed.output and read_input(out, "prompts", "t")[0]["prompt"] == ["a", "c"]


def test_manifest_contents(tmp_path):
    src = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "split": "test"}])
    out = tmp_path / "prompts"
    runner.invoke(app, ["import", str(src), "--out", str(out)])
    m = json.loads((out / "manifest.json").read_text())
    for key in ("stage", "command", "config", "inputs", "schema", "package_version", "git_revision", "num_rows",
                "seed", "started_at", "finished_at", "fingerprint"):
        assert key in m, key
    assert m["stage"] == "import" and m["num_rows"] == 1 and m["schema"] == {"kind": "prompts", "version": schemas.SCHEMA_VERSION}
    assert m["inputs"][0]["path"] == str(src) and len(m["inputs"][0]["fingerprint"]) == 16


def test_config_file_sets_options_flags_override_and_errors(tmp_path):
    src = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("split: test\n")
    out = tmp_path / "o"
    assert runner.invoke(app, ["import", str(src), "--out", str(out), "--config", str(cfg)]).exit_code == 0
    assert read_input(out, "prompts", "t")[0]["split"] == ["test"]
    assert json.loads((out / "manifest.json").read_text())["config"]["split"] == "test"
    runner.invoke(app, ["import", str(src), "--out", str(out), "--config", str(cfg), "--split", "dev"])
    assert read_input(out, "prompts", "t")[0]["split"] == ["dev"]
    cfg.write_text("splitt: test\n")
    bad = runner.invoke(app, ["import", str(src), "--out", str(tmp_path / "x"), "--config", str(cfg)])
    assert bad.exit_code == 2 and "unknown key 'splitt'" in bad.output
    cfg.write_text("split: [1, 2]\n")
    bad = runner.invoke(app, ["import", str(src), "--out", str(tmp_path / "x"), "--config", str(cfg)])
    assert bad.exit_code == 2 and "must be a single value" in bad.output
    assert not (tmp_path / "x").exists()


def test_lock_refuses_second_writer_and_recovers_stale(tmp_path):
    out = tmp_path / "o"
    a = StageOutput(out, stage="t", kind=None, config={}, inputs=[])
    with a, pytest.raises(LockedError, match=f"locked by pid {os.getpid()}"):
        StageOutput(out, stage="t", kind=None, config={}, inputs=[]).__enter__()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".o.lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    with StageOutput(out, stage="t", kind=None, config={}, inputs=[]) as so:
        so.finish(write=lambda folder: (folder / "x").write_text("1"))
    assert (out / "x").read_text() == "1" and not (tmp_path / ".o.lock").exists()


def test_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "o"

    def boom(folder):
        (folder / "half").write_text("partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(UserError, match="No space left on device"):
        with StageOutput(out, stage="t", kind=None, config={}, inputs=[]) as so:
            so.finish(write=boom)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temp folder, no empty partial, no lock


# -- shards: SIGKILL mid-run, resume equals uninterrupted ----------------------------------------------------

_SHARD_SCRIPT = textwrap.dedent("""
    import sys, time
    from datasets import Dataset
    from alignpipe.data.output import StageOutput, map_shards
    out, delay = sys.argv[1], float(sys.argv[2])
    ds = Dataset.from_list([{"prompt_id": f"p{i}", "prompt": f"q{i}", "messages": [], "reference": None,
                             "split": "train"} for i in range(40)])
    def work(part, index):
        time.sleep(delay)
        return part.map(lambda r: {"prompt": r["prompt"] + "!"})
    with StageOutput(out, stage="t", kind="prompts", config={"n": 40}, inputs=[]) as so:
        so.finish(map_shards(so, ds, work, 5, "t"))
""")


def test_sigkill_mid_run_leaves_no_output_and_rerun_resumes(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(_SHARD_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "out"), "0.4"], env=env)
    partial = tmp_path / ".out.partial"
    deadline = time.time() + 60
    while len(list(partial.glob("shard-[0-9][0-9][0-9][0-9][0-9]/done"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out").exists()
    done = len(list(partial.glob("shard-[0-9][0-9][0-9][0-9][0-9]/done")))
    assert 2 <= done < 8
    subprocess.run([sys.executable, str(script), str(tmp_path / "out"), "0"], env=env, check=True)
    resumed = read_input(tmp_path / "out", "prompts", "t")[0]
    subprocess.run([sys.executable, str(script), str(tmp_path / "ref"), "0"], env=env, check=True)
    reference = read_input(tmp_path / "ref", "prompts", "t")[0]
    assert resumed.to_list() == reference.to_list() and len(resumed) == 40
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["report"]["resumed_shards"] == done
    assert not partial.exists()


def test_map_shards_changed_config_discards_partial(tmp_path):
    from datasets import Dataset

    ds = Dataset.from_list([{"a": i} for i in range(6)])
    with StageOutput(tmp_path / "o", stage="t", kind=None, config={"v": 1}, inputs=[]) as so:
        so.write_shard(0, ds.select(range(2)))
    with StageOutput(tmp_path / "o", stage="t", kind=None, config={"v": 2}, inputs=[]) as so:
        assert so.done_shards() == []
        assert len(map_shards(so, ds, lambda p, i: p, 2, "t")) == 6
