"""Generated tokens/s of `alignpipe generate`'s core against the transformers `text-generation` pipeline.

Same prompts (pipelines/data/prompts.jsonl, rendered with the chat template), model, dtype, batch size
(prompts per call), samples per prompt, max new tokens, sampling settings and torch threads, measured in
the same process, alternating the two (warm-up first), median of --repeats runs each. Tokens are counted
exactly on both sides: new tokens up to and including EOS (the pipeline's via a wrapper on `generate`).
One JSON line per case:

    python bench/bench_generate.py [--quick] [--threads 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_prompts(n: int):
    from datasets import Dataset

    from alignpipe import schemas

    rows = [json.loads(line) for line in (ROOT / "pipelines/data/prompts.jsonl").read_text().splitlines()][:n]
    rows = [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "messages": [], "reference": None,
             "split": r.get("split", "train")} for r in rows]
    return Dataset.from_list(rows, features=schemas.features("prompts"))


def counting_generate(model, eos: set[int], counter: dict):
    """Wrap model.generate to count new tokens per row (up to and including the first EOS)."""
    original = model.generate

    def generate(*args, **kwargs):
        out = original(*args, **kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        for row in out[:, ids.shape[1]:].tolist():
            counter["tokens"] += next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        return out

    model.generate = generate
    return original


def timed(fn, seed: int):
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = fn(seed)
    return tokens, time.perf_counter() - wall, time.process_time() - cpu


def bench_case(name: str, folder: Path, *, prompts: int, batch_size: int, num_samples: int, max_new_tokens: int,
               repeats: int, threads: int) -> dict:
    import torch
    from alignpipe.stages.generate import generate
    from transformers import GenerationConfig, pipeline

    from alignpipe.models.loading import load_causal_lm, load_tokenizer
    from alignpipe.models.prompting import render_prompt
    from alignpipe.sampling.engine import Sampler, SamplingParams, eos_token_ids

    torch.set_num_threads(threads)
    tok, model = load_tokenizer(folder), load_causal_lm(folder)
    ds = load_prompts(prompts)
    texts = [render_prompt(tok, p, []) for p in ds["prompt"]]
    eos = eos_token_ids(tok, model.generation_config)
    sampler = Sampler(model, tok, SamplingParams(num_samples=num_samples, max_new_tokens=max_new_tokens))
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                              num_return_sequences=num_samples, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    pipe = pipeline("text-generation", model=model, tokenizer=tok, batch_size=batch_size)
    counter = {"tokens": 0}
    counting_generate(model, set(eos), counter)

    def ours(seed):
        return sum(generate(ds, sampler, tok, batch_size=batch_size, seed=seed)["num_tokens"])

    def theirs(seed):
        torch.manual_seed(seed)
        counter["tokens"] = 0
        pipe(texts, generation_config=config, return_full_text=False)
        return counter["tokens"]

    runs = {"stage": [], "pipeline": []}
    for i in range(repeats + 1):  # the first round warms both up and is not counted
        for key, fn in (("stage", ours), ("pipeline", theirs)):
            result = timed(fn, i)
            if i:
                runs[key].append(result)

    def med(key, j):
        return statistics.median(r[j] for r in runs[key])

    stage_tps = statistics.median(t / w for t, w, _ in runs["stage"])
    pipe_tps = statistics.median(t / w for t, w, _ in runs["pipeline"])
    paired = [(a[0] / a[1]) / (b[0] / b[1]) for a, b in zip(runs["stage"], runs["pipeline"])]  # same round
    return {"case": name, "prompts": prompts, "batch_size": batch_size, "num_samples": num_samples,
            "max_new_tokens": max_new_tokens, "threads": threads, "repeats": repeats,
            "stage_tok_s": round(stage_tps, 1), "pipeline_tok_s": round(pipe_tps, 1),
            "ratio": round(stage_tps / pipe_tps, 2),
            "ratio_paired": {"median": round(statistics.median(paired), 2), "min": round(min(paired), 2),
                             "max": round(max(paired), 2)},
            "stage_tokens": med("stage", 0), "pipeline_tokens": med("pipeline", 0),
            "stage_s": round(med("stage", 1), 2), "pipeline_s": round(med("pipeline", 1), 2),
            "time_ratio": round(med("pipeline", 1) / med("stage", 1), 2),
            "stage_cpu_s": round(med("stage", 2), 2), "pipeline_cpu_s": round(med("pipeline", 2), 2),
            "cpu_s_ratio": round(med("pipeline", 2) / med("stage", 2), 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer prompts and tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cases", default="tiny,smollm2")
    args = parser.parse_args(argv)
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    for case in args.cases.split(","):
        if case == "tiny":
            from alignpipe.testing import build_tiny_models

            folder = build_tiny_models(tempfile.mkdtemp(prefix="bench-generate-"))["policy"]
            sizes = {"prompts": 32 if args.quick else 64, "max_new_tokens": 64}
        else:
            from alignpipe.models.smollm import smollm2_folder

            folder = smollm2_folder()
            # 32 prompts: one checkpoint shard of `generate` at its CPU defaults (4 batches of 8 prompts)
            sizes = {"prompts": 16 if args.quick else 32, "max_new_tokens": 64 if args.quick else 128}
        result = bench_case(case, folder, batch_size=args.batch_size, num_samples=2, repeats=args.repeats,
                            threads=args.threads, **sizes)
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
