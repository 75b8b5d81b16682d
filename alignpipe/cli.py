"""The `alignpipe` command map. Stage modules import torch/transformers inside their commands only, so
`alignpipe --help` stays instant."""
from __future__ import annotations

import os
from typing import Annotated

import typer

from alignpipe.core.command import DEBUG

app = typer.Typer(
    name="alignpipe",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Online alignment as a loop of restartable stages exchanging fixed-schema datasets on disk.\n\n"
         "alignpipe STAGE INPUT... --out OUT [--config FILE.yaml] [--force] [options]",
)


@app.callback()
def main(ctx: typer.Context,
         debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False):
    """Online alignment as a loop of restartable stages exchanging fixed-schema datasets on disk."""
    DEBUG["on"] = debug or bool(os.environ.get("ALIGNPIPE_DEBUG"))
    if os.environ.get("ALIGNPIPE_WORKER") and ctx.invoked_subcommand not in (None, "worker"):
        from alignpipe.worker.client import run_in_worker  # the resident worker runs it when one answers

        code = run_in_worker(ctx.invoked_subcommand)
        if code is not None:
            raise typer.Exit(code)


@app.command("schema")
def schema_command(kind: Annotated[str, typer.Argument(help="Dataset kind, or 'all'.")] = "all"):
    """Print the fixed schema (columns, types, docs) of a dataset kind."""
    from alignpipe import schemas

    kinds = list(schemas.KINDS) if kind == "all" else [kind]
    for k in kinds:
        if k not in schemas.KINDS:
            typer.echo(f"error: unknown kind '{k}' (known: {', '.join(schemas.KINDS)})", err=True)
            raise typer.Exit(2)
        typer.echo(f"\n{k}  (schema {schemas.SCHEMA_VERSION}, written by `{schemas.producer(k)}`)")
        for c in schemas.columns(k):
            null = "?" if c.nullable else " "
            typer.echo(f"  {c.name:<28} {schemas.type_name(c.dtype) + null:<38} {c.doc}")


def _register() -> None:
    from alignpipe.stages import import_data, inspect_data

    app.command("import")(import_data.command)
    app.command("inspect")(inspect_data.command)
    app.command("worker")(__import__("alignpipe.worker.command", fromlist=["command"]).command)
    for name, module in _STAGES:
        app.command(name)(__import__(f"alignpipe.stages.{module}", fromlist=["command"]).command)


_STAGES = [("generate", "generate"), ("annotate", "annotate"), ("reweight", "reweight"),
           ("build-batches", "build_batches"), ("train", "train"), ("evaluate", "evaluate"),
           ("report", "report"), ("lineage", "lineage"), ("export", "export_data")]
_register()
