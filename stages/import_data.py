"""import: bring outside data in as a `prompts` or `annotations` dataset.

Formats (detected from the columns, or forced with --format):
  prompts      prompt [, prompt_id|id] [, split] [, reference|completion|response]   -> prompts
  messages     messages=[{role, content}] (a trailing assistant turn becomes the reference) -> prompts
  preference   prompt, chosen, rejected (text, or messages lists as in HH/UltraFeedback) -> annotations (pairs)
  scored       prompt, completions=[str], scores=[float]                               -> annotations (pointwise)
  labelled     prompt, completion, label (bool: desirable)                              -> annotations (pointwise)
Sources: a .jsonl/.json, .parquet or .csv file, a `save_to_disk` folder, or whatever `datasets.load_dataset`
accepts: a Hub dataset id `org/name[@revision]` (from huggingface_hub's cache when HF_HUB_OFFLINE=1), a local
dataset folder of data files, or a builder name with files (`json --data-files a.jsonl --data-files b.jsonl`),
with `--subset` (the config name) and `--source-split`. `--column new=old` renames first.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated

import typer

from alignpipe.core.command import ConfigOpt, ForceOpt, OutOpt, handle_errors, resolved_config, say
from alignpipe.core.errors import UserError, first_line

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt", ".arrow", ".gz")
FORMATS = {  # name -> (required columns, output kind)
    "preference": (("chosen", "rejected"), "annotations"),  # prompt column, or inside the conversations
    "scored": (("prompt", "completions", "scores"), "annotations"),
    "labelled": (("prompt", "completion", "label"), "annotations"),
    "messages": (("messages",), "prompts"),
    "prompts": (("prompt",), "prompts"),
}


def read_source(source: str, *, data_files: list[str] | None = None, subset: str | None = None,
                source_split: str | None = None):
    """A local file or dataset folder (read here), else what `datasets.load_dataset` accepts."""
    path = Path(source)
    if path.exists() and not data_files and not subset and not path.is_dir() or _saved_dataset(path):
        return read_table(path)
    return load_source(source, data_files=data_files, subset=subset, source_split=source_split)


def _saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in ("state.json", "dataset_dict.json"))


def read_table(path: Path):
    """Read a JSONL/JSON/Parquet/CSV file or a save_to_disk folder into a Dataset, with one-line errors."""
    from datasets import Dataset, load_from_disk

    from alignpipe.data.io import dataset_from_rows

    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    try:
        if path.is_dir():
            ds = load_from_disk(str(path))
            return ds["train"] if hasattr(ds, "keys") and "train" in ds else ds
        if suffix in (".jsonl", ".json"):
            raw = path.read_bytes()
            return dataset_from_rows(_read_jsonl(path, raw), fingerprint=hashlib.sha256(raw).hexdigest()[:16])
        if suffix == ".parquet":
            return Dataset.from_parquet(str(path))
        if suffix == ".csv":
            return Dataset.from_csv(str(path))
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: cannot read ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
    raise UserError(f"{path}: unknown file type '{suffix}' (known: .jsonl, .json, .parquet, .csv, a dataset "
                    f"folder, or a `datasets.load_dataset` source)")


def load_source(source: str, *, data_files=None, subset=None, source_split=None):
    """`datasets.load_dataset(source)`: a Hub dataset id through huggingface_hub's cache (its snapshot folder),
    a folder of data files, or a builder name (json, parquet, csv, ...) with --data-files; one split."""
    from datasets import load_dataset
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    from alignpipe.data import hub

    target, why = source, ""
    local = Path(source).exists() or source in _PACKAGED_DATASETS_MODULES
    if not local and Path(source).suffix.lower() in DATA_SUFFIXES:
        raise UserError(f"{source}: no such file or folder")
    if not local and hub.split_id(source):
        try:
            target = str(hub.snapshot(source, repo_type="dataset"))
        except hub.HubMiss as e:
            why = f"{e}; "
    elif not local:
        raise UserError(f"{source}: no such file or folder, not a Hub dataset id and not a `datasets` builder "
                        f"(known: {', '.join(sorted(_PACKAGED_DATASETS_MODULES))})")
    try:
        loaded = load_dataset(target, name=subset, data_files=data_files or None)
    except Exception as e:
        raise UserError(f"{source}: not a file or dataset folder, and {why}load_dataset cannot load it "
                        f"({type(e).__name__}: {first_line(e, 160)})")
    return _one_split(loaded, source, source_split)


def _one_split(loaded, source: str, name: str | None):
    splits = list(loaded)
    pick = name or ("train" if "train" in splits or len(splits) != 1 else splits[0])
    if pick not in splits:
        raise UserError(f"{source}: no split '{pick}' (found: {', '.join(splits)}); choose one with --source-split")
    return loaded[pick]


def _read_jsonl(path: Path, raw: bytes) -> list[dict]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: invalid UTF-8 (byte {e.start})")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise UserError(f"{path}:{i}: invalid JSON ({e.msg})")
    if rows and not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{path}: every line must be a JSON object")
    return rows


def detect_format(columns: list[str], path: Path) -> str:
    for name, (required, _) in FORMATS.items():
        if all(c in columns for c in required):
            return name
    known = "; ".join(f"{n}: {', '.join(r)}" for n, (r, _) in FORMATS.items())
    raise UserError(f"{path}: unknown layout; columns found: {', '.join(columns) or '(none)'}; "
                    f"formats known: {known}; map columns with --column new=old")


def _pid(text: str) -> str:
    return "h" + hashlib.sha1(text.encode()).hexdigest()[:12]


def _split_messages(msgs, where: str):
    """(messages before a trailing assistant turn, that turn's content or None, last user text)."""
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m for m in msgs):
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    msgs = [{"role": str(m["role"]), "content": str(m.get("content") or "")} for m in msgs]
    reference = None
    if msgs[-1]["role"] == "assistant":
        reference, msgs = msgs[-1]["content"], msgs[:-1]
    users = [m["content"] for m in msgs if m["role"] == "user"]
    if not users:
        raise UserError(f"{where}: conversation has no user turn")
    return msgs, reference, users[-1]


