"""import: every supported format and file type, column mapping, and the bad-input cases."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alignpipe.cli import app
from alignpipe.data.io import read_input

runner = CliRunner()


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _import(src: Path, out: Path, *extra: str):
    result = runner.invoke(app, ["import", str(src), "--out", str(out), *extra])
    return result


CONV = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}]
FORMATS = {
    "prompts": ([{"prompt": "Tell a joke", "split": "test"}, {"prompt": "Say hi", "reference": "Hi"}], "prompts"),
    "messages": ([{"messages": CONV}, {"messages": CONV[:1] + [{"role": "user", "content": "x"}]}], "prompts"),
    "preference": ([{"prompt": "Q", "chosen": "good", "rejected": "bad"}], "annotations"),
    "preference-messages": ([{"chosen": CONV, "rejected": CONV[:1] + [{"role": "assistant", "content": "Go."}]}],
                            "annotations"),
    "scored": ([{"prompt": "Q", "completions": ["a", "bb", "ccc"], "scores": [0.1, 0.5, -1.0]}], "annotations"),
    "labelled": ([{"prompt": "Q", "completion": "yes", "label": True},
                  {"prompt": "Q2", "completion": "no", "label": False}], "annotations"),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_imports_and_validates(fmt, tmp_path):
    rows, kind = FORMATS[fmt]
    result = _import(_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out")
    assert result.exit_code == 0, result.output
    ds, found = read_input(tmp_path / "out", kind, stage="test")
    assert found == kind
    if fmt == "prompts":
        assert ds["split"] == ["test", "train"] and ds["reference"] == [None, "Hi"]
    if fmt == "messages":
        assert ds["reference"][0] == "Hello!" and ds["prompt"] == ["Hi?", "x"] and ds["messages"][0] == CONV[:1]
    if fmt.startswith("preference"):
        assert ds["preference"] == [1.0] and ds["response2"][0] in ("bad", "Go.") and ds["pairing"] == ["imported"]
    if fmt == "scored":
        assert ds["response1"] == ["a", "bb", "ccc"] and ds["response1_reward"] == [0.1, 0.5, -1.0]
        assert ds["response1_sample_index"] == [0, 1, 2] and ds["response2"] == [None] * 3
    if fmt == "labelled":
        assert ds["response1_label"] == [True, False]


@pytest.mark.parametrize("suffix", ["parquet", "csv", "folder", "json"])
def test_file_types(suffix, tmp_path):
    from datasets import Dataset

    ds = Dataset.from_list([{"prompt": "Q", "chosen": "a", "rejected": "b"}] * 2)
    src = tmp_path / f"in.{suffix}"
    if suffix == "parquet":
        ds.to_parquet(str(src))
    elif suffix == "csv":
        ds.to_csv(str(src), index=False)
    elif suffix == "json":
        src.write_text(json.dumps(ds.to_list()))
    else:
        ds.save_to_disk(str(src))
    result = _import(src, tmp_path / "out")
    assert result.exit_code == 0, result.output
    ds = read_input(tmp_path / "out", "annotations", "t")[0]  # two pairs of one prompt: distinct sample indices
    assert ds["response1_sample_index"] == [0, 2] and ds["response2_sample_index"] == [1, 3]
    src2 = tmp_path / "in2.jsonl"
    _jsonl(src2, [{"question": "Q1", "good": "a", "bad": "b"}])
    result = _import(src2, tmp_path / "out2", "--column", "prompt=question", "--column", "chosen=good",
                     "--column", "rejected=bad")
    assert result.exit_code == 0, result.output
    assert read_input(tmp_path / "out2", "annotations", "t")[0]["prompt"] == ["Q1"]


def test_parquet_round_trip(tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"prompt": f"q{i}"} for i in range(5)]).to_parquet(str(tmp_path / "p.parquet"))
    assert _import(tmp_path / "p.parquet", tmp_path / "out").exit_code == 0
    assert read_input(tmp_path / "out", "prompts", "t")[0]["prompt"] == [f"q{i}" for i in range(5)]


BAD = {
    "unknown layout": ([{"question": "x"}], "unknown layout; columns found: question"),
    "empty prompt": ([{"prompt": "  "}], "row 0: empty prompt"),
    "duplicate ids": ([{"prompt": "a", "id": 1}, {"prompt": "b", "id": 1}], "duplicate prompt_id '1'"),
    "nan score": ([{"prompt": "a", "completions": ["x"], "scores": [float("nan")]}], "not finite"),
    "score lengths": ([{"prompt": "a", "completions": ["x", "y"], "scores": [1.0]}], "equal length"),
    "bad label": ([{"prompt": "a", "completion": "x", "label": "maybe"}], "'label' must be a boolean"),
    "messages no user": ([{"messages": [{"role": "system", "content": "s"}]}], "no user turn"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs(case, tmp_path):
    rows, message = BAD[case]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = _import(src, tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_invalid_utf8_and_json_name_the_line(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff"}\n')
    result = _import(src, tmp_path / "out")
    assert result.exit_code == 2 and f"{src}:2: invalid UTF-8" in result.output
    src.write_text('{"prompt": "ok"}\n{"prompt": \n')
    result = _import(src, tmp_path / "out")
    assert result.exit_code == 2 and f"{src}:2: invalid JSON" in result.output
    assert not (tmp_path / "out").exists()


def test_unknown_format_and_file_type(tmp_path):
    src = _jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}])
    assert "unknown (known: auto" in _import(src, tmp_path / "o", "--format", "nope").output
    (tmp_path / "x.xlsx").write_text("x")
    assert "unknown file type '.xlsx'" in _import(tmp_path / "x.xlsx", tmp_path / "o").output


@pytest.mark.parametrize("suffix", ["parquet", "jsonl"])
def test_export_round_trips_through_import(suffix, tmp_path):
    src = _jsonl(tmp_path / "in.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}])
    assert _import(src, tmp_path / "ann").exit_code == 0
    result = runner.invoke(app, ["export", str(tmp_path / "ann"), "--to", str(tmp_path / f"x.{suffix}")])
    assert result.exit_code == 0, result.output
    from datasets import Dataset

    back = Dataset.from_parquet(str(tmp_path / "x.parquet")) if suffix == "parquet" else \
        Dataset.from_json(str(tmp_path / "x.jsonl"))
    assert back["response1"] == ["a"] and back["response2"] == ["b"]


# ---------------------------------------------------------------- what datasets.load_dataset accepts
PROMPT_ROWS = [{"prompt_id": f"p{i}", "prompt": f"Question {i}?"} for i in range(5)]


def test_builder_name_with_data_files(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", PROMPT_ROWS[:3])
    b = _jsonl(tmp_path / "b.jsonl", PROMPT_ROWS[3:])
    result = _import("json", tmp_path / "out", "--data-files", str(a), "--data-files", str(b))
    assert result.exit_code == 0, result.output
    ds, _ = read_input(tmp_path / "out", "prompts", stage="test")
    assert ds["prompt_id"] == [r["prompt_id"] for r in PROMPT_ROWS]
    from alignpipe.data.manifest import read_manifest

    assert [Path(i["path"]).name for i in read_manifest(tmp_path / "out")["inputs"]] == ["a.jsonl", "b.jsonl"]


def test_parquet_builder_and_a_folder_of_data_files(tmp_path):
    from datasets import Dataset

    folder = tmp_path / "data"
    folder.mkdir()
    Dataset.from_list(PROMPT_ROWS).to_parquet(str(folder / "train.parquet"))
    Dataset.from_list(PROMPT_ROWS[:2]).to_parquet(str(folder / "test.parquet"))
    result = _import("parquet", tmp_path / "o1", "--data-files", str(folder / "train.parquet"))
    assert result.exit_code == 0, result.output
    assert len(read_input(tmp_path / "o1", "prompts", stage="test")[0]) == 5
    for split, n in (("train", 5), ("test", 2)):  # a folder of data files, as load_dataset splits it
        result = _import(folder, tmp_path / f"o-{split}", "--source-split", split)
        assert result.exit_code == 0, result.output
        assert len(read_input(tmp_path / f"o-{split}", "prompts", stage="test")[0]) == n
    result = _import(folder, tmp_path / "o3", "--source-split", "validation")
    assert result.exit_code == 2 and "no split 'validation' (found: train, test)" in result.output


def test_hub_dataset_id_from_the_cache(tmp_path, monkeypatch):
    from alignpipe.data import hub
    from alignpipe.data.manifest import read_manifest

    src = tmp_path / "repo"
    (src / "data").mkdir(parents=True)
    _jsonl(src / "data" / "train.jsonl", PROMPT_ROWS)
    snap = hub.put(src, "alignpipe-test/prompts", cache=tmp_path / "hub", repo_type="dataset")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = _import("alignpipe-test/prompts", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert read_input(tmp_path / "out", "prompts", stage="test")[0]["prompt_id"] == [r["prompt_id"] for r in PROMPT_ROWS]
    assert snap.name in read_manifest(tmp_path / "out")["inputs"][0]["path"]  # the commit
    missing = _import("alignpipe-test/nothing", tmp_path / "o2")
    assert missing.exit_code == 2 and len(missing.output.strip().splitlines()) == 1
    assert "alignpipe-test/nothing: not a file or dataset folder, and not in the Hub cache" in missing.output
    assert "HF_HUB_OFFLINE=1" in missing.output


def test_no_table_is_pickled_to_fingerprint(tmp_path, monkeypatch):
    """`datasets` fingerprints a Dataset built without one by pickling its whole Arrow table with dill, which
    failed with pyarrow 26 on Python 3.12 ("Can't pickle <class 'MonthDayNano'>"). import must not depend on it."""
    import pickle

    import datasets.arrow_dataset

    def refuse(dataset):
        raise pickle.PicklingError("Can't pickle <class 'MonthDayNano'>")

    monkeypatch.setattr(datasets.arrow_dataset, "generate_fingerprint", refuse)
    for fmt, (rows, kind) in FORMATS.items():
        result = _import(_jsonl(tmp_path / f"{fmt}.jsonl", rows), tmp_path / fmt)
        assert result.exit_code == 0, result.output
        assert len(read_input(tmp_path / fmt, kind, stage="test")[0]) >= 1
