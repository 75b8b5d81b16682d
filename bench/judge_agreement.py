"""How often does a local LM judge agree with VADER on which of two answers is more positive?

    python bench/judge_agreement.py [--pairs 60] [--set a|b] [--judge MODEL_DIR] [--template positivity]
                                    [--batch-size 8] [--skip-timings] [--json OUT.json]

The fixture: `--pairs` pairs of short answers to the same question, one built from a clearly positive
sentence template and one from a clearly negative one (written here, below), the positive one shown first
in exactly half of the pairs (seeded), so position bias cannot pass for agreement. Both are annotated in
one `annotate` call (pairing `all`, annotators `pairwise-judge:JUDGE,template=positivity` and `vader`).
VADER's verdict is the sign of compound(response1) - compound(response2). The judge's verdict:
    order ab only   preference_12 > 0.5          (response1 shown first, one forward)
    swap-averaged   preference > 0.5             (1/2 [P_12 + 1 - P_21], two forwards)
Default judge: SmolLM2-135M-Instruct (`alignpipe.models.smollm`). Also times, on the tiny test models, reward-model
pairs/s and pairwise-judge comparisons/s (a comparison = both orders, i.e. two forwards).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SUBJECTS = ["the hotel", "this movie", "the new phone", "our trip to the coast",
            "the meal at that restaurant", "my new job", "the concert last night", "this book",
            "the customer service", "the weekend", "the new park", "the museum visit"]
POSITIVE = ["{S} was wonderful and I loved every minute of it.",
            "{S} is excellent, and I am really happy with it.",
            "{S} made me so happy; it was a pure delight.",
            "{S} is fantastic and I would gladly recommend it to anyone.",
            "{S} was great fun and left everyone smiling."]
NEGATIVE = ["{S} was terrible and I hated every minute of it.",
            "{S} is awful, and I am really disappointed with it.",
            "{S} made me so sad; it was a miserable experience.",
            "{S} is horrible and I would never recommend it to anyone.",
            "{S} was a boring waste of time and left everyone upset."]
# Set "b": written after the built-in templates were chosen, to check them on sentences not tuned on.
SUBJECTS_B = ["the train ride", "the wedding", "the software update", "the hiking trail", "the new teacher",
              "the pizza", "the football match", "the holiday rental", "the podcast",
              "the dentist appointment"]
POSITIVE_B = ["{S} was a lovely surprise and we enjoyed it a lot.",
              "I adore {s}; it brightened my whole day.",
              "{S} turned out brilliant, and everyone was thrilled.",
              "Honestly, {s} was a joy from start to finish."]
NEGATIVE_B = ["{S} was a nightmare and we regretted it.", "I can't stand {s}; it ruined my whole day.",
              "{S} turned out dreadful, and everyone was furious.",
              "Honestly, {s} was painful from start to finish."]
SETS = {"a": (SUBJECTS, POSITIVE, NEGATIVE, "What do you think of {s}?"),
        "b": (SUBJECTS_B, POSITIVE_B, NEGATIVE_B, "How was {s}?")}


def fixture_pairs(n: int, seed: int = 0, which: str = "a") -> list[dict]:
    """n (prompt, response1, response2, positive_first) with the positive answer first in exactly n//2."""
    subjects, positive, negative, question = SETS[which]
    firsts = [True] * (n // 2) + [False] * (n - n // 2)
    random.Random(seed).shuffle(firsts)
    pairs = []
    for i in range(n):
        s = subjects[i % len(subjects)]
        pos = positive[i % len(positive)].format(S=s.capitalize(), s=s)
        neg = negative[(i // len(positive) + i) % len(negative)].format(S=s.capitalize(), s=s)
        a, b = (pos, neg) if firsts[i] else (neg, pos)
        pairs.append({"prompt": question.format(s=s), "response1": a, "response2": b,
                      "positive_first": firsts[i]})
    return pairs


def generations(pairs: list[dict]):
    """A generations dataset: two samples per prompt, so pairing `all` gives exactly the fixture pairs."""
    from datasets import Dataset

    from alignpipe import schemas

    rows = [{"prompt_id": f"q{i:03d}", "prompt": p["prompt"], "messages": [], "reference": None,
             "sample_index": j, "response": p[f"response{j + 1}"], "num_tokens": 0, "finish_reason": "eos",
             "behaviour_logp": 0.0, "policy": "fixture", "policy_fingerprint": "fixture", "iteration": 0}
            for i, p in enumerate(pairs) for j in range(2)]
    return Dataset.from_list(rows, features=schemas.features("generations"))


def agreement(judge_dir: str, n: int, batch_size: int, device: str, template: str = "positivity",
              which: str = "a") -> dict:
    from alignpipe.stages.annotate import annotate

    from alignpipe.feedback.annotators import Runtime, build, parse_spec

    pairs = fixture_pairs(n, which=which)
    rt = Runtime(device=device, batch_size=batch_size)
    judge = build(parse_spec(f"pairwise-judge:{judge_dir},template={template}"), rt)
    vader = build(parse_spec("vader"), rt)
    annotate(generations(pairs[:2]), "generations", [judge, vader], [1.0, 1.0], "all")  # warm-up
    t0 = time.perf_counter()
    ds = annotate(generations(pairs), "generations", [judge, vader], [1.0, 1.0], "all")
    seconds = time.perf_counter() - t0
    rows = [r for r in ds]
    vader_first = [r["raw"][1]["score1"] > r["raw"][1]["score2"] for r in rows]
    ab_first = [r["raw"][0]["preference_12"] > 0.5 for r in rows]
    avg_first = [r["raw"][0]["preference"] > 0.5 for r in rows]
    agree = lambda xs: sum(x == v for x, v in zip(xs, vader_first)) / len(rows)
    return {
        "judge": judge_dir, "template": template, "fixture_set": which, "pairs": len(rows),
        "vader_agrees_with_fixture_labels": sum(v == p["positive_first"]
                                                for v, p in zip(vader_first, pairs)) / n,
        "agreement_order_ab_only": agree(ab_first),
        "agreement_swap_averaged": agree(avg_first),
        "order_ab_says_first_is_better": sum(ab_first) / len(rows),
        "swap_averaged_says_first_is_better": sum(avg_first) / len(rows),
        "mean_P12": sum(r["raw"][0]["preference_12"] for r in rows) / len(rows),
        "mean_P21": sum(r["raw"][0]["preference_21"] for r in rows) / len(rows),
        "comparisons_per_s": len(rows) / seconds,
    }


def tiny_timings(n: int, batch_size: int, device: str) -> dict:
    from alignpipe.stages.annotate import annotate

    from alignpipe.feedback.annotators import Runtime, build, parse_spec
    from alignpipe.testing import build_tiny_models

    models = build_tiny_models(Path(tempfile.mkdtemp(prefix="judge-bench-")))
    pairs = [{**p, "prompt": f"{p['prompt']} (#{i})"} for i, p in enumerate(fixture_pairs(n))]  # all distinct
    rt = Runtime(device=device, batch_size=batch_size)
    out = {}
    specs = {"reward_model_pairs_per_s": f"reward-model:{models['reward']}",
             "tiny_judge_comparisons_per_s": f"pairwise-judge:{models['policy']},template=positivity"}
    for label, spec in specs.items():
        ann = build(parse_spec(spec), rt)
        annotate(generations(pairs[:4]), "generations", [ann], [1.0], "all")  # warm-up
        t0 = time.perf_counter()
        annotate(generations(pairs), "generations", [ann], [1.0], "all")
        out[label] = n / (time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=60)
    ap.add_argument("--judge", default=None, help="judge model folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--template", default="positivity", help="built-in pairwise template name or .txt file")
    ap.add_argument("--set", default="a", choices=sorted(SETS), help="fixture sentences (b: held out)")
    ap.add_argument("--skip-timings", action="store_true", help="only the agreement")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--timing-pairs", type=int, default=200)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if args.judge is None:
        from alignpipe.models.smollm import smollm2_folder

        args.judge = str(smollm2_folder())
    timings = {} if args.skip_timings else tiny_timings(args.timing_pairs, args.batch_size, args.device)
    found = agreement(args.judge, args.pairs, args.batch_size, args.device, args.template, args.set)
    result = {**found, **timings,
              "batch_size": args.batch_size, "device": args.device, "threads": torch.get_num_threads()}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