def _response_text(value, where: str) -> tuple[str, list | None]:
    if isinstance(value, list):
        msgs, reference, _ = _split_messages(value, where)
        if reference is None:
            raise UserError(f"{where}: conversation does not end with an assistant turn")
        return reference, msgs
    return str(value), None


def _prompt_fields(row: dict, where: str, default_split: str) -> dict:
    msgs, reference = [], None
    if row.get("messages") is not None:
        msgs, reference, prompt = _split_messages(row["messages"], where)
    else:
        prompt = row.get("prompt")
        if isinstance(prompt, list):
            msgs, _, prompt = _split_messages(prompt, where)
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f"{where}: empty prompt")
    pid = row.get("prompt_id", row.get("id"))
    pid = str(pid) if pid is not None else _pid(json.dumps(msgs) if msgs else prompt)
    for key in ("reference", "completion", "response"):
        if reference is None and isinstance(row.get(key), str):
            reference = row[key]
    return {"prompt_id": pid, "prompt": prompt, "messages": msgs, "reference": reference,
            "split": str(row.get("split") or default_split)}


def _annotation(base: dict, r1: str, *, r2=None, reward1=None, reward2=None, label=None, preference=None,
                pairing: str) -> dict:
    pair = r2 is not None
    return {**{k: base[k] for k in ("prompt_id", "prompt", "messages")}, "iteration": 0,
            "response1": r1, "response1_sample_index": 0, "response1_num_tokens": 0, "response1_behaviour_logp": None,
            "response1_reward": reward1, "response1_label": label, "response1_finish_reason": None, "response1_token_ids": None,
            "response2": r2, "response2_sample_index": 1 if pair else None, "response2_num_tokens": 0 if pair else None,
            "response2_behaviour_logp": None, "response2_reward": reward2, "response2_label": None,
            "response2_finish_reason": None, "response2_token_ids": None,
            "preference": preference, "annotator": "imported", "raw": [], "pairing": "imported", "policy": ""}


def convert_rows(rows, fmt: str, where: str, split: str = "train") -> list[dict]:
    """Pure core: rows of a known format -> rows of the prompts or annotations schema."""
    out: list[dict] = []
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        at = f"{where} row {i}"
        if fmt in ("prompts", "messages"):
            out.append(_prompt_fields(row, at, split))
            continue
        if fmt == "preference":
            chosen, cm = _response_text(row["chosen"], at + " 'chosen'")
            rejected, _ = _response_text(row["rejected"], at + " 'rejected'")
            base = _prompt_fields({**row, "prompt": row.get("prompt") or cm, "messages": None}, at, split)
            out.append(_annotation(base, chosen, r2=rejected, preference=1.0, pairing="imported"))
        elif fmt == "scored":
            base = _prompt_fields(row, at, split)
            comps, scores = row["completions"], row["scores"]
            if not isinstance(comps, list) or not isinstance(scores, list) or len(comps) != len(scores):
                raise UserError(f"{at}: 'completions' and 'scores' must be lists of equal length")
            for j, (c, s) in enumerate(zip(comps, scores)):
                out.append(_annotation(base, str(c), reward1=_finite(s, f"{at} scores[{j}]"), pairing="imported"))
                _number_samples(out[-1], seen)
            continue
        elif fmt == "labelled":
            base = _prompt_fields(row, at, split)
            label = row["label"]
            if isinstance(label, str) and label.lower() in ("true", "false"):
                label = label.lower() == "true"
            if not isinstance(label, (bool, int)):
                raise UserError(f"{at}: 'label' must be a boolean, found {label!r}")
            out.append(_annotation(base, str(row["completion"]), label=bool(label), pairing="imported"))
        _number_samples(out[-1], seen)
    return out


