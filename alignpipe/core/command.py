"""What every command shares: --out, --config FILE.yaml, --force, error handling and the resolved config.

Convention: `alignpipe STAGE INPUT... --out OUT [--config FILE.yaml] [--force] [options]`.
A YAML config may hold any option of the command (keys = option names, '-' or '_'); flags given on the
command line override it; the resolved values go into the output's manifest.
Exit codes: 0 done or already up to date, 2 bad input or usage, 1 internal error.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer._click import exceptions as click_exc  # typer vendors its own click

from alignpipe.core.errors import UserError

DEBUG = {"on": bool(os.environ.get("ALIGNPIPE_DEBUG"))}
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _is_option(p) -> bool:
    return getattr(p, "param_type_name", "") == "option"


def _load_config(ctx: typer.Context, param, value):
    if value is None:
        return None
    import yaml

    path = Path(value)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise typer.BadParameter(f"{path}: no such file", param=param)
    except (OSError, yaml.YAMLError) as e:
        raise typer.BadParameter(f"{path}: not valid YAML ({(str(e).splitlines() or [''])[0]})", param=param)
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{path}: must be a mapping of option names to values", param=param)
    names = {p.name for p in ctx.command.params if _is_option(p)} - {"config"}
    options = {p.name: p for p in ctx.command.params if _is_option(p)}
    config = {}
    for key, val in data.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise typer.BadParameter(f"{path}: unknown key '{key}' (known: {', '.join(sorted(names))})", param=param)
        multiple = getattr(options[name], "multiple", False)
        if multiple != isinstance(val, list) or isinstance(val, dict):
            want = "a list" if multiple else "a single value"
            raise typer.BadParameter(f"{path}: key '{key}' must be {want}, found {val!r}", param=param)
        try:  # the type and range checks of the option itself, so that the error names the file and key
            options[name].process_value(ctx, val)
        except click_exc.BadParameter as e:
            raise typer.BadParameter(f"{path}: key '{key}': {e.message} (found {val!r})", param=param)
        config[name] = val
    ctx.default_map = {**(ctx.default_map or {}), **config}
    return path


ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", is_eager=True, callback=_load_config, help="YAML file of option values; flags override it.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the work even if the output is up to date.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder (written atomically).")]


def say(msg: str) -> None:
    """Status line on stderr (stdout stays clean for --json and pipes)."""
    print(msg, file=sys.stderr, flush=True)


def fail_line(e: BaseException) -> str:
    from alignpipe.core.secrets import redact

    return redact((str(e).splitlines() or [type(e).__name__])[0])


def handle_errors(fn):
    """Turn UserError into one line + exit 2 and anything unexpected into one line + exit 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, click_exc.ClickException):
            raise
        except UserError as e:
            if DEBUG["on"]:
                raise
            say(f"error: {fail_line(e)}")
            raise typer.Exit(e.exit_code)
        except KeyboardInterrupt:
            say("interrupted; finished shards are kept, rerun to resume")
            raise typer.Exit(130)
        except Exception as e:
            if DEBUG["on"]:
                raise
            say(f"internal error: {type(e).__name__}: {fail_line(e)} (rerun with --debug for the traceback)")
            raise typer.Exit(1)
    return wrapper


def resolved_config(ctx: typer.Context, drop=("force", "config", "out")) -> dict:
    """The command's option values after config file and flags, JSON-friendly (positional inputs excluded)."""
    options = {p.name for p in ctx.command.params if _is_option(p)}
    out = {}
    for k, v in ctx.params.items():
        if k in drop or k not in options:
            continue
        out[k] = str(v) if isinstance(v, Path) else ([str(x) for x in v] if isinstance(v, (list, tuple)) else v)
    return out


def up_to_date_line(stage: str, out: Path) -> str:
    return f"{stage}: {out} is up to date (same inputs and config); nothing to do. Use --force to redo it."


def up_to_date_message(stage: str, out: Path) -> None:
    say(up_to_date_line(stage, out))
