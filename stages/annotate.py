"""annotate: give every generation a reward and/or every pair of generations of a prompt a preference.

    alignpipe annotate GENERATIONS --annotator SPEC [--annotator SPEC ...] --out ANNOTATIONS

Annotators (`alignpipe.feedback.annotators.ANNOTATORS`): reward models, local LM judges (pairwise and pointwise),
an OpenAI-compatible HTTP judge, rules (length, regex, VADER) and user functions. Each one's raw output is
kept per row in `raw` as {name, score1, score2, preference, preference_12, preference_21, abstained, reason}.

Combining K annotators with weights w_k (`--weights 1,0.5` in spec order, or `,weight=W` in a spec;
default 1; pairwise weights must be > 0):
    reward of a response   r = sum_k w_k * score_k           over the pointwise annotators
                                                             (null when one of them abstained)
    preference of a pair   P = sum_k w_k * P_k / sum_k w_k   over the pairwise annotators that gave a verdict
                           P = sigmoid(r1 - r2)              when none did (e.g. only pointwise annotators)
The manifest's report records each annotator's weight and mean (`components`; shaping: `annotators.shaping`).
`preference` is P(response1 preferred over response2).

Pairing (`--pairing`; default `all` when an annotator is pairwise, else `pointwise`): `pointwise` (one row
per generation, response2 null) or a pairing of `alignpipe.feedback.pairing` (the one implementation, shared with
build-batches): all (every pair i < j in sample-index order), random (one pair per prompt, seeded by the
prompt id), best-worst (the highest against the lowest combined pointwise reward, response1 = the best; ties:
the first of the highest against the last of the lowest), margin:X (pairs whose rewards differ by >= X).
Prompts with fewer than two generations give no pair (counted in the manifest). An `annotations` input
(e.g. imported pairs to re-judge) keeps its rows and their pairing.

Shards over prompts (a prompt's generations stay together) resume after a crash; `--num-shards N
--shard-index I` (or WORLD_SIZE/RANK) annotates the I-th contiguous block of prompts into OUT/part-I-of-N,
and reading OUT concatenates the parts, equal to a one-process run row for row.
"""
from __future__ import annotations

import math
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
from alignpipe.feedback.annotators import ANNOTATORS, Query, Runtime, Verdict, help_text

COMBINATION = ("reward = sum_k w_k*score_k over pointwise annotators (null if one abstained); preference = "
               "sum_k w_k*P_k / sum_k w_k over pairwise annotators with a verdict, else sigmoid(r1 - r2)")


# -- pure core --------------------------------------------------------------------------------------------
def _gen(row: dict, kind: str, i: int = 1) -> dict | None:
    """A response with its prompt fields, from a generations row or side i of an annotations row."""
    base = {k: row[k] for k in ("prompt_id", "prompt", "messages", "iteration")} | {"reference": row.get("reference")}
    if kind == "generations":
        return {**base, "policy": row["policy_fingerprint"], "sample_index": row["sample_index"],
                "response": row["response"], "num_tokens": row["num_tokens"],
                "behaviour_logp": row["behaviour_logp"], "label": None, "finish_reason": row["finish_reason"],
                "token_ids": row.get("response_token_ids"), "token_logps": row.get("response_token_logps")}
    r = f"response{i}"
    if row[r] is None:
        return None
    return {**base, "policy": row["policy"], "sample_index": row[f"{r}_sample_index"], "response": row[r],
            "num_tokens": row[f"{r}_num_tokens"], "behaviour_logp": row[f"{r}_behaviour_logp"],
            "label": row[f"{r}_label"], "finish_reason": row.get(f"{r}_finish_reason"),
            "token_ids": row.get(f"{r}_token_ids"), "token_logps": row.get(f"{r}_token_logps")}


def _key(g: dict) -> tuple:
    return g["prompt_id"], g["sample_index"], g["response"]