def _number_samples(row: dict, seen: dict[str, int]) -> None:
    """Give an annotation row sample indices unique within its prompt (the k-th pair gets 2k, 2k+1)."""
    same = seen.get(row["prompt_id"], 0)
    seen[row["prompt_id"]] = same + 1
    if row["response2"] is not None:
        row["response1_sample_index"], row["response2_sample_index"] = 2 * same, 2 * same + 1
    else:
        row["response1_sample_index"] = same


def _finite(value, where: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: score must be a number, found {value!r}")
    if v != v or v in (float("inf"), float("-inf")):
        raise UserError(f"{where}: score is not finite ({v})")
    return v


def _check_unique(rows: list[dict], key: str, where: str) -> None:
    seen = {}
    for i, r in enumerate(rows):
        k = r[key]
        if k in seen:
            raise UserError(f"{where}: duplicate {key} {k!r} in rows {seen[k]} and {i}")
        seen[k] = i


def _apply_mapping(ds, mapping: list[str], where: Path):
    for item in mapping or []:
        if "=" not in item:
            raise UserError(f"--column '{item}': expected NEW=OLD, e.g. prompt=question")
        new, old = item.split("=", 1)
        if old not in ds.column_names:
            raise UserError(f"{where}: --column {item}: no column '{old}' (found: {', '.join(ds.column_names)})")
        if new in ds.column_names:
            ds = ds.remove_columns(new)
        ds = ds.rename_column(old, new)
    return ds


@handle_errors
def command(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(
        help="JSONL/JSON/Parquet/CSV file, a save_to_disk folder, a Hub dataset id org/name[@revision], or a "
             "`datasets` builder name (json, parquet, csv, ...) with --data-files.")],
    out: OutOpt,
    format: Annotated[str, typer.Option(help="auto | " + " | ".join(FORMATS))] = "auto",
    column: Annotated[list[str] | None, typer.Option(help="Rename a column first: NEW=OLD (repeatable).")] = None,
    split: Annotated[str, typer.Option(help="Split for rows without a 'split' column.")] = "train",
    data_files: Annotated[list[str] | None, typer.Option(
        help="Data files for a builder or Hub dataset (repeatable), as load_dataset's data_files.")] = None,
    subset: Annotated[str | None, typer.Option(help="Subset (config name) of a Hub dataset.")] = None,
    source_split: Annotated[str | None, typer.Option(
        help="Which split of a multi-split source to read (default: train, or the only one).")] = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
):
    """Bring outside data in: prompts, conversations, preference pairs, scored or labelled completions."""
    say(run(source, out, config=resolved_config(ctx), format=format, column=column, split=split,
            data_files=data_files, subset=subset, source_split=source_split, force=force))


def run(source: str, out: Path, *, config: dict, format: str = "auto", column=None, split: str = "train",
        data_files=None, subset=None, source_split=None, force: bool = False) -> str:
    """The stage from source to disk; returns its summary line."""
    from alignpipe import schemas
    from alignpipe.data.io import dataset_from_rows
    from alignpipe.data.output import StageOutput

    ds = _apply_mapping(read_source(source, data_files=data_files, subset=subset, source_split=source_split),
                        column, source)
    if len(ds) == 0:
        raise UserError(f"{source}: no rows")
    fmt = detect_format(ds.column_names, source) if format == "auto" else format
    if fmt not in FORMATS:
        raise UserError(f"--format '{format}': unknown (known: auto, {', '.join(FORMATS)})")
    missing = [c for c in FORMATS[fmt][0] if c not in ds.column_names]
    if missing:
        raise UserError(f"{source}: format '{fmt}' needs column(s) {', '.join(missing)}; found {', '.join(ds.column_names)}")
    kind = FORMATS[fmt][1]
    so = StageOutput(out, stage="import", kind=kind, config=config, inputs=_inputs(source, data_files), force=force)
    if so.up_to_date():
        return f"import: {out} is up to date (same inputs and config); nothing to do. Use --force to redo it."
    rows = convert_rows(ds, fmt, str(source), split)
    if kind == "prompts":
        _check_unique(rows, "prompt_id", str(source))
    with so:
        so.report = {"format": fmt}
        so.finish(dataset_from_rows(rows, schemas.features(kind)))
    return f"import: {len(rows)} {kind} rows ({fmt}) -> {out}"


def _inputs(source: str, data_files) -> list[Path]:
    """What the output depends on: the local source, the data files, or a Hub dataset's snapshot folder."""
    from alignpipe.data import hub

    files = [Path(f) for f in data_files or [] if Path(f).exists()]
    if Path(source).exists():
        return [Path(source)] + files
    if hub.split_id(source):
        try:
            return [hub.snapshot(source, repo_type="dataset")] + files
        except hub.HubMiss:
            pass
    return files or [Path(source)]
