"""Stage overhead: validate, write and manifest 100,000 rows through the stage I/O; `alignpipe --help` start-up.

For each kind (prompts, weighted with one annotator's raw record per row, batches-pairwise with token ids),
a dataset of --rows rows is built in memory (not timed), then timed through the foundation every stage uses:
  write     StageOutput.finish: conform to the schema, save_to_disk, fingerprint, manifest, atomic rename
  validate  alignpipe.data.io.read_input: load, kind, version and column types
  check     StageOutput.up_to_date on the finished output (what a rerun pays before doing nothing)
Start-up: wall time of `alignpipe --help` in a fresh process (console script of the venv).

    python bench/bench_overhead.py [--quick] [--rows 100000] [--repeats 5]
"""
from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common


def _text(rng: random.Random, words: list[str], n: int) -> str:
    start = rng.randrange(len(words) - n)
    return " ".join(words[start: start + n])


def rows_of(kind: str, n: int) -> dict[str, list]:
    """Columns of n plausible rows of `kind` (every schema column present)."""
    from alignpipe import schemas

    rng, words = random.Random(0), common._words()
    cols: dict[str, list] = {}
    for c in schemas.columns(kind):
        if c.dtype == "string":
            cols[c.name] = [_text(rng, words, 40 if c.name.startswith(("prompt", "response")) else 2)
                            for _ in range(n)]
        elif c.dtype in ("int32", "int64"):
            cols[c.name] = [rng.randrange(64) for _ in range(n)]
        elif c.dtype == "float64":
            cols[c.name] = [rng.random() for _ in range(n)]
        elif c.dtype == "bool":
            cols[c.name] = [rng.random() < 0.5 for _ in range(n)]
        elif c.dtype in ("ids", "mask"):
            size = 48 if c.name.startswith("prompt") else 96
            cols[c.name] = [[1 if c.dtype == "mask" else rng.randrange(1024) for _ in range(size)] for _ in range(n)]
        elif c.dtype == "messages":
            cols[c.name] = [[] for _ in range(n)]
        elif c.dtype == "raw":
            cols[c.name] = [[{"name": "reward-model", "score1": rng.random(), "score2": rng.random(),
                              "preference": 0.5, "preference_12": 0.5, "preference_21": 0.5, "abstained": False,
                              "reason": ""}] for _ in range(n)]
    if "batch_index" in cols:
        cols["batch_index"] = [i // 8 for i in range(n)]
    return cols


def time_kind(kind: str, n: int, repeats: int) -> dict:
    from datasets import Dataset

    from alignpipe import schemas
    from alignpipe.data.io import read_input
    from alignpipe.data.output import StageOutput

    ds = Dataset.from_dict(rows_of(kind, n), features=schemas.features(kind))
    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    runs: dict[str, list] = {"write": [], "validate": [], "check": []}
    config = {"bench": kind}
    for i in range(repeats):
        out = work / f"out{i}"
        so = StageOutput(out, stage="bench", kind=kind, config=config, inputs=[])
        t0 = time.perf_counter()
        with so:
            so.finish(ds)
        t1 = time.perf_counter()
        read_input(out, kind, stage="bench")
        t2 = time.perf_counter()
        StageOutput(out, stage="bench", kind=kind, config=config, inputs=[]).up_to_date()
        t3 = time.perf_counter()
        runs["write"].append(t1 - t0)
        runs["validate"].append(t2 - t1)
        runs["check"].append(t3 - t2)
        shutil.rmtree(out)
    shutil.rmtree(work, ignore_errors=True)
    total = [w + v for w, v in zip(runs["write"], runs["validate"])]
    per100k = [t * 100_000 / n for t in total]
    return {"bench": "overhead", "case": f"stage-io-{kind}", "rows": n, "repeats": repeats,
            "load": common.load_average(), **{f"{k}_s": common.spread(v) for k, v in runs.items()},
            "write+validate_s": common.spread(total), "s_per_100k_rows": common.spread(per100k),
            "target": "write + validate + manifest < 2 s per 100,000 rows",
            "met": common.spread(per100k)["median"] < 2.0}


def time_help(repeats: int) -> dict:
    exe = Path(sys.executable).parent / "alignpipe"
    cmd = [str(exe), "--help"] if exe.exists() else [sys.executable, "-m", "alignpipe", "--help"]
    subprocess.run(cmd, capture_output=True, check=True)  # warm the file cache
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - t)
    s = common.spread(times)
    return {"bench": "overhead", "case": "startup-help", "repeats": repeats, "load": common.load_average(),
            "seconds": s, "target": "alignpipe --help < 1 s", "met": s["median"] < 1.0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one kind (weighted), 3 repeats")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=None)
    a = p.parse_args(argv)
    common.set_threads(a.threads)
    common.quiet()
    repeats = a.repeats or (3 if a.quick else 5)
    common.emit(time_help(repeats))
    for kind in (["weighted"] if a.quick else ["prompts", "weighted", "batches-pairwise"]):
        common.emit(time_kind(kind, a.rows, repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
