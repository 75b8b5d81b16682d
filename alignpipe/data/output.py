"""Atomic, locked, resumable stage outputs.

Layout beside the target OUT:
    .OUT.lock            flock-ed by the writer, text {pid, host, command}; a second writer refuses, naming it;
                         the lock of a dead writer is free again (the kernel released it).
    .OUT.partial/        shards of a long stage: shard-00000/ ... each renamed into place when whole,
                         plus key.json (config + input fingerprints). A rerun with the same key resumes;
                         a different key discards the partial work.
    .OUT.tmpPID/         the final folder being written; manifest.json is written last, then it is renamed
                         to OUT. So OUT appears whole or not at all.
A writer that takes the lock removes what dead writers left (.OUT.tmp*, .OUT.old*); an up-to-date check
removes the shards of a writer killed after its output was already in place.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

from alignpipe.core.errors import LockedError, UserError
from alignpipe.core.secrets import redact
from alignpipe.data.manifest import (
    MANIFEST,
    build_manifest,
    fingerprint_files,
    input_key,
    read_manifest,
    write_manifest,
)


class Lock:
    """The writer's exclusive lock on OUT: a kernel lock (flock) on `.OUT.lock`, whose text names the holder.

    The kernel drops the lock when its process dies, even by SIGKILL, so a stale lock file is simply locked
    again, and of many processes finding it at once exactly one gets it (there is no check-then-take race).
    A second writer refuses, naming the holder from the file's text.
    """

    def __init__(self, target: Path):
        self.path = target.parent / f".{target.name}.lock"
        self.target = target
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> None:
        import fcntl

        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": redact(" ".join(sys.argv))[:300],
              "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LockedError(f"{self.target}: {self._holder()}")
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, self.path):  # not a file its last holder unlinked while we opened it
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps(me).encode())
                self.fd = fd
                return
            os.close(fd)
        raise LockedError(f"{self.path}: could not take the lock")

    def _holder(self) -> str:
        try:
            h = json.loads(self.path.read_text())
            return f"locked by pid {h['pid']} on {h['host']} since {h.get('since')} ({h.get('command')})"
        except (OSError, ValueError, KeyError, TypeError):
            return f"locked by another process (see {self.path})"

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked: the next writer finds a fresh file
            os.close(self.fd)
            self.fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _shown(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "(none)"
    return "(unset)" if value is _UNSET else str(value)


_UNSET = object()


def changes(manifest: dict, key: dict, inputs: list[Path]) -> list[str]:
    """What differs between a finished output's manifest and a new run's key (`input_key`): each option
    changed as `--name OLD -> NEW`, then each input whose content changed."""
    old, new = manifest.get("key_config") or {}, key["config"]
    out = [f"--{k.replace('_', '-')} {_shown(old.get(k, _UNSET))} -> {_shown(new.get(k, _UNSET))}"
           for k in sorted(set(old) | set(new)) if old.get(k, _UNSET) != new.get(k, _UNSET)]
    before = manifest.get("key_inputs") or []
    out += [f"input {path} {'changed' if i < len(before) else 'added'}"
            for i, (path, fp) in enumerate(zip(inputs, key["inputs"])) if i >= len(before) or before[i] != fp]
    if len(before) > len(key["inputs"]):
        out.append(f"{len(before) - len(key['inputs'])} input(s) fewer")
    return out


def _newer_than_inputs(out: Path, inputs: list) -> None:
    """An up-to-date output whose input was rewritten with the same content (a retrained but identical policy:
    same fingerprint) gets a manifest newer than the input's again, so `make` does not run the stage again."""
    try:
        mine = (Path(out) / MANIFEST).stat().st_mtime_ns
        theirs = [(Path(p) / MANIFEST).stat().st_mtime_ns for p in inputs if (Path(p) / MANIFEST).is_file()]
        if theirs and max(theirs) > mine:
            os.utime(Path(out) / MANIFEST)
    except OSError:  # a read-only output stays as it is
        pass


