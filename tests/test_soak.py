"""Soak: five iterations of the tiny online recipe in one process, resident memory per iteration.

Iteration k imports 8 fresh prompts, samples 2 answers each from policy k (the tiny LM, then the LoRA adapter
trained by iteration k-1), scores them with VADER, pairs them, weights them, builds pairwise batches with
reference log-probs cached from the base model, and takes DPO steps on the adapter -> policy k+1. Every
command runs in this process (typer's CliRunner), so anything a stage leaks (models, datasets, file handles,
threads) accumulates and shows in the resident set size (RSS), measured after each iteration.

Bound: RSS may grow by at most 200 MB from the end of iteration 1 (models, tokenizers and libraries are
warm by then) to the end of iteration 5; the figures are printed (pytest -s) for the record.
"""
from __future__ import annotations

import gc
import threading
import time

from helpers import leftovers, manifest, ok, rows_of, write_jsonl

ITERATIONS = 5
GROWTH_BOUND_MB = 200
PROMPTS_PER_ITERATION = 8
TOPICS = ["a sunny morning", "a rainy day", "a lost umbrella", "a good book", "a noisy neighbour", "a cup of tea",
          "a missed train", "a birthday party", "a broken phone", "a walk in the park"]


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def iteration(k: int, run, lm) -> dict:
    it = run / f"iter-{k}"
    policy = lm if k == 0 else run / f"iter-{k - 1}" / "policy"
    src = write_jsonl(run / f"prompts-{k}.jsonl", [
        {"prompt_id": f"k{k}-{i}", "prompt": f"Say something about {TOPICS[(k + i) % len(TOPICS)]}."}
        for i in range(PROMPTS_PER_ITERATION)])
    ok("import", src, "--out", it / "prompts")
    ok("generate", it / "prompts", "--policy", policy, "--num-samples", 2, "--max-new-tokens", 16, "--seed", k,
       "--iteration", k, "--device", "cpu", "--out", it / "generations")
    ok("annotate", it / "generations", "-a", "vader", "-a", "length,weight=-0.001", "--pairing", "all",
       "--out", it / "annotations")
    ok("reweight", it / "annotations", "-s", "margin", "--normalize", "mean", "--out", it / "weighted")
    ok("build-batches", it / "weighted", "--task", "pairwise", "--tokenizer", lm, "--reference", lm,
       "--batch-size", 4, "--device", "cpu", "--out", it / "batches")
    lora = ["--lora-r", 4] if k == 0 else []  # later iterations keep training the adapter
    ok("train", it / "batches", "--policy", policy, "--loss", "dpo", "--reference", "stored", "--lr", "5e-3",
       "--epochs", 2, "--seed", k, "--device", "cpu", *lora, "--out", it / "policy")
    for stage in ("prompts", "generations", "annotations", "weighted", "batches", "policy"):
        assert leftovers(it / stage) == [], (k, stage)
    return {"rows": len(rows_of(it / "generations")), "pairs": len(rows_of(it / "weighted")),
            "steps": manifest(it / "policy")["report"]["steps"],
            "loss": manifest(it / "policy")["report"]["final"]["loss"]}


def test_five_iterations_of_the_online_recipe_in_one_process(tmp_path, tiny_lm_dir):
    rss, seconds, threads = [], [], []
    for k in range(ITERATIONS):
        t0 = time.perf_counter()
        figures = iteration(k, tmp_path, tiny_lm_dir)
        gc.collect()
        rss.append(rss_mb())
        seconds.append(time.perf_counter() - t0)
        threads.append(threading.active_count())
        print(f"soak iteration {k + 1}: RSS {rss[-1]:.0f} MB, {seconds[-1]:.1f} s, threads {threads[-1]}, "
              f"{figures}")
        assert figures["rows"] == 2 * PROMPTS_PER_ITERATION and figures["steps"] >= 1
    growth = rss[-1] - rss[0]
    print(f"soak: RSS per iteration {[round(x) for x in rss]} MB; growth after iteration 1: {growth:.0f} MB "
          f"(bound {GROWTH_BOUND_MB} MB)")
    assert growth < GROWTH_BOUND_MB, rss
    assert threads[-1] <= threads[0] + 2, threads  # no thread per iteration left running
    assert (tmp_path / f"iter-{ITERATIONS - 1}" / "policy" / "adapter_config.json").exists()
