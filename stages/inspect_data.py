"""inspect: kind, version, rows, per-column statistics, sample rows and the validation verdict of any output."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from alignpipe.core.command import handle_errors
from alignpipe.core.errors import UserError
from alignpipe.data.describe import shown
from alignpipe.feedback.weights import weight_summary


def _numeric_stats(values) -> dict:
    import numpy as np

    arr = np.array([v for v in values if v is not None], dtype=float)
    stats = {"count": int(arr.size), "nulls": len(values) - int(arr.size)}
    if arr.size:
        stats.update(mean=float(arr.mean()), min=float(arr.min()), max=float(arr.max()),
                     nonfinite=int((~np.isfinite(arr)).sum()))
    return stats


def _length_stats(values) -> dict:
    import numpy as np

    lens = np.array([len(v) for v in values if v is not None])
    if not lens.size:
        return {"count": 0}
    p = np.percentile(lens, [0, 50, 90, 99, 100])
    return {"count": int(lens.size), "tokens_p0": int(p[0]), "tokens_p50": float(p[1]), "tokens_p90": float(p[2]),
            "tokens_p99": float(p[3]), "tokens_max": int(p[4]), "tokens_total": int(lens.sum())}


def summarise(ds, kind: str | None) -> dict:
    """Pure core: per-column statistics of a dataset."""
    from datasets import Value

    cols = {}
    for name, feat in ds.features.items():
        values = ds[name]
        if isinstance(feat, Value) and feat.dtype == "bool":
            vals = [v for v in values if v is not None]
            cols[name] = {"true": sum(vals), "false": len(vals) - sum(vals), "nulls": len(values) - len(vals)}
        elif isinstance(feat, Value) and feat.dtype.startswith(("float", "int")):
            cols[name] = _numeric_stats(values)
            if name.endswith("_weight"):
                cols[name].update(weight_summary(values))
        elif name.endswith("input_ids"):
            cols[name] = _length_stats(values)
        elif isinstance(feat, Value) and feat.dtype == "string" and name in ("finish_reason", "pairing", "split"):
            counts: dict = {}
            for v in values:
                counts[v] = counts.get(v, 0) + 1
            cols[name] = {"counts": counts}
    return cols


def _verdict(path: Path, ds, kind: str | None) -> str:
    from alignpipe import schemas
    from alignpipe.data.io import check_columns

    if kind is None:
        return "no alignpipe manifest: kind unknown (use `alignpipe import`)"
    if kind not in schemas.KINDS:
        return f"unknown kind '{kind}'"
    try:
        check_columns(ds, kind, str(path))
    except UserError as e:
        return f"INVALID: {e}"
    return "valid"


def _sample_columns(ds, kind: str | None) -> list[str]:
    skip = ("raw", "messages") + (("prompt",) if kind and kind.startswith("batches") else ())
    show = [c for c in ds.column_names if not c.endswith(("_ids", "_mask")) and c not in skip]
    return (["question"] if kind and kind.startswith("batches") else []) + show[:12]


def _sample_rows(ds, kind: str | None, rows: int) -> list[dict]:
    """The first rows; batches show the question (the last user turn of the rendered prompt), not the chat
    template's system prompt that the rendered text starts with."""
    from alignpipe.models.prompting import last_user_turn

    out = []
    for r in ds.select(range(min(rows, len(ds)))):
        if kind and kind.startswith("batches") and "prompt" in r:
            r = {"question": last_user_turn(r["prompt"]), **r}
        out.append(r)
    return out


def _print_table(info: dict, ds, rows: int) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    console.print(escape(f"{shown(info['path'])}  kind={info['kind']}  version={info['version']}  "
                         f"rows={info['num_rows']}  verdict={info['verdict']}"))
    t = Table("column", "statistics")
    for name, st in info["columns"].items():
        t.add_row(escape(name), escape(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={shown(v)}"
                                                 for k, v in st.items())))
    console.print(t)
    if rows and ds is not None and len(ds):
        show = _sample_columns(ds, info["kind"])
        width = max(len(c) for c in show)
        print(f"first {min(rows, len(ds))} rows:")
        for n, r in enumerate(_sample_rows(ds, info["kind"], rows)):
            print("\n".join(f"{f'[{n}]' if i == 0 else '':>4} {c:<{width}}  {shown(r[c], 100)}"
                            for i, c in enumerate(show)))


@handle_errors
def command(
    path: Annotated[Path, typer.Argument(help="A dataset, policy or run folder written by alignpipe.")],
    rows: Annotated[int, typer.Option(help="How many sample rows to show.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
):
    """Show kind, schema version, row count, per-column statistics, sample rows and validation verdict of a
    dataset; what a policy is and how it was trained; the stage outputs of a run folder."""
    from alignpipe.data.io import _load, kind_of
    from alignpipe.data.manifest import read_manifest

    manifest = read_manifest(path) or {}
    folder = path.is_dir() and not any((path / f).exists() for f in ("dataset_info.json", "state.json")) \
        and not _has_parts(path)
    if folder and manifest:
        return _model_folder(path, manifest, as_json)
    if folder and _run_folder(path, as_json):
        return
    if folder and any((path / f).is_file() for f in ("config.json", "adapter_config.json")):
        raise UserError(f"{path}: a model folder that alignpipe did not write (no manifest.json), not a dataset; "
                        f"use it as `generate --policy`, `train --policy` or `build-batches --tokenizer`")
    ds = _load(path)
    kind, version = kind_of(path)
    info = {"path": str(path), "kind": kind, "version": version, "num_rows": len(ds),
            "verdict": _verdict(path, ds, kind), "columns": summarise(ds, kind),
            "report": manifest.get("report", {})}
    if as_json:
        info["sample"] = [{k: v for k, v in r.items() if not k.endswith(("_ids", "_mask"))}
                          for r in _sample_rows(ds, kind, rows)]
        json.dump(info, sys.stdout, default=str)
        print()
    else:
        _print_table(info, ds, rows)
    if info["verdict"].startswith("INVALID"):
        raise typer.Exit(2)


def _has_parts(path: Path) -> bool:
    return any(path.glob("part-*-of-*"))


def _model_folder(path: Path, manifest: dict, as_json: bool) -> None:
    """A policy (or another output that is not a dataset): in words, or its manifest with --json."""
    from alignpipe.data.describe import output_summary

    if as_json:
        print(json.dumps({"path": str(path), "kind": manifest.get("stage"), "manifest": manifest}, indent=2,
                         default=str))
    else:
        print("\n".join(output_summary(path, manifest)))


def _run_folder(path: Path, as_json: bool) -> bool:
    """A folder of stage outputs (runs/NAME): what it is and what it holds; False when it holds none."""
    from alignpipe.data.describe import run_summary
    from alignpipe.data.lineage import outputs_below

    outputs = outputs_below(path)
    if not outputs:
        return False
    if as_json:
        print(json.dumps({"path": str(path), "kind": "run", "outputs": [
            {"path": str(path / rel), "stage": m.get("stage"), "kind": (m.get("schema") or {}).get("kind"),
             "num_rows": m.get("num_rows")} for rel, m in outputs]}, indent=2))
    else:
        print("\n".join(run_summary(path, outputs)))
    return True
