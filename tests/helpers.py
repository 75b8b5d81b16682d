"""Small shared builders for the reliability suites (faults, bad inputs, security, soak).

- `cli(...)` runs a command in-process through typer's CliRunner;
- `write_dataset(path, kind, rows)` writes a dataset of any kind as the stage that owns it would (schema,
  manifest), filling every column a row leaves out from the schema table;
- `row_hashes(path)` is the sha256 of each row's JSON: equal lists = the same rows in the same order;
- `leftovers(out)` lists what a writer leaves beside OUT (`.OUT.lock`, `.OUT.partial`, `.OUT.tmp*`, ...);
- `run_killed(args, fault)` runs a command in a child process that SIGKILLs itself at a fault point.

Fault points (the env variable ALIGNPIPE_TEST_FAULT of the child; `arm()` installs them before the CLI
runs, so production code holds no hook): `before:GLOB:N` kills just before, `after:GLOB:N` just after, the
N-th rename (os.replace / os.rename) whose target's name matches GLOB; a 4th field names another signal
(`after:shard-*:1:SIGSTOP` freezes a live writer). Every durable step of a stage is such
a rename: a finished shard (`shard-*`), a training checkpoint (`checkpoint-*`), the output's manifest
(`manifest.json`, the last file of the final write) and the output folder itself (OUT's name).
ALIGNPIPE_TEST_SET=`module:NAME=INT` sets a module constant in the child first (e.g. a shard size).
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
FAULT_ENV, SET_ENV = "ALIGNPIPE_TEST_FAULT", "ALIGNPIPE_TEST_SET"
_LAUNCH = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(TESTS)!r}]; import helpers; helpers.arm(); "
           "from alignpipe.cli import app; app(prog_name='alignpipe')")


# ------------------------------------------------------------------------------------------------ CLI
def cli(*args, env: dict | None = None):
    """Run `alignpipe ARGS` in-process; the Result has exit_code, output (stdout + stderr), stderr."""
    from typer.testing import CliRunner

    from alignpipe.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def ok(*args, env: dict | None = None):
    result = cli(*args, env=env)
    assert result.exit_code == 0, result.output
    return result


def child_env(**extra) -> dict:
    """The environment of a child `alignpipe` process: one thread (tiny models on shared cores), offline."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop(FAULT_ENV, None)
    env.pop(SET_ENV, None)
    return {**env, **{k: str(v) for k, v in extra.items()}}


