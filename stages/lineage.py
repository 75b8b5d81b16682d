"""lineage: the chain of manifests that made a dataset or policy folder, back to the prompts and base models.

    alignpipe lineage runs/demo/iter-1/policy            # a tree: each output under the one it is an input of
    alignpipe lineage runs/demo/iter-1/policy --depth 2  # two levels of inputs
    alignpipe lineage runs/demo/iter-1/policy --json     # every node as JSON (a list of nodes, target first)

Each node names its stage, kind, row count, duration, start time and fingerprint, and the command line that
reruns it (`cd CWD && alignpipe ...`); the output asked about also its resolved config (every node's is in
--json). An output that feeds several others is written out once and named by reference after that; a
source (a prompt file, a base model) is a leaf with its recorded fingerprint and whether it still matches
(ok | changed | missing | source).
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
            as_json: Annotated[bool, typer.Option("--json", help="Print the chain as JSON.")] = False,
            depth: Annotated[int | None, typer.Option(
                "--depth", min=0, help="Show inputs at most N stages away (0: the output alone).")] = None):
    """The tree of stages (commands, configs, input fingerprints, rows, durations) that made an output."""
    from alignpipe.data.lineage import lineage, to_json, to_text

    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    nodes = lineage(path, max_depth=depth if as_json else None)
    if not nodes:
        raise UserError(f"{path}: no manifest.json (not an output of an alignpipe stage)")
    typer.echo(json.dumps(to_json(nodes), indent=2, default=str) if as_json else to_text(nodes, depth=depth))
