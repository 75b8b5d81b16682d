"""The fork server: imports once, keeps models, forks one child per command and computes nothing itself.

One thread and one selector loop: the listening socket, each running command's connection (a client's signal
or its disappearance) and each child's pidfd (its exit). Commands run side by side, each in its own child,
as separate processes would (outputs have their own locks); only the preloading of models before a fork is
serialised. The server keeps torch at one thread and never runs an operator on more, so that no OpenMP pool
exists when it forks; CUDA is never initialised here (a child moves its models to the GPU itself).

    python -m alignpipe.worker.server --socket PATH --idle-exit SECONDS --max-memory BYTES
"""
from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from alignpipe.worker import protocol
from alignpipe.worker.cache import ModelCache
from alignpipe.worker.preload import Profiles, stage_of

FORWARDED = {int(signal.SIGINT), int(signal.SIGTERM), int(signal.SIGHUP)}


@dataclass
class Job:
    pid: int
    conn: socket.socket
    pidfd: int
    report_fd: int
    argv: list
    started: float = field(default_factory=time.time)


def warm_imports() -> dict:
    """Import what the stages import, at one thread; the fresh-process state the children start from."""
    import importlib
    import pkgutil
    import warnings

    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"  # a CUDA check here asks NVML, never starts CUDA
    import torch

    torch.set_num_threads(1)
    fresh = {"torch_rng": torch.get_rng_state()}
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import transformers

    import alignpipe
    import alignpipe.stages

    for pkg in (alignpipe, alignpipe.stages):
        for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if ".worker" not in mod.name and not mod.name.endswith(("testing", "vllm_engine", "__main__")):
                with contextlib.suppress(Exception):  # an optional extra that is not installed
                    importlib.import_module(mod.name)
    for name in ("AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoTokenizer"):
        getattr(transformers, name)
    fresh["warnings"] = list(warnings.filters)
    return fresh


