"""What every command shares: --out, --config FILE.yaml, --force, error handling and the resolved config.

Convention: `alignpipe STAGE INPUT... --out OUT [--config FILE.yaml] [--force] [options]`.
A YAML config may hold any option of the command (keys = option names, '-' or '_'), or one section per
command for a whole loop (`generate:`, `annotate:`, `reweight:`, `build-batches:`, `train:`, `evaluate:` ...,
each a mapping of that command's options; a command reads its own section and may have none); flags given
on the command line override it; the resolved values go into the output's manifest.
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


def _read_yaml(path: Path, param) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise typer.BadParameter(f"{path}: no such file", param=param)
    except (OSError, yaml.YAMLError) as e:
        raise typer.BadParameter(f"{path}: not valid YAML ({(str(e).splitlines() or [''])[0]})", param=param)
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{path}: must be a mapping of option names to values", param=param)
    return data


def _option_names(command) -> set[str]:
    return {p.name for p in command.params if _is_option(p)} - {"config"}


def _stage_name(key) -> str:
    return str(key).replace("_", "-")


def _check_sections(path: Path, data: dict, commands: dict, param) -> None:
    for key, val in data.items():
        if not isinstance(val, dict):
            raise typer.BadParameter(f"{path}: '{key}' is an option value beside command sections; put it "
                                     f"under one of them (a section per command, e.g. 'train:')", param=param)
        if _stage_name(key) not in commands:
            raise typer.BadParameter(f"{path}: unknown section '{key}' (known: {', '.join(sorted(commands))})",
                                     param=param)
        names = _option_names(commands[_stage_name(key)])
        for k in val:
            if str(k).replace("-", "_") not in names:
                raise typer.BadParameter(f"{path}: section '{key}': unknown key '{k}' "
                                         f"(known: {', '.join(sorted(names))})", param=param)


def _section(ctx: typer.Context, path: Path, data: dict, param) -> dict:
    """The command's own part of the file: the file itself when flat, its section when sectioned (a file is
    sectioned when a top-level value is a mapping, which an option value never is, or an empty command
    section). Every section's keys are checked against its command, so that a typo in `train:` fails at the
    first stage of a loop, not at the last."""
    commands = getattr(ctx.find_root().command, "commands", None) or {ctx.command.name: ctx.command}
    data = {k: ({} if v is None and _stage_name(k) in commands else v) for k, v in data.items()}
    if not any(isinstance(v, dict) for v in data.values()):
        return data
    _check_sections(path, data, commands, param)
    own = [v for k, v in data.items() if _stage_name(k) == ctx.command.name]
    return own[0] if own else {}


def _load_config(ctx: typer.Context, param, value):
    if value is None:
        return None
    path = Path(value)
    data = _section(ctx, path, _read_yaml(path, param), param)
    names = _option_names(ctx.command)
    options = {p.name: p for p in ctx.command.params if _is_option(p)}
    config = {}
    for key, val in data.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise typer.BadParameter(f"{path}: unknown key '{key}' (known: {', '.join(sorted(names))})", param=param)
        multiple = getattr(options[name], "multiple", False)
        if multiple and not isinstance(val, (list, dict)):  # a repeatable option given once
            val = [val]
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
    "--config", is_eager=True, callback=_load_config,
    help="YAML file of option values, flat or one section per command (train: ...); flags override it.")]
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
        except BrokenPipeError:  # the reader of stdout stopped early (`alignpipe inspect ... | head`): fine
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            raise typer.Exit(0)
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
