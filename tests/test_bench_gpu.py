"""`bench/bench_gpu.py --tiny`: the GPU benchmark end to end on tiny shapes on the CPU (CUDA hidden): the five
stages as processes, DPO against TRL on the batches build-batches wrote (stored and live reference, first-step
losses agreeing), generate against transformers' generate, MFU, and the two profiles."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

from alignpipe.testing import cpu_env

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gpu_tiny_runs_on_the_cpu(tmp_path):
    out = tmp_path / "gpu-tiny.jsonl"
    env = cpu_env(ALIGNPIPE_BENCH_DIR=tmp_path / "work", OMP_NUM_THREADS=1, PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "bench/bench_gpu.py", "--tiny", "--threads", "1", "--out", out], check=False, cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    kinds = [r["bench"] for r in records]
    assert kinds == ["gpu-stages", "gpu-train", "gpu-train", "gpu-generate", "meta"]
    stages = records[0]["stages"]
    assert [s["stage"] for s in stages] == ["import", "generate", "annotate", "reweight", "build-batches", "train"]
    assert all(s["seconds"] > 0 for s in stages) and records[0]["params"] > 0
    trl = importlib.util.find_spec("trl") is not None
    for r, ref in zip(records[1:3], ("stored", "live")):
        assert r["ref"] == ref and r["alignpipe"]["pairs/s"] > 0 and 0 < r["mfu"] < 1
        assert abs(r["alignpipe"]["loss"] - math.log(2)) < 1e-5  # policy = reference: log 2 at the first step
        if trl:
            assert r["valid"] is True and r["ratio"] > 0, r
        else:
            assert r["valid"] is None and "TRL not installed" in r["trl"]
    gen = records[3]["tok/s"]
    assert all(gen[k]["median"] > 0 for k in ("dynamic", "static", "transformers"))
    assert records[4]["device"] == "cpu" and records[4]["peak_flop/s"] > 0
    for what in ("training step", "decode step"):
        assert f"== profile of one {what} (cpu) ==" in done.stdout
    assert "DPO stored reference" in done.stdout and "generate 8 in flight" in done.stdout