class Server:
    def __init__(self, path: Path, idle_exit: float, max_bytes: int):
        self.path, self.idle_exit = Path(path), idle_exit
        self.cache, self.profiles = ModelCache(max_bytes), Profiles()
        self.jobs: dict[int, Job] = {}
        self.sel = selectors.DefaultSelector()
        self.stopping, self.last_active, self.served = False, time.time(), 0
        self.started = time.time()
        self.version = protocol.code_version()
        self.import_env = protocol.import_time_env(dict(os.environ))
        self.fresh = warm_imports()
        self.log_file = self.path.parent / "worker.log"

    # ---------------------------------------------------------------------------------------------- loop
    def serve(self) -> None:
        protocol.make_private_folder(self.path)
        if self.path.exists():
            self.path.unlink()  # stale: `worker start` checked that nothing answers on it
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.path))
        os.chmod(self.path, 0o600)
        self.listener.listen(16)
        self.sel.register(self.listener, selectors.EVENT_READ, self.accept)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: self.stop())
        self.log(f"started pid {os.getpid()} version {self.version}")
        self.last_active = time.time()
        while not self.stopping or self.jobs:
            for key, _ in self.sel.select(timeout=1.0):
                key.data(key.fileobj)
            if not self.jobs and self.idle_exit and time.time() - self.last_active > self.idle_exit:
                self.log("idle: exiting")
                self.stop()
        self.log("stopped")

    def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.sel.unregister(self.listener)
        self.listener.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        for job in self.jobs.values():
            os.kill(job.pid, signal.SIGINT)  # the stage stops cleanly; finished shards are kept

    def log(self, line: str) -> None:
        """The worker's own log: events only (never a command line or an environment)."""
        with open(self.log_file, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")

    # ------------------------------------------------------------------------------------------ requests
    def accept(self, listener: socket.socket) -> None:
        conn, _ = listener.accept()
        uid = protocol.peer_uid(conn)
        if uid is not None and uid != os.getuid():
            self.log(f"refused a connection from uid {uid}")
            conn.close()
            return
        conn.settimeout(10)
        fds: list[int] = []
        try:
            msg, fds = protocol.receive(conn, max_fds=3)
            if msg.get("op") == "run":  # a status or ping does not keep an idle worker alive
                self.last_active = time.time()
            self.answer(conn, msg, fds)
        except (EOFError, OSError, ValueError, KeyError, TypeError) as e:
            self.log(f"bad request: {type(e).__name__}")
            for fd in fds:
                os.close(fd)
            conn.close()

    def answer(self, conn: socket.socket, msg: dict, fds: list[int]) -> None:
        op = msg.get("op")
        if op == "run" and not self.stopping:
            return self.start_job(conn, msg, fds)
        for fd in fds:
            os.close(fd)
        if op == "stop":
            protocol.send(conn, {"stopping": True, "pid": os.getpid()})
            self.stop()
        elif op in ("ping", "status"):
            protocol.send(conn, self.status() if op == "status" else {"pid": os.getpid(), "version": self.version})
        else:
            protocol.send(conn, {"refused": "the worker is stopping" if op == "run" else f"unknown op {op!r}"})
        conn.close()

    def refusal(self, msg: dict, fds: list[int]) -> str | None:
        if msg.get("version") != self.version:
            return f"it runs other alignpipe code ({self.version}; this command: {msg.get('version')})"
        theirs = protocol.import_time_env(msg["env"])
        differ = sorted(k for k in set(theirs) | set(self.import_env) if theirs.get(k) != self.import_env.get(k))
        if differ:
            return f"it was started with other values of {', '.join(differ[:4])} (read once, at import)"
        if len(fds) != 3:
            return "the command sent no stdin/stdout/stderr"
        return None

    def start_job(self, conn: socket.socket, msg: dict, fds: list[int]) -> None:
        why = self.refusal(msg, fds)
        if why:
            for fd in fds:
                os.close(fd)
            protocol.send(conn, {"refused": why})
            conn.close()
            return
        loads = [f"{cls.removeprefix('AutoModelFor')} {folder.parent.name}/{folder.name} {dtype}{' trainable' if trainable else ''}: "
                 f"{self.cache.load(cls, folder, dtype, trainable)}"
                 for cls, folder, dtype, trainable in self.profiles.plan(msg["argv"])]
        read_fd, write_fd = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        server = os.getpid()
        # signals wait until the child has its own handlers (the server's would stop the server from the child)
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        pid = os.fork()
        if pid == 0:
            from alignpipe.worker import child

            child.run(msg, fds, parent=server, report_fd=write_fd, close=self.server_fds() + [read_fd, conn.fileno()],
                      cache=self.cache, fresh=self.fresh, info={"pid": server, "socket": str(self.path)})
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
        os.close(write_fd)
        for fd in fds:
            os.close(fd)
        job = Job(pid, conn, os.pidfd_open(pid), read_fd, list(msg["argv"]))
        self.jobs[pid] = job
        self.sel.register(job.pidfd, selectors.EVENT_READ, lambda _fd, j=job: self.finished(j))
        self.sel.register(conn, selectors.EVENT_READ, lambda _c, j=job: self.from_client(j))
        self.log(f"run {stage_of(job.argv)} pid {pid}" + "".join(f"; {x}" for x in loads))
        try:
            protocol.send(conn, {"pid": pid})
        except OSError:
            os.kill(pid, signal.SIGKILL)

    def server_fds(self) -> list[int]:
        """The descriptors a child must not keep: the listener, every connection, pidfd and pipe, the selector."""
        fds = [self.listener.fileno(), self.sel.fileno()] if hasattr(self.sel, "fileno") else [self.listener.fileno()]
        for job in self.jobs.values():
            fds += [job.conn.fileno(), job.pidfd, job.report_fd]
        return fds

    def from_client(self, job: Job) -> None:
        try:
            msg, _ = protocol.receive(job.conn)
        except (EOFError, OSError, ValueError):
            self.sel.unregister(job.conn)  # the client is gone: so is its command
            self._kill(job.pid, signal.SIGKILL)
            return
        if int(msg.get("signal", 0)) in FORWARDED:
            self._kill(job.pid, int(msg["signal"]))

    @staticmethod
    def _kill(pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def finished(self, job: Job) -> None:
        import json

        _, status = os.waitpid(job.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        self.sel.unregister(job.pidfd)
        os.close(job.pidfd)
        with os.fdopen(job.report_fd, "rb") as f:
            raw = f.read()
        try:
            requests = json.loads(raw) if raw else []
            self.profiles.learn(job.argv, requests)
        except ValueError:
            requests = []
        try:
            protocol.send(job.conn, {"exit": code})
        except OSError:
            pass
        if job.conn.fileno() >= 0 and job.conn.fileno() in self.sel.get_map():
            self.sel.unregister(job.conn)
        job.conn.close()
        del self.jobs[job.pid]
        self.served += 1
        self.last_active = time.time()
        hits = sum(r["hit"] for r in requests)
        self.log(f"exit {stage_of(job.argv)} pid {job.pid} code {code} {time.time() - job.started:.2f}s "
                 f"models {hits}/{len(requests)} cached")

    def status(self) -> dict:
        import threading

        import torch

        return {"running": True, "pid": os.getpid(), "version": self.version, "socket": str(self.path),
                "cuda_initialised": torch.cuda.is_initialized(),
                "uptime_s": round(time.time() - self.started, 1), "commands_served": self.served,
                "commands_running": len(self.jobs), "idle_exit_s": self.idle_exit,
                "max_memory_bytes": self.cache.max_bytes, "cached_bytes": self.cache.total(),
                "models": self.cache.status(), "threads": threading.active_count()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="The alignpipe worker (start it with `alignpipe worker start`).")
    p.add_argument("--socket", required=True)
    p.add_argument("--idle-exit", type=float, default=0)
    p.add_argument("--max-memory", type=int, required=True)
    a = p.parse_args(argv)
    Server(Path(a.socket), a.idle_exit, a.max_memory).serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
