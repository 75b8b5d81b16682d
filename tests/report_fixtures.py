"""A run folder as the online recipe leaves it, written without models in a second: every output is a real
dataset with a real manifest (StageOutput), chained by their inputs, with the command line each stage would have
been run with. Answers are plain text, and one answer per policy can carry an HTML/JS payload.

    make_run(root, iters=2, prompts=6, payload=True, accuracy=False, rl=False, legacy=False) -> RUN

Layout: RUN/iter-K (K = 1..iters, its policy is policy K) and RUN/eval/policy-K (K = 0..iters); `legacy=True`
writes the numbering of older runs (RUN/iter-K from 0, its policy being policy K+1; RUN/eval/iter-K) and the
metric names of that time (DPO's `kl`). `rl=True` writes pipelines/rl.mk's run: a 0/1 verifier held-out
(sampled and greedy), pointwise training rewards, no reweighting, a GRPO policy with its metrics.
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


def _scores(gens: list[dict], k: int, rl: bool) -> list[dict]:
    """Held-out rewards: VADER-like numbers, or a verifier's 0/1 (policy K right on the first K+1 prompts)."""
    return [{"prompt_id": x["prompt_id"], "prompt": x["prompt"], "iteration": k, "response1": x["response"],
             "response1_sample_index": x["sample_index"], "response1_num_tokens": x["num_tokens"],
             "response1_reward": float(i // 2 <= k) if rl else 0.1 * k + 0.01 * i, "pairing": "pointwise",
             "annotator": "exact-answer" if rl else "vader"} for i, x in enumerate(gens)]


def _metrics(k: int, rl: bool, legacy: bool) -> list[dict]:
    """8 training steps of the policy made from policy K's answers: DPO's metrics, or GRPO's."""
    rows = []
    for s in range(1, 9):
        row = {"step": s, "epoch": s / 8, "loss": 0.69 * math.exp(-0.1 * s) + 0.01 * k, "entropy": 2.0 - 0.1 * s,
               "grad_norm": 1.0 / s, "lr": 5e-4, "tokens": 300, "seconds": 0.5, "tokens/s": 600.0}
        if rl:
            row.update({"clip/low": 0.01 * s, "clip/high": 0.02, "kl": 0.001 * s, "ratio/mean": 1.0})
        else:
            row.update({"kl" if legacy else "logratio": 0.02 * s, "rewards/accuracy": min(1.0, 0.4 + 0.05 * s)})
        rows.append(row)
    return rows


def make_run(root: Path, iters: int = 2, prompts: int = 6, payload: bool = True, accuracy: bool = False,
             rl: bool = False, legacy: bool = False) -> Path:
    import datasets

    datasets.disable_progress_bars()
    run = Path(root)
    run.mkdir(parents=True, exist_ok=True)
    src = run.parent / ("arithmetic.jsonl" if rl else "prompts.jsonl")
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
        ev = run / "eval" / (f"iter-{k}" if legacy else f"policy-{k}")
        gens = [{**r, "sample_index": j, "response": (PAYLOAD if payload and r["prompt_id"] == "p0000" and j == 0
                                                      else _answer(i, k)),
                 "num_tokens": 8 + 3 * k, "finish_reason": "eos", "behaviour_logp": -5.0 - k, "policy": str(pol),
                 "policy_fingerprint": f"fp{k}", "iteration": k}
                for i, r in enumerate(prompt_rows) for j in range(2)]
        g = _write(ev / "generations", "generations", gens, "generate",
                   ["generate", pr, "--policy", pol, "--split", "test", "--out", ev / "generations"], [pr, pol],
                   {"num_samples": 2, "seed": 1234}, {"num_tokens": sum(x["num_tokens"] for x in gens)})
        judge, base = "exact-answer" if rl else "vader", "iter-0" if legacy else "policy-0"
        verifier = {"annotators": [{"name": "exact-answer", "verifier": True, "correct": 1.0, "wrong": 0.0}]}
        scores = _scores(gens, k, rl)
        rep = {"accuracy": 0.2 + 0.1 * k} if accuracy else {}
        if rl:  # a verifier: its accuracy is the mean reward
            rep = {"accuracy": sum(x["response1_reward"] for x in scores) / len(scores), **verifier}
        _write(ev / "scores", "annotations", scores, "annotate",
               ["annotate", g, "--annotator", judge, "--pairing", "pointwise", "--out", ev / "scores"], [g],
               {"annotator": [judge]}, rep)
        if rl:
            greedy = [x for x in gens if x["sample_index"] == 0]
            gg = _write(ev / "greedy-generations", "generations", greedy, "generate",
                        ["generate", pr, "--policy", pol, "--temperature", "0", "--out", ev / "greedy-generations"],
                        [pr, pol], {"num_samples": 1, "temperature": 0.0}, {"prompts": prompts})
            right = [{**x, "response1_reward": float(i <= k + 1)} for i, x in enumerate(_scores(greedy, k, rl))]
            _write(ev / "greedy-scores", "annotations", right, "annotate",
                   ["annotate", gg, "--annotator", judge, "--out", ev / "greedy-scores"], [gg], {"annotator": [judge]},
                   {"accuracy": sum(x["response1_reward"] for x in right) / len(right), **verifier})
        if k > 0:
            vs = [{"prompt_id": f"{x['prompt_id']}#{x['sample_index']}", "prompt": x["prompt"], "iteration": k,
                   "response1": x["response"], "response2": "baseline", "preference": 0.5 + 0.1 * k * (i // 2 % 2),
                   "pairing": "evaluate", "annotator": judge} for i, x in enumerate(gens)]
            rep = {"win_rate": 0.5 + 0.1 * k, "kl_vs_reference": 0.3 * k, "pairs": len(vs)}
            if accuracy:
                rep["accuracy"] = 0.25 + 0.2 * k
            _write(ev / "versus-0", "annotations", vs, "evaluate",
                   ["evaluate", g, ev.parent / base / "generations", "--annotator", judge, "--out", ev / "versus-0"],
                   [g, ev.parent / base / "generations"], {"annotator": [judge]}, rep)
        if k == iters:
            break
        it = run / f"iter-{k if legacy else k + 1}"  # policy K's answers train policy K+1
        tg = _write(it / "generations", "generations", gens, "generate",
                    ["generate", pr, "--policy", pol, "--split", "train", "--out", it / "generations"], [pr, pol],
                    {"num_samples": 2, "seed": 0}, {"num_tokens": 100 + k})
        pairs = [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "iteration": k, "response1": _answer(i, k),
                  "response2": "Meh.", "response1_reward": 1.0, "response2_reward": 0.0, "preference": 0.5 + i / 20,
                  "pairing": "all", "annotator": "vader"} for i, r in enumerate(prompt_rows)]
        if rl:  # pointwise: policy K's training answers, right on the first K+1 prompts
            pairs = [{**_scores([x], k, rl)[0], "response1_reward": float(i // 2 <= k)} for i, x in enumerate(gens)]
        an = _write(it / "annotations", "annotations", pairs, "annotate",
                    ["annotate", tg, "--annotator", judge, "--out", it / "annotations"], [tg], {"annotator": [judge]})
        if rl:
            src_of_policy = _write(it / "batches", None, None, "build-batches",
                                   ["build-batches", an, "--task", "group", "--out", it / "batches"], [an],
                                   {"task": "group", "advantage": "grpo"},
                                   {"inputs": [{"equal_groups_dropped": k}]}, write=lambda f: None, num_rows=len(pairs))
            policy_of[k + 1] = _policy(it, src_of_policy, pol, k, rl, legacy)
            continue
        ws = [abs(2 * p["preference"] - 1) for p in pairs]
        mean = sum(ws) / len(ws)
        wrows = [{**p, "response1_weight": w / mean, "response2_weight": w / mean} for p, w in zip(pairs, ws)][1:]
        ex = [r["response1_weight"] for r in wrows]
        wt = _write(it / "weighted", "weighted", wrows, "reweight",
                    ["reweight", an, "--strategy", "confidence", "--drop-below", "0.01", "--out", it / "weighted"],
                    [an], {"strategy": ["confidence"]},
                    {"rows_in": len(pairs), "rows_out": len(wrows), "dropped": 1, "strategies": ["confidence"],
                     "ess": sum(ex) ** 2 / sum(x * x for x in ex), "ess_fraction": sum(ex) ** 2 / sum(x * x for x in ex) / len(ex)})

        policy_of[k + 1] = _policy(it, wt, pol, k, rl, legacy)
    return run


def _policy(it: Path, data: Path, pol: Path, k: int, rl: bool, legacy: bool) -> Path:
    """The policy trained on iteration folder `it` from policy K (`pol`): an adapter and its metrics.jsonl."""
    def write_policy(folder: Path) -> None:
        (folder / "adapter_config.json").write_text(json.dumps({"iteration": k}))
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _metrics(k, rl, legacy)))

    loss = "grpo" if rl else "dpo"
    return _write(it / "policy", None, None, "train", ["train", data, "--policy", pol, "--loss", loss, "--out",
                                                       it / "policy"], [data, pol],
                  {"loss": loss, "beta": 0.1, "lr": 5e-4}, {"steps": 8}, write=write_policy)
