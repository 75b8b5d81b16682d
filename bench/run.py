"""The benchmark suite: runs every case script, collects their JSON lines, prints a table of ratios with
median [min, max], and writes bench/results/latest.jsonl (the full run), quick.jsonl (--quick) or
only-NAMES.jsonl (--only), so a partial run never overwrites the full one.

    python bench/run.py [--quick] [--threads 2] [--only train,overhead,...]

--quick (< 5 minutes on 2 cores): DPO training on the tiny model (stored and live reference), a short
SmolLM2 LoRA case, and the stage overhead. The full run (every case, 5 repeats) takes about 80 minutes on
2 cores; see bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common

SCRIPTS = {  # name -> (script, in --quick)
    "overhead": ("bench_overhead.py", True),
    "train": ("bench_train.py", True),
    "loop": ("bench_loop.py", False),
    "flops": ("bench_flops.py", False),
    "annotate": ("bench_annotate.py", False),
    "generate": ("bench_generate.py", False),
    "grpo": ("bench_grpo.py", False),  # two SmolLM2 processes, 3-6 minutes
    "continuity": ("bench_continuity.py", False),
    "rl-loop": ("bench_rl_loop.py", False),  # 3 RL iterations: stages sequential / OFF_POLICY=1 vs GRPOTrainer  # TRL 3 GRPO steps vs 3 continued trains, SmolLM2, 3-6 minutes
}


def run_script(script: str, quick: bool, threads: int) -> list[dict]:
    args = [sys.executable, str(HERE / script), "--threads", str(threads)] + (["--quick"] if quick else [])
    if script == "bench_generate.py":
        args += ["--repeats", "3"]
    env = {**os.environ, "PYTHONPATH": str(common.ROOT)}
    done = subprocess.run(args, check=False, capture_output=True, text=True, env=env)
    records = [json.loads(ln) for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-8:]
        records.append({"bench": script, "case": "FAILED", "error": " | ".join(tail)})
    for r in records:
        r.setdefault("bench", script.removeprefix("bench_").removesuffix(".py"))
    return records


def _s(d: dict, digits: int = 2) -> str:
    return f"{d['median']:.{digits}f} [{d['min']:.{digits}f}, {d['max']:.{digits}f}]"


def row(r: dict) -> tuple[str, str, str, str]:
    """(case, measure, alignpipe vs peer ratio, target) for the table."""
    b, case = r.get("bench"), f"{r.get('bench')}/{r.get('case')}"
    if "error" in r:
        return case, "FAILED", r["error"][:60], ""
    if b == "train":
        ratio = _s(r["ratio"]) if r["valid"] else "VOID (first-step loss differs)"
        measure = f"pairs/s {_s(r['pairs/s']['alignpipe'], 1)} vs {_s(r['pairs/s']['trl'], 1)}; RSS x{_s(r['rss_ratio'])}"
        return case, measure, ratio, r["target"]
    if b == "grpo":
        ratio = _s(r["ratio"]) if r["valid"] else "VOID (first-step loss or gradient differs)"
        p = r["prompts/s"]
        return case, (f"prompts/s {_s(p['alignpipe'], 3)} vs {_s(p['trl'], 3)}; loss diff {r['loss_diff']:.1e}, "
                      f"grad-norm rel diff {r['grad_norm_rel_diff']:.1e}"), ratio, r.get("target", "")
    if b == "rl_loop":
        p = r["prompts/s"]
        return case, (f"prompts/s {_s(p['alignpipe'], 3)} vs {_s(p['trl'], 3)}; vs sequential "
                      f"{_s(r['vs_sequential'])}"), _s(r["ratio"]), r["target"]
    if b == "continuity":
        verdict = "VALID" if r["valid"] else "VOID (a step's loss, gradient norm or the final LoRA differs)"
        return case, (f"{r['steps']} steps: max loss diff {max(r['loss_abs_diff']):.1e}, grad-norm rel diff "
                      f"{max(r['grad_norm_rel_diff']):.1e}, LoRA rel diff {r['lora_weights_rel_diff']:.1e}"), \
            verdict, r["target"]
    if b == "flops":
        return case, f"{_s(r['train_gflop/s'], 0)} of {_s(r['matmul_peak_gflop/s'], 0)} GFLOP/s", \
            f"MFU {_s(r['mfu'])}", r["target"]
    if b == "overhead":
        if "seconds" in r:
            return case, f"{_s(r['seconds'], 3)} s", "", r["target"]
        return case, f"{_s(r['s_per_100k_rows'], 3)} s per 100k rows", "", r["target"]
    if b == "loop":
        p = r["prompts/s"]
        measure = (f"prompts/s {_s(p['alignpipe'])} vs {_s(p['trl'])}; one process {_s(p['alignpipe_one_process'])}"
                   f" (x{_s(r['ratio_one_process'])})")
        return case, measure, _s(r["ratio"]), r["target"]
    if b == "annotate":
        if "ratio" in r:
            return case, f"pairs/s {_s(r['pairs/s']['alignpipe'], 1)} vs {_s(r['pairs/s']['pipeline'], 1)}", \
                _s(r["ratio"]), "vs text-classification pipeline"
        return case, f"comparisons/s {_s(r['comparisons/s']['alignpipe'], 1)}", "", "no peer"
    if b == "generate":
        return case, f"tok/s {r['stage_tok_s']} vs pipeline {r['pipeline_tok_s']}", _s(r["ratio_paired"]), \
            "tokens/s >= 1.5x pipeline"
    return case, json.dumps(r)[:80], "", ""


def table(records: list[dict]) -> str:
    rows = [("case", "measure: alignpipe vs peer, median [min, max]", "ratio", "target")] + [row(r) for r in records]
    widths = [max(len(x[i]) for x in rows) for i in range(4)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(x, widths)) for x in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the < 5 minute subset")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default=None, help=f"comma-separated subset of {', '.join(SCRIPTS)}")
    a = p.parse_args(argv)
    common.set_threads(a.threads)
    chosen = a.only.split(",") if a.only else [k for k, (_, q) in SCRIPTS.items() if q or not a.quick]
    start, load = time.time(), common.load_average()
    records = []
    for name in chosen:
        t = time.perf_counter()
        got = run_script(SCRIPTS[name][0], a.quick, a.threads)
        print(f"[{name}: {len(got)} case(s), {time.perf_counter() - t:.0f} s]", file=sys.stderr, flush=True)
        for r in got:
            print(json.dumps(r), flush=True)
        records += got
    meta = {"bench": "meta", "quick": a.quick, "threads": a.threads, "seconds": round(time.time() - start, 1),
            "load_start": load, "load_end": common.load_average(), "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    name = f"only-{'-'.join(chosen)}.jsonl" if a.only else ("quick.jsonl" if a.quick else "latest.jsonl")
    (out / name).write_text("".join(json.dumps(r) + "\n" for r in records + [meta]))
    print("\n" + table(records))
    print(f"\n{meta['seconds']:.0f} s, threads {a.threads}, load average {load} -> {meta['load_end']} "
          f"on {meta['cpus']} CPUs; results: {out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
