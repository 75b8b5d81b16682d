"""Annotation: reward-model pairs/s against the transformers `text-classification` pipeline, and LLM-judge
comparisons/s (one comparison = both orders, two forwards).

Same generations (two answers per prompt, pairing `all`, so one pair per prompt), same reward model, same
rendered texts (the chat template with the answer as the assistant turn: what the reward-model annotator
feeds its model), same batch size and threads; the pipeline returns the raw logit (function_to_apply none).
The two sides alternate in one process after a warm-up, --repeats times. The judge has no peer here (TRL's
judges call remote APIs or PairRM), so its rate is reported on its own.

    python bench/bench_annotate.py [--quick] [--threads 2] [--repeats 5]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common


def generations(n: int):
    """n prompts with two answers each, as a generations dataset."""
    from datasets import Dataset

    from alignpipe import schemas

    rows = [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "messages": [], "reference": None,
             "sample_index": j, "response": r[side], "num_tokens": 0, "finish_reason": "eos",
             "behaviour_logp": 0.0, "policy": "bench", "policy_fingerprint": "bench", "iteration": 0}
            for r in common.preference_rows(n, (10, 60)) for j, side in enumerate(("chosen", "rejected"))]
    return Dataset.from_list(rows, features=schemas.features("generations"))


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def reward_case(name: str, folder: Path, pairs: int, batch_size: int, repeats: int) -> dict:
    from alignpipe.stages.annotate import annotate
    from transformers import pipeline

    from alignpipe.feedback.annotators import Runtime, build, parse_spec
    from alignpipe.feedback.annotators.reward_model import render

    gens = generations(pairs)
    ann = build(parse_spec(f"reward-model:{folder}"), Runtime(device="cpu", batch_size=batch_size))
    texts = [render(ann.tokenizer, g["prompt"], g["messages"], g["response"])[0] for g in gens]
    pipe = pipeline("text-classification", model=ann.model, tokenizer=ann.tokenizer, device="cpu",
                    function_to_apply="none", batch_size=batch_size)
    ours_fn = lambda: annotate(gens, "generations", [ann], [1.0], "all")
    peer_fn = lambda: pipe(texts, truncation=True)
    ours_fn(), peer_fn()  # warm-up
    load = common.load_average()
    runs = common.alternate({"alignpipe": lambda: pairs / timed(ours_fn), "pipeline": lambda: pairs / timed(peer_fn)},
                            repeats)
    mine = [v["score"] for v in pipe(texts[:4], truncation=True)]
    theirs = [r.score for r in ann.score([_query(g) for g in list(gens)[:4]])]
    return {"bench": "annotate", "case": f"reward-model-{name}", "pairs": pairs, "batch_size": batch_size,
            "repeats": repeats, "load": load, "pairs/s": {k: common.spread(v) for k, v in runs.items()},
            "ratio": common.ratios(runs["alignpipe"], runs["pipeline"]),
            "score_max_abs_diff": max(abs(a - b) for a, b in zip(mine, theirs))}


def _query(g: dict):
    from alignpipe.feedback.annotators import Query

    return Query(prompt=g["prompt"], messages=g["messages"], response=g["response"])


def judge_case(name: str, folder: Path, pairs: int, batch_size: int, repeats: int) -> dict:
    from alignpipe.stages.annotate import annotate

    from alignpipe.feedback.annotators import Runtime, build, parse_spec

    gens = generations(pairs)
    judge = build(parse_spec(f"pairwise-judge:{folder},template=positivity"),
                  Runtime(device="cpu", batch_size=batch_size))
    fn = lambda: annotate(gens, "generations", [judge], [1.0], "all")
    annotate(gens.select(range(4)), "generations", [judge], [1.0], "all")  # warm-up
    load = common.load_average()
    rates = [pairs / timed(fn) for _ in range(repeats)]
    return {"bench": "annotate", "case": f"judge-{name}", "pairs": pairs, "batch_size": batch_size,
            "repeats": repeats, "load": load, "comparisons/s": {"alignpipe": common.spread(rates)}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny models only")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    a = p.parse_args(argv)
    common.set_threads(a.threads)
    import torch

    torch.set_num_threads(a.threads)
    common.quiet()
    repeats = a.repeats or (3 if a.quick else 5)
    tiny = common.tiny_models()
    common.emit(reward_case("tiny", tiny["reward"], 64 if a.quick else 128, a.batch_size, repeats))
    common.emit(judge_case("tiny", tiny["policy"], 32 if a.quick else 64, a.batch_size, repeats))
    if not a.quick:
        common.emit(judge_case("smollm2", common.smollm2(), 16, a.batch_size, repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