def run_killed(args: list, fault: str, set_: str | None = None, timeout: float = 240):
    """Run `alignpipe ARGS` in a child that SIGKILLs itself at `fault`; assert that it was killed there."""
    env = child_env(**{FAULT_ENV: fault}, **({SET_ENV: set_} if set_ else {}))
    proc = subprocess.run([sys.executable, "-c", _LAUNCH, *map(str, args)], check=False, env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == -signal.SIGKILL, f"fault {fault} never fired (exit {proc.returncode}):\n" \
                                               f"{proc.stderr[-3000:]}"
    return proc


def start_child(args: list, fault: str, set_: str | None = None) -> subprocess.Popen:
    """Start `alignpipe ARGS` in a child with a fault point, without waiting."""
    env = child_env(**{FAULT_ENV: fault}, **({SET_ENV: set_} if set_ else {}))
    return subprocess.Popen([sys.executable, "-c", _LAUNCH, *map(str, args)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_child(args: list, set_: str | None = None, timeout: float = 240, **env):
    """Run `alignpipe ARGS` in a child process (no fault); returns the CompletedProcess."""
    env = child_env(**({SET_ENV: set_} if set_ else {}), **env)
    return subprocess.run([sys.executable, "-c", _LAUNCH, *map(str, args)], check=False, env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------ fault injection
def arm() -> None:
    """In a child process: apply ALIGNPIPE_TEST_SET and install the ALIGNPIPE_TEST_FAULT kill point."""
    import importlib

    if os.environ.get(SET_ENV):
        target, _, value = os.environ[SET_ENV].partition("=")
        module, _, name = target.partition(":")
        setattr(importlib.import_module(module), name, int(value))
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    when, pattern, nth, *sig = spec.split(":")
    signum = getattr(signal, sig[0]) if sig else signal.SIGKILL
    seen = [0]

    def wrap(real):
        def rename(src, dst, *a, **kw):
            hit = fnmatch.fnmatch(Path(os.fsdecode(dst)).name, pattern)
            if hit:
                seen[0] += 1
            fire = hit and seen[0] == int(nth)
            if fire and when == "before":
                os.kill(os.getpid(), signum)
            result = real(src, dst, *a, **kw)
            if fire and when == "after":
                os.kill(os.getpid(), signum)
            return result
        return rename

    os.replace, os.rename = wrap(os.replace), wrap(os.rename)


# --------------------------------------------------------------------------------------------- datasets
_FILL = {"string": "x", "int32": 0, "int64": 0, "float64": 0.0, "bool": True, "ids": [5, 6], "mask": [1, 1],
         "messages": [], "raw": []}


def full_row(kind: str, row: dict) -> dict:
    """`row` with every other column of `kind` filled: nullable columns None, the rest a plain value."""
    from alignpipe import schemas

    return {c.name: row[c.name] if c.name in row else (None if c.nullable else _FILL[c.dtype])
            for c in schemas.columns(kind)}


def write_dataset(path: Path, kind: str, rows: list[dict], *, stage: str = "test", version: str | None = None,
                  features=None) -> Path:
    """A dataset of `kind` with a manifest, as its stage writes it (`features` overrides the schema's)."""
    from datasets import Dataset

    from alignpipe import schemas
    from alignpipe.data.output import StageOutput

    full = [full_row(kind, r) for r in rows]
    feats = features or schemas.features(kind)
    ds = Dataset.from_dict({k: [r.get(k) for r in full] for k in feats}, features=feats)
    so = StageOutput(path, stage=stage, kind=kind, config={}, inputs=[], force=True)
    with so:
        if features is None:
            so.finish(ds)
        else:  # a mistyped dataset: write it as is, with the kind's manifest
            so.kind = None
            so.finish(ds)
            set_manifest(path, schema={"kind": kind, "version": "1.0"})
    if version:
        set_manifest(path, schema={"kind": kind, "version": version})
    return Path(path)


def set_manifest(path: Path, **fields) -> None:
    m = json.loads((Path(path) / "manifest.json").read_text())
    m.update(fields)
    (Path(path) / "manifest.json").write_text(json.dumps(m))


# ------------------------------------------------------------------------------- rows of every kind
def prompt(i: int = 0, **kw) -> dict:
    return {"prompt_id": f"p{i}", "prompt": f"Say something nice about number {i}.", "messages": [],
            "reference": None, "split": "train", **kw}


def generation(i: int, j: int, response: str, **kw) -> dict:
    return {**prompt(i), "sample_index": j, "response": response, "num_tokens": len(response.split()) + 1,
            "finish_reason": "eos", "behaviour_logp": -1.0 - j, "policy": "pol", "policy_fingerprint": "fp",
            "iteration": 0, "response_token_ids": None, "response_token_logps": None, **kw}


def pair(i: int = 0, **kw) -> dict:
    p = prompt(i)
    return {**{k: p[k] for k in ("prompt_id", "prompt", "messages")}, "iteration": 0,
            "response1": "A kind and good answer.", "response1_sample_index": 0, "response1_num_tokens": 6,
            "response1_behaviour_logp": -3.0, "response1_reward": 1.0,
            "response2": "Bad.", "response2_sample_index": 1, "response2_num_tokens": 2,
            "response2_behaviour_logp": -2.0, "response2_reward": 0.0, "preference": 0.8, "annotator": "test",
            "raw": [], "pairing": "all", "policy": "", "response1_token_ids": None, "response2_token_ids": None,
            "response1_token_logps": None, "response2_token_logps": None, "reference": None, **kw}


def weighted(i: int = 0, **kw) -> dict:
    return {**pair(i), "response1_weight": 1.0, "response2_weight": 1.0, **kw}


GENERATIONS = [generation(i, j, r) for i in range(2) for j, r in enumerate(["Nice!", "A longer answer here."])]


def write_jsonl(path: Path, rows: list) -> Path:
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Path(path)


def rows_of(path: Path) -> list[dict]:
    """The rows of a dataset folder written by alignpipe (parts concatenated)."""
    from alignpipe.data.io import _load

    return _load(Path(path)).to_list()


def row_hashes(path: Path) -> list[str]:
    """sha256 of each row's JSON (keys sorted), in order: equal lists = nothing lost, duplicated or changed."""
    return [hashlib.sha256(json.dumps(r, sort_keys=True, default=str).encode()).hexdigest()
            for r in rows_of(path)]


def manifest(path: Path) -> dict:
    return json.loads((Path(path) / "manifest.json").read_text())


def leftovers(out: Path) -> list[str]:
    """Names beside OUT that a writer of OUT leaves while working: lock, partial, tmp and old folders."""
    out = Path(out)
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))


def assert_clean_failure(result, out: Path, *needles: str, code: int = 2, allow: tuple = ()) -> str:
    """One error line naming the problem, the exit code, no traceback, no output, no tmp, lock released."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("error:", "internal error:", "Error:"))]
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    assert len(errors) == 1 and errors[0] == lines[-1], result.output
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert not Path(out).exists(), f"{out} exists after a failure"
    left = [n for n in leftovers(out) if n not in allow]
    assert left == [], left
    return errors[0]


def tree(root: Path) -> set[str]:
    """Every path under `root`, relative to it."""
    return {str(p.relative_to(root)) for p in Path(root).rglob("*")}


def text_files(*roots: Path):
    for root in roots:
        for p in Path(root).rglob("*"):
            if p.is_file():
                yield p


# ------------------------------------------------------------------------------------- an HTTP judge
class JudgeServer:
    """A local OpenAI-compatible /chat/completions endpoint that prefers the shorter answer (labels 1/2 of
    the built-in templates), misbehaving as `mode` says: good | garbage | badjson | 429-then-ok | 500 |
    slow | 401 | echo (replies, and names its status, with the Authorization header it received)."""

    def __init__(self):
        import threading
        from http.server import ThreadingHTTPServer

        self.mode, self.requests, self.auth, self.lock = "good", 0, set(), threading.Lock()
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.http.daemon_threads = True
        self.thread = threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.http.server_address[1]}/v1"

    def spec(self, *, key_env: str = "", **options) -> str:
        opts = {"model": "judge-1", "key_env": key_env, "backoff": 0.001, "retries": 1, "swap": "false",
                **options}
        return f"http:{self.base}," + ",".join(f"{k}={v}" for k, v in opts.items())

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


def _handler(judge: JudgeServer):
    import re
    import time
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            auth = self.headers.get("Authorization") or ""
            with judge.lock:
                judge.requests += 1
                judge.auth.add(auth)
                first = judge.requests == 1
            mode = judge.mode
            if mode == "slow":
                time.sleep(1.0)
            if mode in ("500", "401", "echo-status") or (mode == "429-then-ok" and first):
                code = {"500": 500, "401": 401, "echo-status": 401}.get(mode, 429)
                self.send_response(code, f"Unauthorized: {auth}" if mode == "echo-status" else None)
                self.send_header("Retry-After", "0")
                self.end_headers()
                return
            content = json.loads(body)["messages"][0]["content"]
            answers = re.findall(r"Response [12]: (.*)", content)
            verdict = "1" if len(answers) < 2 or len(answers[0]) <= len(answers[1]) else "2"
            text = {"garbage": f"I think response {verdict} is better.", "echo": f"bad key {auth}"}.get(mode, verdict)
            reply = b"not json{" if mode == "badjson" else json.dumps(
                {"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            try:
                self.wfile.write(reply)
            except (BrokenPipeError, ConnectionResetError):
                pass

    return Handler
