"""The worker's socket and wire format, shared by the client and the server.

- The socket is a Unix stream socket in a folder that only its owner may enter (0700, owned by the user); the
  server also checks the peer's uid (SO_PEERCRED), the client the server's. Nothing listens on a network port.
- A message is a 4-byte big-endian length and a JSON object. The client's first message carries its stdin,
  stdout and stderr as file descriptors (SCM_RIGHTS), so the stage writes straight to the client's terminal
  or pipes: nothing is copied, and nothing the stage prints passes through the worker.
- `code_version()` names the code that runs: the package version and the size and time of every module; a
  worker started from other code (or another version) is not used.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import struct
import sys
from pathlib import Path

from alignpipe.core.errors import UserError
from alignpipe.core.secrets import secret_name

ENV = "ALIGNPIPE_WORKER"
MAX_MESSAGE = 16 << 20
# variables read once, when torch/transformers/datasets/huggingface_hub are imported: a call whose values
# differ from the worker's cannot run in it (the worker imported those libraries under its own values)
# (CUDA_VISIBLE_DEVICES is read when CUDA starts, in the child: it passes per call)
IMPORT_TIME_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DATASETS_", "TORCH", "PYTORCH_", "TOKENIZERS_",
                        "VLLM_")
IMPORT_TIME_NAMES = ("PYTHONHASHSEED", "PYTHONPATH")


def default_socket() -> Path:
    """$ALIGNPIPE_WORKER, else alignpipe/worker.sock under $XDG_RUNTIME_DIR or /tmp/alignpipe-UID."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "alignpipe" if runtime and Path(runtime).is_dir() else Path(f"/tmp/alignpipe-{os.getuid()}")
    return base / "worker.sock"


def private_folder_problem(folder: Path) -> str | None:
    """Why `folder` is not a folder that only this user can enter, or None when it is."""
    try:
        st = os.stat(folder, follow_symlinks=False)
    except FileNotFoundError:
        return "no such folder"
    if not stat.S_ISDIR(st.st_mode):
        return "not a folder"
    if st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}, not {os.getuid()}"
    if st.st_mode & 0o077:
        return f"mode {stat.S_IMODE(st.st_mode):04o} lets others in (needs 0700: chmod 700 {folder})"
    return None


def make_private_folder(sock_path: Path) -> None:
    """Create the socket's folder with mode 0700 (a one-line UserError when it exists and others may enter)."""
    folder = Path(sock_path).parent
    if len(os.fsencode(str(sock_path))) > 100:
        raise UserError(f"--socket {sock_path}: too long for a Unix socket (at most 100 bytes)")
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir(mode=0o700)
    problem = private_folder_problem(folder)
    if problem:
        raise UserError(f"--socket {sock_path}: its folder {folder} is {problem}")


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket (Linux SO_PEERCRED); None elsewhere."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return uid


def send(sock: socket.socket, obj: dict, fds: tuple = ()) -> None:
    body = json.dumps(obj).encode()
    head = struct.pack(">I", len(body))
    if fds:
        socket.send_fds(sock, [head], list(fds))
        sock.sendall(body)
    else:
        sock.sendall(head + body)


def _exact(sock: socket.socket, n: int, got: bytes = b"") -> bytes:
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            raise EOFError("connection closed")
        got += chunk
    return got


def receive(sock: socket.socket, max_fds: int = 0) -> tuple[dict, list[int]]:
    """One message and the file descriptors sent with it; EOFError when the other end closed."""
    if max_fds:
        head, fds, _flags, _addr = socket.recv_fds(sock, 4, max_fds)
        if not head:
            raise EOFError("connection closed")
    else:
        head, fds = sock.recv(4), []
        if not head:
            raise EOFError("connection closed")
    (n,) = struct.unpack(">I", _exact(sock, 4, head))
    if n > MAX_MESSAGE:
        raise EOFError(f"message of {n} bytes refused")
    return json.loads(_exact(sock, n)), list(fds)


def connect(path: Path, timeout: float | None = None) -> socket.socket:
    """A connection to the worker at `path` after checking its folder and its uid (OSError when none answers,
    UserError when the folder or the server is not this user's)."""
    problem = private_folder_problem(Path(path).parent)
    if problem and problem != "no such folder":
        raise UserError(f"{ENV}={path}: refusing the worker: its folder is {problem}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        raise
    uid = peer_uid(sock)
    if uid is not None and uid != os.getuid():
        sock.close()
        raise UserError(f"{ENV}={path}: refusing the worker: it runs as uid {uid}, not {os.getuid()}")
    return sock


def request(path: Path, obj: dict, timeout: float = 30.0) -> dict:
    """One control request (ping, status, stop) and its answer."""
    with connect(path, timeout) as sock:
        send(sock, obj)
        return receive(sock)[0]


def code_version() -> str:
    """The package version and a hash of the name, size and mtime of every module of the code that runs."""
    import alignpipe
    import alignpipe.schemas
    import alignpipe.stages

    h = hashlib.sha256(alignpipe.__version__.encode())
    roots = [Path(alignpipe.__file__).parent, *map(Path, alignpipe.stages.__path__),
             *map(Path, alignpipe.schemas.__path__)]
    for root in roots:
        for f in sorted(root.rglob("*.py")):
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return f"{alignpipe.__version__}+{h.hexdigest()[:12]}"


def import_time_env(env: dict) -> dict:
    """The variables of `env` that libraries read once at import (secrets left out: they are read per call)."""
    return {k: v for k, v in env.items()
            if (k.startswith(IMPORT_TIME_PREFIXES) or k in IMPORT_TIME_NAMES) and not secret_name(k)}


def stream_info() -> dict:
    """How this process's stdio text streams are set up (encoding, errors), to recreate them in the child."""
    return {name: {"encoding": getattr(s, "encoding", None) or "utf-8", "errors": getattr(s, "errors", None) or "strict"}
            for name, s in (("stdin", sys.stdin), ("stdout", sys.stdout), ("stderr", sys.stderr))}
