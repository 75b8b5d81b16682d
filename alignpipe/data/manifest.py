"""Manifests and fingerprints: what every output (dataset or policy folder) says about how it was made."""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from alignpipe.core.secrets import redact, scrub_argv

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state"  # a policy folder's optimiser state (train --continue-from): not its content
NOT_CONTENT = (MANIFEST, "trackers.json")  # how a folder was made and where its run was logged, not what it is
def read_manifest(path: Path) -> dict | None:
    f = Path(path) / MANIFEST
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return None


WORKER: dict = {}  # set by the resident worker (alignpipe.worker) in the child that runs a command: manifests say so
_HASHES: dict = {}  # (folder, patterns, [(file, size, mtime)]) -> hash: a big model is hashed once per process


def fingerprint_files(path: Path, patterns=("*.arrow", "*.safetensors", "*.json", "*.bin", "*.model")) -> str:
    """A content hash of the data/weight files of a folder (sorted by relative name; manifest, trackers.json and
    a policy's trainer_state/ excluded; JSON files in canonical form, `canonical_json`): the same content, the
    same hash."""
    path = Path(path)
    files = sorted({f for p in patterns for f in path.rglob(p) if f.name not in NOT_CONTENT and f.is_file()
                    and TRAINER_STATE not in f.relative_to(path).parts[:-1]})
    stats = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    key = (str(path.resolve()), patterns, stats)
    if key not in _HASHES:
        _HASHES[key] = _hash_files(path, files)
    return _HASHES[key]


def canonical_json(text: bytes, name: str = "") -> bytes | None:
    """A JSON file's canonical bytes: keys sorted, no whitespace, and PEFT's `target_modules` (a set that
    adapter_config.json lists in a per-process order) sorted; None when it is not JSON."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if name == "adapter_config.json" and isinstance(data, dict) and isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _hash_files(path: Path, files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path)).encode())
        if f.suffix == ".json":
            raw = f.read_bytes()
            h.update(canonical_json(raw, f.name) or raw)
            continue
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def fingerprint(path: Path) -> str:
    """The fingerprint of an input: its manifest's when alignpipe wrote it, else a content hash."""
    m = read_manifest(path)
    if m and m.get("fingerprint"):
        return m["fingerprint"]
    from alignpipe.data.hub import hub_commit  # a Hub id (org/name[@rev]) or a snapshot folder: its commit

    commit = hub_commit(path)
    if commit:
        return commit
    p = Path(path)
    if p.is_file():
        return hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    return fingerprint_files(p)


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5, check=False)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def command_argv(argv: list[str] | None = None) -> list[str]:
    """The command line that reruns this process, as argv: `alignpipe STAGE ...` when it runs alignpipe (as
    the console script or `python -m alignpipe`), else the raw argv; secrets scrubbed."""
    argv = list(sys.argv if argv is None else argv)
    prog = Path(argv[0]).name if argv else ""
    if prog == "alignpipe" or (prog == "__main__.py" and Path(argv[0]).parent.name == "alignpipe") \
            or prog == "-c" or "alignpipe" in argv[0]:
        argv = ["alignpipe"] + argv[1:]
    return scrub_argv(argv)


def build_manifest(*, stage: str, config: dict, inputs: list[Path], kind: str | None, num_rows: int | None,
                   started: float, fingerprint_: str, report: dict | None = None) -> dict:
    from alignpipe import __version__
    from alignpipe.schemas import SCHEMA_VERSION

    return redact({
        "stage": stage,
        "command": shlex.join(command_argv()),  # rerun it from `cwd`
        "argv": command_argv(),
        "cwd": os.getcwd(),
        "config": config,
        "inputs": [{"path": str(p), "fingerprint": fingerprint(p)} for p in inputs],
        "schema": {"kind": kind, "version": SCHEMA_VERSION} if kind else None,
        "package_version": __version__,
        "git_revision": git_revision(),
        "num_rows": num_rows,
        "seed": config.get("seed"),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - started, 3),
        "fingerprint": fingerprint_,
        "report": report or {},
        **({"worker": WORKER} if WORKER else {}),
    })


def write_manifest(folder: Path, manifest: dict) -> None:
    tmp = Path(folder) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    os.replace(tmp, Path(folder) / MANIFEST)


def input_key(config: dict, inputs: list[Path]) -> dict:
    """What decides whether an output is up to date: the resolved config and the inputs' fingerprints."""
    return {"config": redact(json.loads(json.dumps(config, default=str))),
            "inputs": [fingerprint(p) for p in inputs]}
