"""Utilisation: achieved model FLOP/s of `alignpipe train` (DPO, SmolLM2-135M-Instruct, full fine-tuning)
against the measured peak of a large float32 matrix product on the same threads.

Model FLOPs of a step = 6 x parameters x real (unpadded) tokens, plus 2 x parameters x tokens with a live
reference (its forward). Parameters: every weight of the model file (tied embeddings counted once).
After every training step a probe times one 2048x2048 @ 2048x2048 float32 product (2 n^3 FLOPs) in the
same process; the probe's time is excluded from the step's, and each step's FLOP/s is divided by the
probe right after it, so a change in machine load hits both alike. Reported: median over the steady steps
of every repeat (min, max), and the per-repeat medians.

Note: the count is the usual model-FLOPs convention; alignpipe skips part of it (the output head at prompt
and padding positions, the shared prompt's second pass), which this count still credits.

    python bench/bench_flops.py [--quick] [--threads 2] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_train
import common

PROBE_N = 2048


def matmul_probe(n: int = PROBE_N):
    """A callable that times one n x n float32 product and records its FLOP/s in `.rates`."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up

    def probe():
        t = time.perf_counter()
        a @ b
        probe.rates.append(2 * n**3 / (time.perf_counter() - t))

    probe.rates = []
    return probe


def parameters(folder: str) -> int:
    import math

    from safetensors import safe_open

    total = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())  # noqa: SIM118 (safe_open has no __iter__)
    return total


def worker_main(a) -> None:
    common.set_threads(a.threads)
    import torch

    torch.set_num_threads(a.threads)
    common.quiet()
    probe = matmul_probe()
    result = bench_train.run_alignpipe(a, after=probe)
    times, P = result["times"], parameters(a.policy)
    factor = 6 + (2 if a.ref == "live" else 0)
    steps = []
    for k in range(a.warmup, len(times)):
        seconds = times[k][0] - times[k - 1][0]
        achieved = factor * P * times[k][2] / seconds
        steps.append({"flop/s": achieved, "peak": probe.rates[k], "mfu": achieved / probe.rates[k]})
    common.emit({"parameters": P, "steps": steps, "loss": result["loss"]})


def measure(name: str, case: dict, threads: int, repeats: int) -> dict:
    paths = bench_train.prepare_case(name, case)
    steps = -(-case["pairs"] // case["batch_size"])
    args = ["--model", case["model"], "--lora", "0", "--ref", case["ref"], "--steps", str(steps),
            "--warmup", str(case["warmup"]), "--batch-size", str(case["batch_size"]),
            "--max-length", str(case["max_length"]), "--policy", paths["policy"], "--reference",
            paths["reference"], "--batches", paths["batches"]]
    load = common.load_average()
    runs = [common.worker("bench_flops.py", args, threads) for _ in range(repeats)]
    every = [s for r in runs for s in r["steps"]]
    mfu = common.spread([s["mfu"] for s in every])
    return {"bench": "flops", "case": name, "threads": threads, "repeats": repeats, "load": load,
            "load_after": common.load_average(), "parameters": runs[0]["parameters"],
            "batch_size": case["batch_size"], "max_length": case["max_length"],
            "train_gflop/s": common.spread([s["flop/s"] / 1e9 for s in every], 1),
            "matmul_peak_gflop/s": common.spread([s["peak"] / 1e9 for s in every], 1),
            "mfu": mfu, "mfu_per_repeat": [round(statistics.median(s["mfu"] for s in r["steps"]), 3) for r in runs],
            "target": "model FLOP/s on real tokens >= 80% of the matmul peak", "met": mfu["median"] >= 0.8}


def cases(quick: bool) -> dict:
    base = {"model": "smollm2", "lora": 0, "words": (40, 90), "batch_size": 4, "max_length": 256,
            "pairs": 12 if quick else 16, "warmup": 1}
    table = {"smollm2-full-stored": {**base, "ref": "stored"}}
    if not quick:
        table["smollm2-full-live"] = {**base, "ref": "live"}
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for opt in ("model", "ref", "policy", "reference", "batches", "side"):
        p.add_argument(f"--{opt}", help=argparse.SUPPRESS)
    for opt in ("lora", "steps", "warmup", "batch-size", "max-length"):
        p.add_argument(f"--{opt}", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker_main(a)
        return 0
    common.set_threads(a.threads)
    repeats = a.repeats or (3 if a.quick else 5)
    for name, case in cases(a.quick).items():
        common.emit(measure(name, case, a.threads, repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