def group_by_prompt(prompt_ids: list[str]) -> list[list[int]]:
    """Row indices per prompt, prompts in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, pid in enumerate(prompt_ids):
        groups.setdefault(pid, []).append(i)
    return list(groups.values())


def combined_reward(verdicts: list[Verdict], weights: list[float]) -> float | None:
    """sum_k w_k * score_k over pointwise verdicts; None when there are none or one abstained."""
    if not verdicts or any(v.abstained for v in verdicts):
        return None
    return float(sum(w * v.score for w, v in zip(weights, verdicts)))


def combined_preference(verdicts: list[Verdict], weights: list[float], r1, r2) -> float | None:
    """Weighted mean of the pairwise verdicts that answered; else sigmoid(r1 - r2) when both rewards exist."""
    live = [(w, v.preference) for w, v in zip(weights, verdicts)
            if not v.abstained and v.preference is not None]
    if live:
        return float(sum(w * p for w, p in live) / sum(w for w, _ in live))
    if r1 is None or r2 is None:
        return None
    return 1.0 / (1.0 + math.exp(-(r1 - r2))) if r1 - r2 > -700 else 0.0


def make_pairs(gens: list[dict], pairing, rewards: dict, seed: int) -> list[tuple[dict, dict | None]]:
    """The (response1, response2) units of one prompt's generations: one per generation (pairing
    'pointwise'), else the pairs of `alignpipe.feedback.pairing` over the generations in sample-index order."""
    from alignpipe.feedback.pairing import pairs

    gens = sorted(gens, key=lambda g: g["sample_index"])
    if pairing == "pointwise":
        return [(g, None) for g in gens]
    found = pairs(pairing, [rewards.get(_key(g)) for g in gens], seed, gens[0]["prompt_id"])
    return [(gens[i], gens[j]) for i, j in found]


def _raw(name: str, v1: Verdict | None, v2: Verdict | None, pv: Verdict | None) -> dict:
    if pv is not None:
        return {"name": name, "score1": None, "score2": None, "preference": pv.preference,
                "preference_12": pv.p12, "preference_21": pv.p21, "abstained": pv.abstained,
                "reason": pv.reason}
    reasons = "; ".join(v.reason for v in (v1, v2) if v is not None and v.reason)
    return {"name": name, "score1": v1.score, "score2": v2.score if v2 else None, "preference": None,
            "preference_12": None, "preference_21": None,
            "abstained": v1.abstained or bool(v2 and v2.abstained), "reason": reasons or None}


def _side(g: dict | None, i: int, reward) -> dict:
    r = f"response{i}"
    if g is None:
        return {r: None, f"{r}_sample_index": None, f"{r}_num_tokens": None, f"{r}_behaviour_logp": None,
                f"{r}_reward": None, f"{r}_label": None, f"{r}_finish_reason": None, f"{r}_token_ids": None,
                f"{r}_token_logps": None}
    return {r: g["response"], f"{r}_sample_index": g["sample_index"], f"{r}_num_tokens": g["num_tokens"],
            f"{r}_behaviour_logp": g["behaviour_logp"], f"{r}_reward": reward, f"{r}_label": g["label"],
            f"{r}_finish_reason": g["finish_reason"], f"{r}_token_ids": g["token_ids"],
            f"{r}_token_logps": g["token_logps"]}


def annotate(ds, kind: str, annotators: list, weights: list[float], pairing: str, seed: int = 0,
             row_ids: list[int] | None = None):
    """Pure core: a generations (or annotations) Dataset of whole prompts -> an annotations Dataset."""
    rows = list(ds)
    row_ids = list(range(len(rows))) if row_ids is None else row_ids
    where = {}
    if kind == "generations":
        gens = [_gen(r, kind) for r in rows]
        for g, i in zip(gens, row_ids):
            where[_key(g)] = f"row {i} (prompt_id {g['prompt_id']}, sample {g['sample_index']})"
        units = None
    else:
        units = [(_gen(r, kind, 1), _gen(r, kind, 2), r["pairing"]) for r in rows]
        gens = [g for u in units for g in u[:2] if g is not None]
        for (g1, g2, _), i in zip(units, row_ids):
            for side, g in ((1, g1), (2, g2)):
                if g is not None:
                    where.setdefault(_key(g), f"row {i} response{side} (prompt_id {g['prompt_id']})")
    point = [(a, w) for a, w in zip(annotators, weights) if not a.pairwise]
    scores = _score_all(gens, [a for a, _ in point], where)
    rewards = {k: combined_reward([s[k] for s in scores], [w for _, w in point]) for k in where}
    if units is None:
        name = pairing if isinstance(pairing, str) else pairing.identity()
        units = [(a, b, name) for idx in group_by_prompt([g["prompt_id"] for g in gens])
                 for a, b in make_pairs([gens[i] for i in idx], pairing, rewards, seed)]
    pair_verdicts = _compare_all(units, [a for a in annotators if a.pairwise], where)
    return _to_dataset(_rows(units, annotators, weights, scores, pair_verdicts, rewards))


def _score_all(gens: list[dict], annotators: list, where: dict) -> list[dict]:
    """Per pointwise annotator: {generation key: Verdict}, each distinct generation scored once."""
    unique = {}
    for g in gens:
        unique.setdefault(_key(g), g)
    queries = [Query(g["prompt"], g["messages"], g["response"], where=where[k], reference=g["reference"],
                     num_tokens=g["num_tokens"]) for k, g in unique.items()]
    return [dict(zip(unique, a.score(queries) if queries else [])) for a in annotators]


def _compare_all(units, annotators: list, where: dict) -> list[list[Verdict]]:
    for g1, g2, _ in units:
        if annotators and g2 is None:
            raise UserError(f"{where[_key(g1)]}: has no response2; pairwise annotator {annotators[0].name} "
                            f"needs pairs")
    queries = [Query(g1["prompt"], g1["messages"], g1["response"], g2["response"], where=where[_key(g1)])
               for g1, g2, _ in units] if annotators else []
    return [a.compare(queries) if queries else [] for a in annotators]


def _rows(units, annotators, weights, scores, pair_verdicts, rewards) -> list[dict]:
    name = " + ".join(f"{w:g}*{a.name}" for a, w in zip(annotators, weights))
    pair_weights = [w for a, w in zip(annotators, weights) if a.pairwise]
    out = []
    for u, (g1, g2, pairing) in enumerate(units):
        pv = [v[u] for v in pair_verdicts]
        r1, r2 = rewards.get(_key(g1)), rewards.get(_key(g2)) if g2 else None
        raw, si, pi = [], iter(scores), iter(pv)
        for a in annotators:
            if a.pairwise:
                raw.append(_raw(a.name, None, None, next(pi)))
            else:
                s = next(si)
                raw.append(_raw(a.name, s[_key(g1)], s[_key(g2)] if g2 else None, None))
        pref = combined_preference(pv, pair_weights, r1, r2) if g2 else None
        out.append({**{k: g1[k] for k in ("prompt_id", "prompt", "messages", "iteration", "policy", "reference")},
                    **_side(g1, 1, r1), **_side(g2, 2, r2), "preference": pref, "annotator": name, "raw": raw,
                    "pairing": pairing})
    return out


def _to_dataset(rows: list[dict]):
    from datasets import Dataset

    from alignpipe import schemas

    features = schemas.features("annotations")
    if not rows:
        return Dataset.from_dict({k: [] for k in features}, features=features)
    return Dataset.from_list(rows, features=features)


# -- command ----------------------------------------------------------------------------------------------
def parse_weights(text: str | None, specs: list) -> list[float]:
    if text is not None and any(s.values["weight"] is not None for s in specs):
        raise UserError("--weights and ',weight=' in an --annotator spec both given; use one of them")
    if text is None:
        weights = [1.0 if s.values["weight"] is None else s.values["weight"] for s in specs]
    else:
        try:
            weights = [float(w) for w in text.split(",")]
        except ValueError:
            raise UserError(f"--weights '{text}': expected comma-separated numbers, e.g. 1,0.5")
        if len(weights) != len(specs):
            raise UserError(f"--weights '{text}': {len(weights)} weights for {len(specs)} annotators")
    for s, w in zip(specs, weights):
        if not math.isfinite(w) or (s.component.pairwise and w <= 0):
            raise UserError(f"--annotator '{s.text}': weight {w} must be finite"
                            + (" and > 0 (a pairwise annotator's weight scales a probability)"
                               if s.component.pairwise else ""))
    return weights


def resolve_pairing(pairing: str | None, specs: list, kind: str, path: Path):
    """'as-input' (annotations keep their pairing), 'pointwise', or a parsed pairing of alignpipe.feedback.pairing."""
    from alignpipe.feedback.pairing import PAIRINGS

    pairwise = [s for s in specs if s.component.pairwise]
    if kind == "annotations":
        if pairing is not None:
            raise UserError(f"--pairing {pairing}: {path} is an annotations dataset; its rows keep their "
                            f"pairing")
        return "as-input"
    pairing = pairing or ("all" if pairwise else "pointwise")
    if pairing == "pointwise":
        if pairwise:
            raise UserError(f"--pairing pointwise: pairwise annotator '{pairwise[0].text}' needs pairs "
                            f"(use --pairing {', '.join(PAIRINGS)})")
        return pairing
    if pairing.partition(",")[0].partition(":")[0] not in PAIRINGS:
        raise UserError(f"--pairing '{pairing}': unknown (known: pointwise, {', '.join(PAIRINGS)})")
    spec = PAIRINGS.parse(pairing)
    if spec.component.needs_rewards and len(pairwise) == len(specs):
        raise UserError(f"--pairing {spec.name}: needs a pointwise annotator (reward model, rule, ...) to rank "
                        f"the generations")
    return spec


def _check_generations(ds, path: Path) -> None:
    seen: dict = {}
    for i, key in enumerate(zip(ds["prompt_id"], ds["sample_index"])):
        if key in seen:
            raise UserError(f"{path}: rows {seen[key]} and {i} are both prompt_id {key[0]} sample {key[1]}")
        seen[key] = i


def _check_groups(groups: list, pairing: str, num_shards: int, shard_index: int, path: Path) -> list:
    """This process's contiguous block of prompts (block sizes differ by at most one); refuses empty work."""
    if pairing not in ("pointwise", "as-input") and all(len(g) < 2 for g in groups):
        raise UserError(f"{path}: every prompt has fewer than two generations, so --pairing {pairing} forms "
                        f"no pair; use --pairing pointwise or generate more samples per prompt")
    n = len(groups)
    if num_shards > n:
        raise UserError(f"--num-shards {num_shards}: more processes than the {n} prompts of {path}")
    return groups[shard_index * n // num_shards: (shard_index + 1) * n // num_shards]


def _summary(out, annotators, groups_count: int, pairing: str) -> dict:
    abstained: dict = {a.name: 0 for a in annotators}
    reasons: dict = {a.name: [] for a in annotators}
    for raw in out["raw"]:
        for r in raw:
            if r["abstained"] or r["reason"]:
                abstained[r["name"]] += int(bool(r["abstained"]))
                if r["reason"] and r["reason"] not in reasons[r["name"]] and len(reasons[r["name"]]) < 5:
                    reasons[r["name"]].append(r["reason"])
    prompts = len(set(out["prompt_id"]))
    report = {"rows": len(out), "prompts": groups_count, "prompts_without_rows": groups_count - prompts,
              "pairing": pairing, "abstentions": abstained, "abstention_reasons": reasons}
    return {**report, **_verifier_summary(out, annotators)}


def _verifier_summary(out, annotators) -> dict:
    """Verifiers: answers with nothing parseable (`unparsed`, per verifier) and, for one verifier alone, the
    fraction of answers it found correct (`accuracy`)."""
    from alignpipe.feedback.annotators.verifiers import NO_ANSWER

    verifiers = [a for a in annotators if a.describe().get("verifier")]
    if not verifiers:
        return {}
    unparsed = {a.name: 0 for a in verifiers}
    correct, scored = 0, 0
    for raw in out["raw"]:
        for r in raw:
            if r["name"] in unparsed:
                for score, side in ((r["score1"], 1), (r["score2"], 2)):
                    if score is None:
                        continue
                    unparsed[r["name"]] += NO_ANSWER in (r["reason"] or "") and side == 1
                    if len(annotators) == 1:
                        scored += 1
                        correct += score == verifiers[0].correct
    out_ = {"unparsed": unparsed}
    if len(annotators) == 1 and scored:
        out_["accuracy"] = correct / scored
    return out_


@handle_errors
def command(
    ctx: typer.Context,
    input: Annotated[Path, typer.Argument(
        help="generations (from `alignpipe generate`) or annotations to re-judge.")],
    out: OutOpt,
    annotator: Annotated[list[str], typer.Option(
        "--annotator", "-a",
        help="NAME[:ARG][,key=value...] (repeatable); any takes ,weight=W. Known:\n\n\b\n" + help_text())],
    weights: Annotated[str | None, typer.Option(help="Weights of the annotators in order: 1,0.5.")] = None,
    pairing: Annotated[str | None, typer.Option(
        help="pointwise | all | random | best-worst | margin:X (default: all if an annotator is pairwise, else "
             "pointwise).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of --pairing random.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per forward of local models.")] = 8,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16 for local models.")] = "float32",
    device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N | auto.")] = "auto",
    cache_dir: Annotated[Path | None, typer.Option(
        help="HTTP judge response cache (default ~/.cache/alignpipe/http).")] = None,
    shard_size: Annotated[int, typer.Option(min=1, help="Prompts per checkpointed shard.")] = 64,
    num_shards: Annotated[int | None, typer.Option(help="Processes splitting the prompts.")] = None,
    shard_index: Annotated[int | None, typer.Option(
        help="This process's block (these two default to WORLD_SIZE and RANK).")] = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
):
    """Rewards and preferences from reward models, LM judges, HTTP judges, rules and your functions."""
    runtime = Runtime(device=device, dtype=dtype, batch_size=batch_size, cache_dir=cache_dir)
    say(run(input, out, annotator or [], weights=weights, pairing=pairing, seed=seed, runtime=runtime,
            shard_size=shard_size, num_shards=num_shards, shard_index=shard_index,
            config=resolved_config(ctx, drop=("force", "config", "out", "cache_dir")), force=force))


def run(input: Path, out: Path, annotator: list[str], *, weights: str | None, pairing: str | None, seed: int,
        runtime: Runtime, shard_size: int, num_shards: int | None, shard_index: int | None, config: dict,
        force: bool) -> str:
    """The stage around the core: parse and check, shard over prompts (resumable), atomic output; returns
    the line to print."""
    from alignpipe.data.io import read_input
    from alignpipe.data.output import StageOutput, map_shards, part_path, process_shard
    from alignpipe.feedback.annotators import build, parse_spec, spec_inputs
    from alignpipe.feedback.annotators.shaping import component_means

    specs = [parse_spec(s) for s in annotator]
    if not specs:
        raise UserError("annotate: give at least one --annotator (known: " + ", ".join(ANNOTATORS) + ")")
    weights_ = parse_weights(weights, specs)
    num_shards, shard_index = process_shard(num_shards, shard_index)
    ds, kind = read_input(input, ("generations", "annotations"), stage="annotate")
    pairing_ = resolve_pairing(pairing, specs, kind, input)
    name = pairing_ if isinstance(pairing_, str) else pairing_.identity()
    if kind == "generations":
        _check_generations(ds, input)
    keys = ds["prompt_id"] if kind == "generations" else [str(i) for i in range(len(ds))]
    groups = _check_groups(group_by_prompt(keys), name, num_shards, shard_index, input)
    inputs = [input] + [p for s in specs for p in spec_inputs(s)]
    target = part_path(out, num_shards, shard_index) if num_shards > 1 else out
    cfg = {**config, "pairing": name, "weights": weights_, "annotator": [s.identity() for s in specs]}
    so = StageOutput(target, stage="annotate", kind="annotations", config=cfg, inputs=inputs, force=force)
    if so.up_to_date():
        return up_to_date_line("annotate", target)
    annotators = [build(s, runtime) for s in specs]

    def fn(part, index):
        rows = [i for g in part["rows"] for i in g]
        return annotate(ds.select(rows), kind, annotators, weights_, pairing_, seed, row_ids=rows)

    with so:
        result = map_shards(so, _groups_dataset(groups), fn, shard_size, desc="annotate")
        so.report = {**_summary(result, annotators, len(groups), name), "weights": weights_,
                     "components": component_means(result, annotators, weights_),
                     "combination": COMBINATION, "annotators": [a.describe() for a in annotators], **so.report}
        so.finish(result)
    return f"annotate: {len(result)} rows ({name}) from {len(groups)} prompts -> {target}"


def _groups_dataset(groups: list[list[int]]):
    from datasets import Dataset, Features, List, Value

    return Dataset.from_dict({"rows": groups}, features=Features({"rows": List(Value("int64"))}))
