"""A run folder as the online recipe leaves it, written without models in a second: every output is a real
dataset with a real manifest (StageOutput), chained by their inputs, with the command line each stage would have
been run with. Answers are plain text, and one answer per policy can carry an HTML/JS payload.

    make_run(root, iters=2, prompts=6, payload=True, accuracy=False, offline=False) -> RUN
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from helpers import full_row

PAYLOAD = ('<script>document.title="pwned";window.__pwned=1</script>'
           '<img src=x onerror="document.title=\'pwned\';window.__pwned=2">')
PROMPTS = ["Write a haiku about the first snow.", "How do I politely say no to extra work?",
           "Make this sentence more cheerful: the bus is late.", "Give a synonym for happy.",
           "Describe a quiet morning in two sentences.", "Write a motto for a library.",
           "Explain rain to a child.", "Suggest a name for a cat."]


def _write(path: Path, kind: str | None, rows: list[dict] | None, stage: str, argv: list[str], inputs: list[Path],
           config: dict, report: dict | None = None, write=None, num_rows: int | None = None) -> Path:
    from datasets import Dataset

    from alignpipe import schemas
    from alignpipe.data.output import StageOutput

    old, sys.argv = sys.argv, ["alignpipe", *map(str, argv)]
    try:
        so = StageOutput(path, stage=stage, kind=kind, config=config, inputs=inputs, force=True)
        with so:
            so.report = dict(report or {})
            if rows is not None:
                full = [full_row(kind, r) for r in rows]
                feats = schemas.features(kind)
                so.finish(Dataset.from_dict({k: [r[k] for r in full] for k in feats}, features=feats))
            else:
                so.finish(write=write, num_rows=num_rows)
    finally:
        sys.argv = old
    return Path(path)


def _answer(p: int, k: int) -> str:
    base = ["Snow falls soft and slow,", "I would love to help, but I can't take this on now.",
            "The bus is late, so there is time to enjoy the sunshine!", "Joyful.", "The kettle hums quietly.",
            "Read, wonder, grow.", "Rain is water falling from clouds.", "Whiskers."][p % 8]
    return base + " Truly wonderful!" * k


def make_run(root: Path, iters: int = 2, prompts: int = 6, payload: bool = True, accuracy: bool = False) -> Path:
    import datasets

    datasets.disable_progress_bars()
    run = Path(root)
    run.mkdir(parents=True, exist_ok=True)
    src = run.parent / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": PROMPTS[i % 8]}) + "\n" for i in range(prompts)))
    model = run.parent / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text('{"model_type": "llama"}')
    prompt_rows = [{"prompt_id": f"p{i:04d}", "prompt": PROMPTS[i % 8], "split": "test"} for i in range(prompts)]
    pr = _write(run / "prompts", "prompts", prompt_rows, "import", ["import", src, "--out", run / "prompts"],
                [src], {"format": "jsonl"})
    policy_of = {0: model}
    for k in range(iters + 1):
        pol = policy_of[k]
        ev = run / "eval" / f"iter-{k}"
        gens = [{**r, "sample_index": j, "response": (PAYLOAD if payload and r["prompt_id"] == "p0000" and j == 0
                                                      else _answer(i, k)),
                 "num_tokens": 8 + 3 * k, "finish_reason": "eos", "behaviour_logp": -5.0 - k, "policy": str(pol),
                 "policy_fingerprint": f"fp{k}", "iteration": k}
                for i, r in enumerate(prompt_rows) for j in range(2)]
        g = _write(ev / "generations", "generations", gens, "generate",
                   ["generate", pr, "--policy", pol, "--split", "test", "--out", ev / "generations"], [pr, pol],
                   {"num_samples": 2, "seed": 1234}, {"num_tokens": sum(x["num_tokens"] for x in gens)})
        scores = [{"prompt_id": x["prompt_id"], "prompt": x["prompt"], "iteration": k, "response1": x["response"],
                   "response1_sample_index": x["sample_index"], "response1_num_tokens": x["num_tokens"],
                   "response1_reward": 0.1 * k + 0.01 * i, "pairing": "pointwise", "annotator": "vader"}
                  for i, x in enumerate(gens)]
        _write(ev / "scores", "annotations", scores, "annotate",
               ["annotate", g, "--annotator", "vader", "--pairing", "pointwise", "--out", ev / "scores"], [g],
               {"annotator": ["vader"]}, {"accuracy": 0.2 + 0.1 * k} if accuracy else {})
        if k > 0:
            vs = [{"prompt_id": f"{x['prompt_id']}#{x['sample_index']}", "prompt": x["prompt"], "iteration": k,
                   "response1": x["response"], "response2": "baseline", "preference": 0.5 + 0.1 * k * (i // 2 % 2),
                   "pairing": "evaluate", "annotator": "vader"} for i, x in enumerate(gens)]
            rep = {"win_rate": 0.5 + 0.1 * k, "kl_vs_reference": 0.3 * k, "pairs": len(vs)}
            if accuracy:
                rep["accuracy"] = 0.25 + 0.2 * k
            _write(ev / "versus-0", "annotations", vs, "evaluate",
                   ["evaluate", g, run / "eval/iter-0/generations", "--annotator", "vader", "--out", ev / "versus-0"],
                   [g, run / "eval/iter-0/generations"], {"annotator": ["vader"]}, rep)
        if k == iters:
            break
        it = run / f"iter-{k}"
        tg = _write(it / "generations", "generations", gens, "generate",
                    ["generate", pr, "--policy", pol, "--split", "train", "--out", it / "generations"], [pr, pol],
                    {"num_samples": 2, "seed": 0}, {"num_tokens": 100 + k})
        pairs = [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "iteration": k, "response1": _answer(i, k),
                  "response2": "Meh.", "response1_reward": 1.0, "response2_reward": 0.0, "preference": 0.5 + i / 20,
                  "pairing": "all", "annotator": "vader"} for i, r in enumerate(prompt_rows)]
        an = _write(it / "annotations", "annotations", pairs, "annotate",
                    ["annotate", tg, "--annotator", "vader", "--out", it / "annotations"], [tg], {"annotator": ["vader"]})
        ws = [abs(2 * p["preference"] - 1) for p in pairs]
        mean = sum(ws) / len(ws)
        wrows = [{**p, "response1_weight": w / mean, "response2_weight": w / mean} for p, w in zip(pairs, ws)][1:]
        ex = [r["response1_weight"] for r in wrows]
        wt = _write(it / "weighted", "weighted", wrows, "reweight",
                    ["reweight", an, "--strategy", "confidence", "--drop-below", "0.01", "--out", it / "weighted"],
                    [an], {"strategy": ["confidence"]},
                    {"rows_in": len(pairs), "rows_out": len(wrows), "dropped": 1, "strategies": ["confidence"],
                     "ess": sum(ex) ** 2 / sum(x * x for x in ex), "ess_fraction": sum(ex) ** 2 / sum(x * x for x in ex) / len(ex)})

        def write_policy(folder: Path, k=k) -> None:
            (folder / "adapter_config.json").write_text(json.dumps({"iteration": k}))
            rows = [{"step": s, "epoch": s / 8, "loss": 0.69 * math.exp(-0.1 * s) + 0.01 * k, "kl": 0.02 * s,
                     "rewards/accuracy": min(1.0, 0.4 + 0.05 * s), "entropy": 2.0 - 0.1 * s, "grad_norm": 1.0 / s, "lr": 5e-4, "tokens": 300,
                     "seconds": 0.5, "tokens/s": 600.0} for s in range(1, 9)]
            (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

        policy_of[k + 1] = _write(it / "policy", None, None, "train",
                                  ["train", wt, "--policy", pol, "--loss", "dpo", "--out", it / "policy"], [wt, pol],
                                  {"loss": "dpo", "beta": 0.1, "lr": 5e-4}, {"steps": 8}, write=write_policy)
    return run
