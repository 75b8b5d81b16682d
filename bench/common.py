"""What every benchmark script shares: threads, timing, peak memory, spreads, workers, data and models.

Every case runs each side in its own fresh worker process (`python bench/SCRIPT.py --worker ...`), one
JSON line out, so peak RSS is that side's own and no side inherits the other's warm caches; the sides
alternate (alignpipe, peer, alignpipe, peer, ...) so that a change in machine load hits both alike.
"""
from __future__ import annotations

import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
WORK = Path(os.environ.get("ALIGNPIPE_BENCH_DIR", "/tmp/alignpipe-bench"))


def set_threads(n: int) -> None:
    """OMP/MKL threads for this process and its children, and torch's intra-op threads."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see README: spinning threads collapse under load
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def quiet() -> None:
    """No progress bars or advisory warnings from transformers / datasets in the timed processes."""
    import warnings

    import datasets
    from transformers.utils import logging

    warnings.filterwarnings("ignore")
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def spread(values: list[float], digits: int = 3) -> dict:
    """median, min and max of repeated measurements."""
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "n": len(values)}


def ratios(ours: list[float], theirs: list[float], higher_is_better: bool = True) -> dict:
    """Spread of per-repeat ratios ours/theirs (theirs/ours when lower is better), repeat i against i."""
    pairs = zip(ours, theirs)
    return spread([a / b if higher_is_better else b / a for a, b in pairs], 2)


def worker(script: str, args: list[str], threads: int, timeout: float = 1800) -> dict:
    """Run `bench/SCRIPT --worker ARGS` in a fresh process with `threads` threads; its last stdout line."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT),
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    cmd = [sys.executable, str(BENCH / script), "--worker", "--threads", str(threads), *args]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
        raise RuntimeError(f"{script} {' '.join(args)} failed (exit {done.returncode}):\n" + "\n".join(tail))
    return json.loads(lines[-1])


def alternate(sides: dict, repeats: int) -> dict:
    """{side: [result, ...]}: each side's callable run `repeats` times, the sides alternating."""
    results = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            results[name].append(fn())
    return results


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


class Stopwatch:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


# -------------------------------------------------------------------------------------------- models
def tiny_models() -> dict[str, Path]:
    """The tiny test tokenizer / policy / reward model, built once under WORK/tiny (deterministic)."""
    from alignpipe.testing import build_causal_lm, build_tiny_models

    out = WORK / "tiny"
    if not (out / "done").exists():
        build_tiny_models(out)
        build_causal_lm(out / "reference", out / "tokenizer", seed=1)  # a second policy: a real reference
        (out / "done").write_text("ok")
    return {"tokenizer": out / "tokenizer", "policy": out / "policy", "reward": out / "reward",
            "reference": out / "reference"}


def smollm2() -> Path:
    from alignpipe.models.smollm import smollm2_folder

    return smollm2_folder()


# ---------------------------------------------------------------------------------------------- data
def _words() -> list[str]:
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    return [w for w in text.split() if w.isascii() and w.isprintable()]


def prompts(n: int) -> list[dict]:
    """The first n shipped prompts (pipelines/data/prompts.jsonl), cycled when n is larger."""
    rows = [json.loads(line) for line in (ROOT / "pipelines/data/prompts.jsonl").read_text().splitlines()]
    return [{**rows[i % len(rows)], "prompt_id": f"{rows[i % len(rows)]['prompt_id']}-{i}"} for i in range(n)]


def preference_rows(n: int, words: tuple[int, int], seed: int = 0) -> list[dict]:
    """n (prompt, chosen, rejected) rows; answers are runs of `words` (min, max) words of Python's help."""
    rng, vocab = random.Random(seed), _words()

    def answer():
        k = rng.randint(*words)
        start = rng.randrange(len(vocab) - k)
        return " ".join(vocab[start: start + k])

    return [{"prompt_id": p["prompt_id"], "prompt": p["prompt"], "chosen": answer(), "rejected": answer()}
            for p in prompts(n)]


def cli(*args: str) -> None:
    """Run an alignpipe command in this process; raise with its output when it fails."""
    from typer.testing import CliRunner

    from alignpipe.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exit_code != 0:
        raise RuntimeError(f"alignpipe {' '.join(map(str, args))}: exit {result.exit_code}\n{result.output}")


def preference_batches(name: str, model: Path, *, pairs: int, words: tuple[int, int], batch_size: int,
                       max_length: int, reference: Path | None) -> Path:
    """`import` + `build-batches --task pairwise` (with cached reference log-probs when `reference`)."""
    out = WORK / "data" / name
    if (out / "batches" / "manifest.json").exists():
        return out / "batches"
    out.mkdir(parents=True, exist_ok=True)
    src = out / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(pairs, words)))
    cli("import", src, "--out", out / "annotations")
    ref = ["--reference", reference] if reference is not None else []
    cli("build-batches", out / "annotations", "--task", "pairwise", "--tokenizer", model, "--out",
        out / "batches", "--batch-size", batch_size, "--max-length", max_length, "--max-prompt-length",
        max_length // 2, *ref)
    return out / "batches"
