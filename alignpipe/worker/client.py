"""The stage command's side: hand the command to the worker named by ALIGNPIPE_WORKER, or run it here.

`forward(argv)` returns the command's exit code when the worker ran it, and None when the command should run
in this process as it always did: no variable, no worker answering on the socket, or a worker that cannot
run it faithfully (other code, other import-time variables; a note says so). A worker that dies during the
command: one line, exit 1 (finished shards are kept; a rerun resumes). Ctrl-C, SIGTERM and SIGHUP are passed
on to the stage; a stage killed by a signal kills this process with the same signal.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from alignpipe.core.command import say
from alignpipe.worker import protocol


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _stdio() -> tuple[int, int, int]:
    """fds 0-2, /dev/null in place of a closed one."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open(os.devnull, os.O_RDWR))
    return tuple(fds)


def forward(argv: list[str]) -> int | None:
    path = Path(os.environ[protocol.ENV])
    try:
        sock = protocol.connect(path)
    except OSError:
        return None  # no worker: run here
    with sock:
        msg = {"op": "run", "argv": list(argv), "cwd": os.getcwd(), "env": dict(os.environ), "umask": _umask(),
               "version": protocol.code_version(), "streams": protocol.stream_info()}
        try:
            protocol.send(sock, msg, fds=_stdio())
            first, _ = protocol.receive(sock)
        except (EOFError, OSError):
            return None
        if "refused" in first:
            say(f"note: not using the alignpipe worker at {path}: {first['refused']}; running without it")
            return None
        return _wait(sock, path)


def _wait(sock, path: Path) -> int:
    def pass_on(signum, _frame):
        try:
            protocol.send(sock, {"signal": int(signum)})
        except OSError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, pass_on)
    try:
        reply, _ = protocol.receive(sock)
    except (EOFError, OSError):
        say(f"error: the alignpipe worker at {path} stopped during the command; finished shards are kept, "
            f"rerun to resume")
        return 1
    code = int(reply["exit"])
    if code < 0:  # the stage died of a signal: so does this command
        sys.stdout.flush()
        if -code != signal.SIGKILL:
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


def run_in_worker(subcommand: str) -> int | None:
    """From the CLI's callback: the exit code of this process's command run by the worker, or None to run it
    here (also when argv is not this process's own command line, as under a test runner)."""
    from alignpipe.core.errors import UserError

    if subcommand not in sys.argv[1:]:
        return None
    try:
        return forward(sys.argv)
    except UserError as e:
        say(f"error: {e}")
        return 2
