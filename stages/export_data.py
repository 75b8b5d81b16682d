"""export: write any alignpipe dataset to Parquet or JSONL for other tools (atomic: temp file, rename)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from alignpipe.core.command import handle_errors, say
from alignpipe.core.errors import UserError


@handle_errors
def command(
    path: Annotated[Path, typer.Argument(help="A dataset folder written by alignpipe.")],
    to: Annotated[Path, typer.Option("--to", help="Target file: .parquet or .jsonl.")],
):
    """Export a dataset to Parquet or JSONL."""
    from alignpipe.data.io import _load

    ds = _load(path)
    suffix = to.suffix.lower()
    if suffix not in (".parquet", ".jsonl"):
        raise UserError(f"--to {to}: unknown file type '{suffix}' (known: .parquet, .jsonl)")
    to.parent.mkdir(parents=True, exist_ok=True)
    tmp = to.with_name(f".{to.name}.tmp{os.getpid()}")
    try:
        if suffix == ".parquet":
            ds.to_parquet(str(tmp))
        else:
            ds.to_json(str(tmp), lines=True, force_ascii=False)
        os.replace(tmp, to)
    finally:
        tmp.unlink(missing_ok=True)
    say(f"export: {len(ds)} rows -> {to}")
