"""lineage: the chain of manifests that made a dataset or policy folder, back to the prompts and base models.

    alignpipe lineage runs/demo/iter-1/policy            # readable chain, one block per stage output
    alignpipe lineage runs/demo/iter-1/policy --json     # the same as JSON (a list of nodes, target first)

Each node names its stage, the command line that reruns it (`cd CWD && alignpipe ...`), the resolved config,
its inputs with recorded fingerprints and whether they still match (ok | changed | missing | source), the row
count, the start time and the duration.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from alignpipe.core.command import handle_errors
from alignpipe.core.errors import UserError


@handle_errors
def command(path: Annotated[Path, typer.Argument(help="A dataset or policy folder written by alignpipe.")],
            as_json: Annotated[bool, typer.Option("--json", help="Print the chain as JSON.")] = False):
    """The chain of stages (commands, configs, input fingerprints, rows, durations) that made an output."""
    from alignpipe.data.lineage import lineage, to_json, to_text

    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    nodes = lineage(path)
    if not nodes:
        raise UserError(f"{path}: no manifest.json (not an output of an alignpipe stage)")
    typer.echo(json.dumps(to_json(nodes), indent=2, default=str) if as_json else to_text(nodes))
