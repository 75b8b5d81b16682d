"""core: what every layer shares. Errors (`UserError`: one line, exit 2), the component registry and its grammar
`NAME[:ARG][,key=value...]`, secrets scrubbing, progress bars, lazy torch, and the options every stage
command shares (`--out`, `--config`, `--force`, error handling).

May import: the standard library, typer/rich, and `alignpipe.schemas`. Nothing else of alignpipe.
"""
