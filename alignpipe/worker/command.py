"""`alignpipe worker start|stop|status`: the resident worker's life cycle.

start: launch the fork server in the background (a new session, secrets left out of its environment) and wait
until it answers; a worker already answering with the same code is kept, one of other code is stopped and
replaced, and a stale socket (nothing listening) is removed. stop: the running commands are interrupted
(finished shards are kept) and the worker exits. status: a JSON object (models cached, bytes, commands).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from alignpipe.core.command import handle_errors, say
from alignpipe.core.errors import UserError
from alignpipe.core.secrets import secret_name
from alignpipe.worker import protocol

ACTIONS = ("start", "stop", "status")
START_TIMEOUT = 300.0


def default_max_memory() -> int:
    """A quarter of the machine's memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def ping(path: Path) -> dict | None:
    """The worker's {pid, version} when one answers at `path`; None when none does."""
    try:
        return protocol.request(path, {"op": "ping"}, timeout=10)
    except (OSError, EOFError, ValueError):
        return None


def stop(path: Path, timeout: float = 120.0) -> bool:
    """Ask the worker at `path` to stop and wait until it is gone; False when none was running."""
    try:
        protocol.request(path, {"op": "stop"}, timeout=10)
    except (OSError, EOFError, ValueError):
        return False
    deadline = time.time() + timeout
    while ping(path) is not None and time.time() < deadline:
        time.sleep(0.1)
    return True


def launch(path: Path, idle_exit: float, max_bytes: int) -> int:
    """Start the server process; its pid once it answers."""
    env = {k: v for k, v in os.environ.items() if not secret_name(k)}  # secrets come per call, never kept
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # no OpenMP pool in a process that forks
    env.pop(protocol.ENV, None)
    with open(path.parent / "worker.log", "a") as log:
        proc = subprocess.Popen([sys.executable, "-m", "alignpipe.worker.server", "--socket", str(path),
                                 "--idle-exit", str(idle_exit), "--max-memory", str(max_bytes)],
                                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.time() + START_TIMEOUT
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = (path.parent / "worker.log").read_text().strip().splitlines()[-1:] or ["no log"]
            raise UserError(f"worker: did not start (exit {proc.returncode}): {tail[0][:200]}")
        answer = ping(path)
        if answer and answer.get("pid") == proc.pid:
            return proc.pid
        time.sleep(0.1)
    proc.kill()
    raise UserError(f"worker: did not answer within {START_TIMEOUT:.0f} s (see {path.parent / 'worker.log'})")


def start(path: Path, idle_exit: float, max_bytes: int) -> None:
    if not hasattr(os, "pidfd_open"):
        raise UserError("worker: needs Linux 5.3 or later (os.pidfd_open); run the commands without it")
    protocol.make_private_folder(path)
    running = ping(path)
    if running and running.get("version") == protocol.code_version():
        say(f"worker: already running (pid {running['pid']}) at {path}")
        return
    if running:
        say(f"worker: replacing pid {running['pid']} (alignpipe {running.get('version')})")
        stop(path)
    elif path.exists() or path.is_symlink():
        path.unlink()  # stale: nothing listens on it
    pid = launch(path, idle_exit, max_bytes)
    say(f"worker: started (pid {pid}) at {path}; commands use it with {protocol.ENV}={path}")


@handle_errors
def command(
    action: Annotated[str, typer.Argument(help="start | stop | status")],
    socket_path: Annotated[Path | None, typer.Option("--socket", help="Unix socket (default: $ALIGNPIPE_WORKER, "
                                                     "else alignpipe/worker.sock in $XDG_RUNTIME_DIR or "
                                                     "/tmp/alignpipe-UID); its folder is made 0700.")] = None,
    idle_exit: Annotated[float, typer.Option("--idle-exit", min=0, help="Exit after this many seconds without a "
                                             "command (0: never).")] = 1800.0,
    max_memory: Annotated[str | None, typer.Option("--max-memory", help="Bytes of models kept (e.g. 4G); least "
                                                   "recently used evicted above it. Default: a quarter of RAM.")] = None,
):
    """Run a resident worker that keeps imports and models warm; with ALIGNPIPE_WORKER=SOCKET set, every
    `alignpipe STAGE ...` runs in it (same outputs), and runs as before when no worker answers."""
    from alignpipe.worker.cache import parse_size

    if action not in ACTIONS:
        raise UserError(f"worker: unknown action '{action}' (known: {', '.join(ACTIONS)})")
    path = Path(socket_path or protocol.default_socket()).absolute()
    if action == "start":
        start(path, idle_exit, parse_size(max_memory) if max_memory else default_max_memory())
    elif action == "stop":
        say(f"worker: stopped at {path}" if stop(path) else f"worker: none running at {path}")
    else:
        try:
            status = protocol.request(path, {"op": "status"}, timeout=10)
        except (OSError, EOFError, ValueError):
            status = {"running": False, "socket": str(path)}
        typer.echo(json.dumps(status, indent=2))
