"""evaluate: the win rate of one policy's answers against another's on the same held-out prompts.

    alignpipe evaluate CANDIDATE BASELINE --annotator SPEC --out EVAL

CANDIDATE and BASELINE are generations of the two policies on the same prompts (e.g. `generate --split
test` with policy K and with policy 0). Answers are matched on (prompt_id, sample_index) and judged as pairs
(response1 = candidate, response2 = baseline) by any annotator of `annotate`: a pairwise judge sees both
orders and averages them, so position bias cancels; pointwise annotators compare rewards
(P = sigmoid(r1 - r2)). The output is an annotations dataset of the comparisons; its manifest's report has

    win_rate        mean over pairs of 1[P > 1/2] + 1/2 * 1[P = 1/2]      (ties count half)
    mean_preference mean P(candidate preferred)
    mean_reward_candidate / mean_reward_baseline   when the annotators give rewards
    kl_vs_reference  with --reference MODEL: mean over the candidate's answers y ~ pi of
                     behaviour_logp(y) - log pi_ref(y|x), a Monte Carlo estimate of KL(pi || pi_ref) in nats
                     per answer (unbiased when generate sampled at temperature 1 without top-k/top-p)
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from alignpipe.core.command import (
    ConfigOpt,
    ForceOpt,
    OutOpt,
    handle_errors,
    resolved_config,
    say,
    up_to_date_line,
)
from alignpipe.core.errors import UserError


def match_pairs(candidate, baseline):
    """Pure core: pairs rows of an annotations table from two generations datasets on the same prompts."""
    from datasets import Dataset

    from alignpipe import schemas

    base = {(r["prompt_id"], r["sample_index"]): r for r in baseline}
    rows = []
    for c in candidate:
        b = base.get((c["prompt_id"], c["sample_index"]))
        if b is None:
            continue
        side = {}
        for i, g in ((1, c), (2, b)):
            side.update({f"response{i}": g["response"], f"response{i}_sample_index": i - 1,
                         f"response{i}_num_tokens": g["num_tokens"], f"response{i}_behaviour_logp": g["behaviour_logp"],
                         f"response{i}_reward": None, f"response{i}_label": None,
                         f"response{i}_finish_reason": g["finish_reason"],
                         f"response{i}_token_ids": g.get("response_token_ids"),
                         f"response{i}_token_logps": g.get("response_token_logps")})
        rows.append({"prompt_id": f"{c['prompt_id']}#{c['sample_index']}", "prompt": c["prompt"],
                     "messages": c["messages"], "reference": c.get("reference"), "iteration": c["iteration"], **side,
                     "preference": None,
                     "annotator": "", "raw": [], "pairing": "evaluate", "policy": c["policy_fingerprint"]})
    if not rows:
        return None
    return Dataset.from_list(rows, features=schemas.features("annotations"))


def win_summary(ds) -> dict:
    """Win rate, mean preference and mean rewards of an evaluated comparison table."""
    prefs = [p for p in ds["preference"] if p is not None]
    out = {"pairs": len(ds), "judged": len(prefs)}
    if prefs:
        out["win_rate"] = sum(1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0 for p in prefs) / len(prefs)
        out["mean_preference"] = sum(prefs) / len(prefs)
    for i, name in ((1, "candidate"), (2, "baseline")):
        rewards = [r for r in ds[f"response{i}_reward"] if r is not None]
        if rewards:
            out[f"mean_reward_{name}"] = sum(rewards) / len(rewards)
        out[f"mean_tokens_{name}"] = sum(ds[f"response{i}_num_tokens"]) / max(1, len(ds))
    return out


def kl_estimate(pairs, model, tokenizer, *, batch_size: int, device) -> dict:
    """KL(candidate || reference) from the candidate's own samples: mean of log pi(y) - log pi_ref(y)."""
    from alignpipe.models.logprobs import response_logps

    ref, _ = response_logps(pairs, model, tokenizer, batch_size=batch_size, device=device, which=(1,))
    diffs = [b - r for b, r in zip(pairs["response1_behaviour_logp"], ref) if b is not None and r is not None]
    return {"kl_vs_reference": sum(diffs) / len(diffs)} if diffs else {}


@handle_errors
def command(
    ctx: typer.Context,
    candidate: Annotated[Path, typer.Argument(help="generations of the policy under test.")],
    baseline: Annotated[Path, typer.Argument(help="generations of the baseline policy on the same prompts.")],
    out: OutOpt,
    annotator: Annotated[list[str], typer.Option("--annotator", "-a", help="Judge spec(s), as in annotate.")],
    reference: Annotated[Path | None, typer.Option(
        help="Model folder: also estimate KL(candidate || reference) from the candidate's answers.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per forward of local models.")] = 8,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16 for local models.")] = "float32",
    device: Annotated[str, typer.Option(help="cpu | cuda | auto.")] = "auto",
    config: ConfigOpt = None,
    force: ForceOpt = False,
):
    """Win rate of a policy against another on held-out prompts (both orders), and mean rewards."""
    from alignpipe.feedback.annotators import Runtime

    runtime = Runtime(device=device, dtype=dtype, batch_size=batch_size, cache_dir=None)
    say(run(candidate, baseline, out, annotator, reference=reference, runtime=runtime, config=resolved_config(ctx),
            force=force))


def run(candidate: Path, baseline: Path, out: Path, annotator: list[str], *, reference: Path | None, runtime,
        config: dict, force: bool) -> str:
    """The stage around the cores (`match_pairs`, annotate's core, `win_summary`, `kl_estimate`); returns
    the line to print."""
    from alignpipe.stages.annotate import annotate, parse_weights

    from alignpipe.data.io import read_input
    from alignpipe.data.output import StageOutput
    from alignpipe.feedback.annotators import build, parse_spec, spec_inputs

    specs = [parse_spec(s) for s in annotator]
    weights = parse_weights(None, specs)
    cand, _ = read_input(candidate, "generations", stage="evaluate")
    base, _ = read_input(baseline, "generations", stage="evaluate")
    pairs = match_pairs(cand, base)
    if pairs is None:
        raise UserError(f"{candidate} and {baseline}: no (prompt_id, sample_index) in common; generate both "
                        f"on the same prompts")
    inputs = [candidate, baseline] + [p for s in specs for p in spec_inputs(s)] + ([reference] if reference else [])
    if reference is not None:
        from alignpipe.models.loading import check_model_folder

        check_model_folder(reference, "reference", False)
    cfg = {**config, "annotator": [s.identity() for s in specs]}
    so = StageOutput(out, stage="evaluate", kind="annotations", config=cfg, inputs=inputs, force=force)
    if so.up_to_date():
        return up_to_date_line("evaluate", out)
    annotators = [build(s, runtime) for s in specs]
    with so:
        result = annotate(pairs, "annotations", annotators, weights, "evaluate")
        so.report = win_summary(result)
        if reference is not None:
            from alignpipe.models.loading import load_causal_lm, load_tokenizer, resolve_device

            model = load_causal_lm(reference, dtype=runtime.dtype, device=resolve_device(runtime.device),
                                   what="reference")
            so.report.update(kl_estimate(pairs, model, load_tokenizer(reference), batch_size=runtime.batch_size,
                                         device=model.device))
        so.finish(result)
    r = so.report
    return (f"evaluate: win rate {r.get('win_rate', float('nan')):.3f} over {r['judged']} pairs "
            f"(mean P {r.get('mean_preference', float('nan')):.3f})"
            + (f", KL vs reference {r['kl_vs_reference']:.2f} nats" if "kl_vs_reference" in r else "") + f" -> {out}")