class StageOutput:
    """One stage's output: up-to-date check, lock, shard checkpoints, atomic finish with a manifest."""

    def __init__(self, out: Path | str, *, stage: str, kind: str | None, config: dict, inputs: list[Path],
                 force: bool = False):
        self.out = Path(out)
        self.stage, self.kind, self.config, self.inputs, self.force = stage, kind, config, list(inputs), force
        self.key = input_key(config, self.inputs)
        self.partial = self.out.parent / f".{self.out.name}.partial"
        self.lock = Lock(self.out)
        self.started = time.time()
        self.report: dict = {}

    # -- up to date -------------------------------------------------------------------------------------
    def up_to_date(self) -> bool:
        if self.force:
            return False
        m = read_manifest(self.out)
        if not m or m.get("stage") != self.stage:
            return False
        same = {"config": m.get("key_config"), "inputs": m.get("key_inputs")} == self.key
        if same and self.partial.exists():
            self._sweep_finished_partial()
        if same:
            _newer_than_inputs(self.out, self.inputs)
        return same

    def _sweep_finished_partial(self) -> None:
        """Shards of this very output whose writer died after swapping it in: remove them, unless a writer
        is at work."""
        try:
            same_key = json.loads((self.partial / "key.json").read_text()) == self.key
            if same_key:
                self.lock.acquire()
        except (OSError, ValueError, UserError):
            return
        if same_key:
            shutil.rmtree(self.partial, ignore_errors=True)
            self.lock.release()

    def __enter__(self) -> StageOutput:
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"{self.out}: exists and is not a folder")
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
        except OSError as e:
            raise UserError(f"{self.out}: cannot write the output here ({e.strerror or e}); nothing was written")
        self._say_replacing()
        try:
            dead = re.compile(rf"\.{re.escape(self.out.name)}\.(tmp|old)\d+")
            for p in self.out.parent.glob(f".{self.out.name}.*"):
                if dead.fullmatch(p.name):  # left by killed writers (we hold the lock)
                    shutil.rmtree(p, ignore_errors=True)
            self._open_partial()
        except OSError as e:
            self.lock.release()
            raise UserError(f"{self.out}: cannot write the output here ({e.strerror or e}); nothing was written")
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.partial.is_dir() and {p.name for p in self.partial.iterdir()} <= {"key.json"}:
            shutil.rmtree(self.partial, ignore_errors=True)  # no finished work to resume from
        self.lock.release()

    def _say_replacing(self) -> None:
        """A finished output made otherwise is about to be replaced: say so, and what differs."""
        from alignpipe.core.command import say

        m = read_manifest(self.out)
        if m is None:
            return
        if m.get("stage") != self.stage:
            say(f"{self.stage}: replacing {self.out}, an output of `alignpipe {m.get('stage')}`")
            return
        diff = changes(m, self.key, self.inputs)
        if diff:
            more = f"; and {len(diff) - 4} more" if len(diff) > 4 else ""
            say(f"{self.stage}: replacing {self.out}, made with other settings: {'; '.join(diff[:4])}{more}")

    # -- shards -----------------------------------------------------------------------------------------
    def _open_partial(self) -> None:
        keyfile = self.partial / "key.json"
        if self.partial.exists():
            try:
                same = json.loads(keyfile.read_text()) == self.key and not self.force
            except (OSError, ValueError):
                same = False
            if not same:
                shutil.rmtree(self.partial)
        self.partial.mkdir(exist_ok=True)
        for junk in self.partial.glob("*.tmp*"):
            shutil.rmtree(junk, ignore_errors=True)
        if not keyfile.exists():
            keyfile.write_text(json.dumps(self.key, default=str))

    def _shard_dir(self, index: int) -> Path:
        return self.partial / f"shard-{index:05d}"

    def has_shard(self, index: int) -> bool:
        return (self._shard_dir(index) / "done").exists()

    def done_shards(self) -> list[int]:
        shards = self.partial.glob("shard-[0-9][0-9][0-9][0-9][0-9]")  # not the .tmp folders being written
        return sorted(int(p.name.split("-")[1]) for p in shards if (p / "done").exists())

    def write_shard(self, index: int, ds) -> None:
        """Save one finished shard atomically (a killed run resumes after the last whole shard)."""
        tmp = self.partial / f"shard-{index:05d}.tmp{os.getpid()}"
        try:
            ds.save_to_disk(str(tmp), num_shards=1 if len(ds) == 0 else None)  # 0 rows: still one data file
            (tmp / "done").write_text("")
            os.replace(tmp, self._shard_dir(index))
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"{self.out}: cannot write shard {index} ({e.strerror or e}); the finished shards are "
                            f"kept, rerun to resume")

    def read_shard(self, index: int):
        from datasets import load_from_disk

        return load_from_disk(str(self._shard_dir(index)))

    def read_shards(self):
        from datasets import concatenate_datasets

        parts = [self.read_shard(i) for i in self.done_shards()]
        return concatenate_datasets(parts) if parts else None

    # -- finish -----------------------------------------------------------------------------------------
    def finish(self, ds=None, *, write=None, num_rows: int | None = None) -> dict:
        """Write `ds` (conformed to the kind's schema) or call `write(folder)`; manifest last; rename into place."""
        from alignpipe.data.io import conform

        tmp = self.out.parent / f".{self.out.name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            if ds is not None:
                if self.kind:
                    ds = conform(ds, self.kind)
                ds.save_to_disk(str(tmp), num_proc=None, num_shards=1 if len(ds) == 0 else None)
                num_rows = len(ds)
            else:
                tmp.mkdir(parents=True)
                write(tmp)
            manifest = build_manifest(stage=self.stage, config=self.config, inputs=self.inputs, kind=self.kind,
                                      num_rows=num_rows, started=self.started, fingerprint_=fingerprint_files(tmp),
                                      report=self.report)
            manifest["key_config"], manifest["key_inputs"] = self.key["config"], self.key["inputs"]
            write_manifest(tmp, manifest)
            self._swap_in(tmp)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"{self.out}: cannot write the output ({e.strerror or e}); nothing was written")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(self.partial, ignore_errors=True)
        return manifest

    def _swap_in(self, tmp: Path) -> None:
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old{os.getpid()}"
            os.replace(self.out, old)
        os.replace(tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def map_shards(so: StageOutput, ds, fn, shard_size: int, desc: str):
    """Apply `fn(part, shard_index) -> Dataset` shard by shard, checkpointing each; resume skips done shards.

    Shard boundaries depend only on `shard_size`, so a resumed run computes exactly the shards an
    uninterrupted run would, and the concatenation is identical row for row.
    """
    from alignpipe.core.progress import progress_bar

    n = len(ds)
    num = max(1, -(-n // shard_size))
    todo = [i for i in range(num) if not so.has_shard(i)]
    if len(todo) < num:
        so.report["resumed_shards"] = num - len(todo)
    with progress_bar(desc, total=n, done=n - sum(min(shard_size, n - i * shard_size) for i in todo)) as bar:
        for i in todo:
            part = ds.select(range(i * shard_size, min(n, (i + 1) * shard_size)))
            result = fn(part, i)
            so.write_shard(i, result)
            bar.advance(len(part), result)
    return so.read_shards()


def part_path(out: Path, num_shards: int, shard_index: int) -> Path:
    """Where process `shard_index` of `num_shards` writes its part of a stage's output."""
    return Path(out) / f"part-{shard_index:05d}-of-{num_shards:05d}"


def process_shard(num_shards: int | None, shard_index: int | None) -> tuple[int, int]:
    """(num_shards, shard_index) from the flags, else from RANK/WORLD_SIZE, else (1, 0)."""
    if num_shards is None:
        num_shards = int(os.environ.get("WORLD_SIZE", "1"))
        shard_index = int(os.environ.get("RANK", "0")) if shard_index is None else shard_index
    shard_index = shard_index or 0
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise UserError(f"--shard-index {shard_index} must be in [0, {num_shards}) and --num-shards >= 1")
    return num_shards, shard_index
