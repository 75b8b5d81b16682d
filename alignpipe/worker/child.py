"""One command in a forked child of the worker, set up as a fresh `alignpipe` process would be.

Reset for each call: the client's stdin/stdout/stderr (its own file descriptors), text streams recreated with
its encodings (line-buffered on a terminal), environment (secrets included, in memory only), working folder,
umask, argv, signal handlers, torch's thread count (the client's OMP_NUM_THREADS, else the CPUs it may use),
torch's default RNG (as torch starts), Python's and numpy's RNG (fresh entropy), warnings filters. The child
dies with the worker (PR_SET_PDEATHSIG), and reports what it asked of the model cache on a pipe.
"""
from __future__ import annotations

import io
import json
import os
import signal
import sys
import traceback

REPORT_LIMIT = 60_000  # bytes on the report pipe (below its buffer: the server reads after the exit)


def die_with_parent(parent: int) -> None:
    """SIGKILL this child when the worker dies (Linux); a child whose worker is already gone exits."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


def adopt_stdio(fds: list[int], streams: dict) -> None:
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)

    def text(fd: int, mode: str, info: dict, stderr: bool = False):
        raw = io.FileIO(fd, mode, closefd=False)
        tty = os.isatty(fd)
        buffered = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
        return io.TextIOWrapper(buffered, encoding=info["encoding"], errors=info["errors"],
                                line_buffering=(tty or stderr) and mode == "w")

    sys.stdin = sys.__stdin__ = text(0, "r", streams["stdin"])
    sys.stdout = sys.__stdout__ = text(1, "w", streams["stdout"])
    sys.stderr = sys.__stderr__ = text(2, "w", streams["stderr"], stderr=True)


def reset_signals() -> None:
    """A fresh process's handlers (the signals the server blocked around the fork stay blocked until the
    stage starts: `unblock_signals`)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)


def unblock_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


def adopt_environment(msg: dict) -> None:
    env = dict(msg["env"])
    env.pop("ALIGNPIPE_WORKER", None)  # the child runs the stage itself
    os.environ.clear()
    os.environ.update(env)
    os.chdir(msg["cwd"])
    os.umask(int(msg["umask"]))
    sys.argv = list(msg["argv"])


def thread_count(env: dict) -> int:
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        value = env.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def reset_numerics(env: dict, fresh: dict) -> None:
    """`fresh`: the server's torch RNG state and warnings filters right after its imports."""
    import random
    import warnings

    import torch

    torch.set_num_threads(thread_count(env))
    torch.set_rng_state(fresh["torch_rng"])
    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    warnings.filters[:] = fresh["warnings"]


def run_stage(argv: list[str]) -> int:
    """The command as `alignpipe ARGV...` runs it: its exit code (an uncaught exception: traceback, 1)."""
    from alignpipe.cli import app

    try:
        unblock_signals()  # a Ctrl-C that came during the set-up arrives here, inside the command
        app(args=list(argv[1:]), prog_name="alignpipe")
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside the command's own handling: as a shell reports it
        traceback.print_exc()
        return 130
    except BaseException:  # noqa: BLE001 -- as the interpreter reports an uncaught exception
        traceback.print_exc()
        return 1


def finish(code: int, report_fd: int, requests: list) -> None:
    import atexit

    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        try:
            os.write(report_fd, json.dumps(requests).encode()[:REPORT_LIMIT])
        except OSError:
            pass
        os._exit(code)


def run(msg: dict, fds: list[int], *, parent: int, report_fd: int, close: list[int], cache, fresh: dict,
        info: dict) -> None:
    """Never returns: runs the command of `msg` in this freshly forked child and exits with its code."""
    code = 1
    try:
        reset_signals()
        die_with_parent(parent)
        for fd in close:
            try:
                os.close(fd)
            except OSError:
                pass
        adopt_stdio(fds, msg["streams"])
        adopt_environment(msg)
        reset_numerics(msg["env"], fresh)
        from alignpipe.data import manifest
        from alignpipe.models import loading

        loading.RESIDENT[:] = [cache]
        manifest.WORKER.update({**info, "models": cache.requests})
        code = run_stage(msg["argv"])
    except BaseException:  # noqa: BLE001 -- the child must reach os._exit, never the server's loop
        traceback.print_exc()
    finally:
        finish(code, report_fd, cache.requests)
