"""Hub ids: `org/name[@revision]` as a snapshot folder of huggingface_hub's cache, and that cache filled locally.

Models go through `alignpipe.models.loading.local_folder`, the one place a model name becomes a folder: a local path
that exists always wins; else a Hub id is looked up in the cache (`HF_HUB_CACHE`, else `$HF_HOME/hub`) with
`snapshot_download(local_files_only=True)` when `HF_HUB_OFFLINE=1`, and downloaded otherwise, fetching config,
tokenizer and safetensors files only (pickle weights with `--allow-pickle`, Python files with
`--trust-remote-code`). A snapshot folder is named by its commit, which is the model's fingerprint.

`put` writes a local folder into the cache in the hub's own layout (models--org--name/{refs/main,
snapshots/<commit>/..., blobs/<sha256>}), so a converted model (SmolLM2) or a test's tiny model is
addressed by its Hub id offline.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
SAFE_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "tokenizer*", "*.md")
_PREFIX = {"model": "models", "dataset": "datasets"}


class HubMiss(Exception):
    """Why a Hub id could not be resolved (one line, completes '<what> <id>: not a folder, and ...')."""


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def cache_dir() -> Path:
    """huggingface_hub's cache folder, read from the environment at call time."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def split_id(name: str) -> tuple[str, str | None] | None:
    """('org/name', revision or None) when `name` reads as a Hub id `[org/]name[@revision]`, else None."""
    repo_id, at, revision = str(name).partition("@")
    if not _REPO_ID.match(repo_id) or ".." in repo_id or (at and not revision):
        return None
    return repo_id, revision or None


def snapshot(name: str, repo_type: str = "model", allow_pickle: bool = False, remote_code: bool = False) -> Path:
    """The snapshot folder of Hub id `name` (downloaded first when online); HubMiss when there is none."""
    return _snapshot(str(name), repo_type, allow_pickle, remote_code, str(cache_dir()), offline())


@functools.lru_cache(maxsize=64)  # one look-up (or download) per process and cache
def _snapshot(name: str, repo_type: str, allow_pickle: bool, remote_code: bool, cache: str, local_only: bool):
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, revision = split_id(name)
    where = Path(cache)
    patterns = list(SAFE_PATTERNS) + ["*.bin"] * allow_pickle + ["*.py"] * remote_code
    if repo_type == "dataset":
        patterns += ["*.parquet", "*.jsonl", "*.csv", "*.arrow", "*.json.gz", "*.jsonl.gz", "*.tsv"]
    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, cache_dir=where,
                                      local_files_only=local_only, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        rev = f" at revision {revision}" if revision else ""
        net = "; the network is off (HF_HUB_OFFLINE=1)" if local_only else "; the Hub could not be reached"
        raise HubMiss(f"not in the Hub cache{rev} ({where}){net}") from None
    except RevisionNotFoundError:
        raise HubMiss(f"the Hub {repo_type} {repo_id} has no revision {revision}") from None
    except RepositoryNotFoundError:
        raise HubMiss(f"not a {repo_type} on the Hub (or a gated/private one: set HF_TOKEN)") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise HubMiss(f"not fetched from the Hub ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def snapshot_info(folder: Path | str) -> tuple[str, str] | None:
    """(repo id, commit) when `folder` is a snapshot folder of the hub cache, else None."""
    p = Path(folder)
    repo = p.parent.parent.name
    if p.parent.name != "snapshots" or not _COMMIT.match(p.name) or "--" not in repo:
        return None
    kind, _, rest = repo.partition("--")
    return (rest.replace("--", "/"), p.name) if kind in _PREFIX.values() else None


def hub_commit(name: Path | str) -> str | None:
    """The resolved commit when `name` is a Hub id in the cache or a snapshot folder of it; None otherwise."""
    p = Path(name)
    if not p.exists() and split_id(str(name)) is not None:
        try:
            p = snapshot(str(name))
        except HubMiss:
            return None
    info = snapshot_info(p)
    return info[1] if info else None


def put(folder: Path | str, repo_id: str, *, cache: Path | str | None = None, revision: str = "main",
        repo_type: str = "model", link: bool = False) -> Path:
    """Copy (or hard-link, `link`) the files of `folder` into the cache as `repo_id`: content-addressed blobs, a
    snapshot named by a commit derived from the content, refs/<revision> written last. Returns the snapshot."""
    src = Path(folder)
    files = sorted(f for f in src.rglob("*") if f.is_file() and not f.name.startswith("."))
    repo = Path(cache or cache_dir()) / f"{_PREFIX[repo_type]}--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    hashes = {f: _sha256(f) for f in files}
    commit = hashlib.sha1("".join(f"{f.relative_to(src)}\0{h}\n" for f, h in hashes.items()).encode()).hexdigest()
    for f, h in hashes.items():
        blob = repo / "blobs" / h
        if not blob.exists():
            tmp = blob.with_name(f".{h}.tmp-{os.getpid()}")
            try:
                os.link(f, tmp) if link else shutil.copyfile(f, tmp)
            except OSError:  # another file system: a copy
                shutil.copyfile(f, tmp)
            os.replace(tmp, blob)
    snap = repo / "snapshots" / commit
    if not snap.is_dir():
        snap.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{commit}.tmp-", dir=snap.parent))
        tmp.chmod(0o755)  # mkdtemp's 0700: a cache is readable by all
        for f, h in hashes.items():
            link = tmp / f.relative_to(src)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(repo / "blobs" / h, link.parent))
        try:
            os.replace(tmp, snap)
        except OSError:  # another process put the same content first
            shutil.rmtree(tmp, ignore_errors=True)
    ref = repo / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp_ref = ref.with_name(f".{revision}.tmp-{os.getpid()}")
    tmp_ref.write_text(commit)
    os.replace(tmp_ref, ref)
    _snapshot.cache_clear()
    return snap


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
