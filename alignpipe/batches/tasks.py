"""Batch tasks: turning feedback rows into training examples. One function per task, one registry table.

Every input kind is first normalised (`rows_of`) into annotation-shaped rows: a prompt, response1 and an
optional response2 (a pair row), rewards, labels, `preference` = P(response1 preferred) and a weight per
generation (1.0 when the input has none). A task function then turns rows into *examples*: text-level dicts
with the batch schema's names, where response1 is the chosen (or only) response and response2 the rejected.

    sft        the target: `reference` (prompts), the generation (generations), the chosen response of a
               pair (preference >= 0.5, else the higher reward), or the best-rewarded generation of a prompt
    reward     pairs ordered chosen/rejected with margin = reward1 - reward2 (0 when a reward is unknown)
    pointwise  desirable/undesirable generations: `response1_label`, else reward vs --threshold
               (median | mean | VALUE; equal to it = tie); a pair row gives chosen=desirable, rejected=not
    pairwise   pair rows ordered by preference (0.5 = tie); generations of one prompt paired by --pairs

Ties (preference exactly 0.5, equal rewards) are dropped and counted; so are empty responses. Pairing of a
prompt's generations: `alignpipe.feedback.pairing` (the one implementation `annotate` uses too; random choices
depend only on the seed and the prompt id).
"""
from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from alignpipe.core.errors import UserError

_ANNOTATE = "`alignpipe annotate`"
_FIELDS = ("prompt_id", "prompt", "messages", "iteration", "response1", "response1_sample_index",
           "response1_reward", "response1_label", "response2", "response2_sample_index", "response2_reward",
           "preference")


@dataclass(frozen=True)
class TaskOptions:
    pairs: str = "best-worst"  # how generations of one prompt are paired: an alignpipe.feedback.pairing spec
    threshold: str = "median"  # pointwise: median | mean | a number
    seed: int = 0
    advantage: str = "grpo"  # group: an alignpipe.batches.advantages estimator spec
    equal_groups: str = "drop"  # group: drop | keep groups whose rewards are all equal


# ------------------------------------------------------------------------------------------ input rows
def rows_of(ds, kind: str, where: str, counts: Counter, extra: tuple[str, ...] = ()) -> list[dict]:
    """Annotation-shaped rows (with weights and generation tags) of a prompts/generations/annotations/weighted
    dataset; held-out prompts (split != 'train') are skipped and counted. Validates every row. `extra`:
    further annotation columns a task reads (null when the dataset has none)."""
    if kind == "prompts":
        rows = []
        for i, r in enumerate(ds.select_columns(["prompt_id", "prompt", "messages", "reference", "split"])):
            if r["split"] != "train" or r["reference"] is None:
                counts["held_out_skipped" if r["split"] != "train" else "no_reference_skipped"] += 1
                continue
            rows.append(_row(i, r, response1=r["reference"], tag1="ref"))
    elif kind == "generations":  # a sample cut at max_new_tokens did not end: no end token is appended
        cols = ["prompt_id", "prompt", "messages", "iteration", "response", "sample_index", "finish_reason"]
        rows = [_row(i, r, response1=r["response"], response1_sample_index=r["sample_index"],
                     _open1=r["finish_reason"] == "length") for i, r in enumerate(ds.select_columns(cols))]
    else:
        cols = list(_FIELDS) + ["response1_finish_reason", "response2_finish_reason"]
        cols += ["response1_weight", "response2_weight"] if kind == "weighted" else []
        have = [c for c in extra if c in ds.column_names]
        rows = [{**_row(i, r), **{c: r.get(c) for c in extra}} for i, r in enumerate(ds.select_columns(cols + have))]
    for row in rows:
        _check_row(row, f"{where} row {row['_row']}", weighted=kind == "weighted")
    return rows


def _row(i: int, r: dict, tag1: str | None = None, **override) -> dict:
    row = {k: r.get(k) for k in _FIELDS}
    for k in (1, 2):  # a response cut at max_new_tokens did not end: no end token is appended
        row[f"_open{k}"] = r.get(f"response{k}_finish_reason") == "length"
    row.update(override)
    row["iteration"] = row["iteration"] or 0
    pair = row["response2"] is not None
    row["response1_weight"] = r.get("response1_weight", 1.0)
    row["response2_weight"] = r.get("response2_weight", 1.0 if pair else None)
    row["_row"] = i
    row["_tag1"] = tag1 or f"{row['iteration']}.{row['response1_sample_index']}"
    row["_tag2"] = f"{row['iteration']}.{row['response2_sample_index']}" if pair else None
    return row


def _finite(value) -> bool:
    return value is None or math.isfinite(value)


def _check_row(row: dict, at: str, weighted: bool) -> None:
    if not (row["prompt"] or "").strip() and not row["messages"]:
        raise UserError(f"{at}: empty prompt (prompt_id {row['prompt_id']!r})")
    pair = row["response2"] is not None
    for k in (1, 2) if pair else (1,):
        col = f"response{k}_weight"
        w = row[col]
        if w is None or not math.isfinite(w) or w < 0:
            raise UserError(f"{at}: column '{col}' is {w}; weights must be finite and >= 0"
                            + (" (written by `alignpipe reweight`)" if weighted else ""))
        if not _finite(row[f"response{k}_reward"]):
            raise UserError(f"{at}: column 'response{k}_reward' is {row[f'response{k}_reward']} (not finite)")
    p = row["preference"]
    if p is not None and not (math.isfinite(p) and 0.0 <= p <= 1.0):
        raise UserError(f"{at}: column 'preference' is {p}; a probability must be in [0, 1]")
    if not pair and p is not None:
        raise UserError(f"{at}: mismatched pair: 'preference' is {p} but 'response2' is null")
    if pair and (row["response2_sample_index"] is None or row["_tag1"] == row["_tag2"]):
        raise UserError(f"{at}: mismatched pair ids: response1_sample_index {row['response1_sample_index']} and "
                        f"response2_sample_index {row['response2_sample_index']} must be two different samples")


def _empty(text) -> bool:
    return text is None or not text.strip()


def usable(rows: list[dict], counts: Counter) -> list[dict]:
    """Rows whose responses are non-empty; the others are dropped and counted."""
    keep = []
    for row in rows:
        if _empty(row["response1"]) or (row["_tag2"] is not None and _empty(row["response2"])):
            counts["empty_response_dropped"] += 1
        else:
            keep.append(row)
    return keep


# ------------------------------------------------------------------------------------------- examples
def _gen(row: dict, k: int) -> dict:
    return {"text": row[f"response{k}"], "reward": row[f"response{k}_reward"], "weight": row[f"response{k}_weight"],
            "tag": row[f"_tag{k}"], "open": row.get(f"_open{k}", False)}


def _example(row: dict, gens: list[dict], suffix: str = "", **extra) -> dict:
    ex = {"example_id": f"{row['prompt_id']}/" + "-".join(g["tag"] for g in gens) + suffix,
          "prompt_id": row["prompt_id"], "prompt": row["prompt"], "messages": row["messages"] or [],
          "_row": row["_row"]}
    for k, g in enumerate(gens, 1):
        ex.update({f"response{k}": g["text"], f"response{k}_weight": float(g["weight"]),
                   f"response{k}_reward": g["reward"], f"_open{k}": g["open"]})
    ex.update(extra)
    return ex


def _pair_order(row: dict, at: str) -> tuple[int, int] | None:
    """(chosen, rejected) response numbers of a pair row, or None for a tie (preference 0.5, equal rewards)."""
    p, r1, r2 = row["preference"], row["response1_reward"], row["response2_reward"]
    if p is None:
        if r1 is None or r2 is None:
            raise UserError(f"{at}: pair row has no 'preference' and no 'response{1 if r1 is None else 2}_reward'; "
                            f"preferences and rewards are written by {_ANNOTATE}")
        p = 0.5 if r1 == r2 else float(r1 > r2)
    if p == 0.5:
        return None
    return (1, 2) if p > 0.5 else (2, 1)


def _groups(rows: list[dict], where: str) -> dict[str, list[dict]]:
    """Pointwise rows grouped by prompt_id (first-seen order); a prompt_id must name one prompt and each
    generation may appear once."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        group = groups.setdefault(row["prompt_id"], [])
        if group and (group[0]["prompt"], group[0]["messages"]) != (row["prompt"], row["messages"]):
            raise UserError(f"{where} rows {group[0]['_row']} and {row['_row']}: same prompt_id "
                            f"{row['prompt_id']!r} but different prompts")
        twin = next((g for g in group if g["_tag1"] == row["_tag1"]), None)
        if twin is not None:
            raise UserError(f"{where} rows {twin['_row']} and {row['_row']}: mismatched ids: the same generation "
                            f"(prompt_id {row['prompt_id']!r}, iteration.sample_index {row['_tag1']}) twice")
        group.append(row)
    return groups


def _need_reward(row: dict, where: str, why: str) -> float:
    if row["response1_reward"] is None:
        raise UserError(f"{where} row {row['_row']}: column 'response1_reward' is null; {why} needs rewards "
                        f"(written by {_ANNOTATE})")
    return row["response1_reward"]


# ---------------------------------------------------------------------------------------------- pairing
def _pair_group(group: list[dict], opts: TaskOptions, where: str, counts: Counter) -> list[tuple[dict, dict]]:
    """(chosen, rejected) generations of one prompt's pointwise rows, by the --pairs pairing
    (`alignpipe.feedback.pairing`, generations in sample-index order); pairs of equal rewards are ties, dropped."""
    from alignpipe.feedback.pairing import PAIRINGS, pairs

    rewards = [_need_reward(row, where, f"pairing generations by --pairs {opts.pairs}") for row in group]
    if len(group) < 2:
        counts["single_generation_prompts"] += 1
        return []
    spec = PAIRINGS.parse(opts.pairs, flag="--pairs")
    order = sorted(range(len(group)), key=lambda k: (group[k]["iteration"], group[k]["response1_sample_index"]
                                                     if group[k]["response1_sample_index"] is not None else -1))
    candidates = [(order[a], order[b]) for a, b in pairs(spec, [rewards[k] for k in order], opts.seed,
                                                         group[0]["prompt_id"])]
    if spec.name == "margin":
        counts["below_margin_dropped"] += len(group) * (len(group) - 1) // 2 - len(candidates)
    out = []
    for a, b in candidates:
        if rewards[a] == rewards[b]:
            counts["ties_dropped"] += 1
        else:
            hi, lo = (a, b) if rewards[a] > rewards[b] else (b, a)
            out.append((_gen(group[hi], 1), _gen(group[lo], 1)))
    return out


def _pairs(rows: list[dict], where: str, opts: TaskOptions, counts: Counter) -> list[dict]:
    """Pair examples (response1 chosen): pair rows by preference, pointwise rows grouped by prompt."""
    out, pointwise = [], []
    for row in usable(rows, counts):
        if row["_tag2"] is None:
            pointwise.append(row)
            continue
        order = _pair_order(row, f"{where} row {row['_row']}")
        if order is None:
            counts["ties_dropped"] += 1
        else:
            out.append(_example(row, [_gen(row, order[0]), _gen(row, order[1])]))
    for group in _groups(pointwise, where).values():
        out += [_example(group[0], [c, r]) for c, r in _pair_group(group, opts, where, counts)]
    return out


# ------------------------------------------------------------------------------------------------ tasks
def sft_examples(rows: list[dict], where: str, opts: TaskOptions, counts: Counter) -> list[dict]:
    out, pointwise = [], []
    for row in usable(rows, counts):
        if row["_tag2"] is None:
            pointwise.append(row)
            continue
        p, r1, r2 = row["preference"], row["response1_reward"], row["response2_reward"]
        if p is None and (r1 is None or r2 is None):
            _pair_order(row, f"{where} row {row['_row']}")  # raises, naming the missing column
        first = p >= 0.5 if p is not None else r1 >= r2
        out.append(_example(row, [_gen(row, 1 if first else 2)]))
    for group in _groups(pointwise, where).values():
        scored = [row for row in group if row["response1_reward"] is not None]
        if scored:  # best of n
            best = max(scored, key=lambda row: row["response1_reward"])
            counts["best_of_n_dropped"] += len(group) - 1
            out.append(_example(best, [_gen(best, 1)]))
            continue
        for row in group:
            if row["response1_label"] is False:
                counts["undesirable_dropped"] += 1
            else:
                out.append(_example(row, [_gen(row, 1)]))
    return out


def reward_examples(rows: list[dict], where: str, opts: TaskOptions, counts: Counter) -> list[dict]:
    out = _pairs(rows, where, opts, counts)
    for ex in out:
        r1, r2 = ex["response1_reward"], ex["response2_reward"]
        ex["margin"] = r1 - r2 if r1 is not None and r2 is not None else 0.0
    return out


def pairwise_examples(rows: list[dict], where: str, opts: TaskOptions, counts: Counter) -> list[dict]:
    return _pairs(rows, where, opts, counts)


def parse_threshold(spec: str) -> str | float:
    if spec in ("median", "mean"):
        return spec
    try:
        value = float(spec)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        raise UserError(f"--threshold '{spec}': expected median, mean or a finite number")
    return value


def pointwise_examples(rows: list[dict], where: str, opts: TaskOptions, counts: Counter) -> list[dict]:
    out, pending = [], []
    for row in usable(rows, counts):
        if row["_tag2"] is not None:
            order = _pair_order(row, f"{where} row {row['_row']}")
            if order is None:
                counts["ties_dropped"] += 1
                continue
            out.append(_example(row, [_gen(row, order[0])], "/chosen", response1_label=True))
            out.append(_example(row, [_gen(row, order[1])], "/rejected", response1_label=False))
        elif row["response1_label"] is not None:
            out.append(_example(row, [_gen(row, 1)], response1_label=bool(row["response1_label"])))
        else:
            _need_reward(row, where, "a pointwise example without 'response1_label'")
            pending.append(row)
    if pending:
        rewards = [row["response1_reward"] for row in pending]
        t = parse_threshold(opts.threshold)
        t = statistics.median(rewards) if t == "median" else statistics.fmean(rewards) if t == "mean" else t
        counts["threshold_value"] = t
        for row, r in zip(pending, rewards):
            if r == t:
                counts["ties_dropped"] += 1
            else:
                out.append(_example(row, [_gen(row, 1)], response1_label=r > t))
    return out


def group_examples(rows: list[dict], where: str, opts: TaskOptions, counts: Counter) -> list[dict]:
    """The group task (alignpipe.batches.group): advantages by the --advantage estimator within each group."""
    from alignpipe.batches import advantages, group

    if advantages.ADVANTAGES.parse(opts.advantage).component.meta.get("per_token"):
        # gae: per-token advantages from a critic after tokenising (alignpipe.batches.gae); a critic's baseline
        # makes every answer informative, so groups of equal rewards are kept (still counted)
        return group.group_examples(rows, where, lambda groups: [[0.0] * len(g) for g in groups], "keep", counts)
    return group.group_examples(rows, where, advantages.estimator(opts.advantage), opts.equal_groups, counts)


@dataclass(frozen=True)
class TaskSpec:
    fn: Callable  # fn(rows, where, opts, counts) -> examples
    kind: str  # output dataset kind
    input_kinds: tuple[str, ...]
    num_responses: int  # responses per example (sequences per example in a forward)
    doc: str
    extra: tuple[str, ...] = ()  # annotation columns the task reads beyond the usual ones


_FEEDBACK = ("weighted", "annotations")
TASKS: dict[str, TaskSpec] = {
    "sft": TaskSpec(sft_examples, "batches-sft", _FEEDBACK + ("prompts", "generations"), 1,
                    "prompt + target (reference, chosen response of a pair, or best-rewarded generation)"),
    "reward": TaskSpec(reward_examples, "batches-reward", _FEEDBACK, 2,
                       "chosen/rejected pairs with their reward margin (Bradley-Terry reward model)"),
    "pointwise": TaskSpec(pointwise_examples, "batches-pointwise", _FEEDBACK, 1,
                          "desirable/undesirable generations, from labels or rewards vs --threshold (KTO)"),
    "pairwise": TaskSpec(pairwise_examples, "batches-pairwise", _FEEDBACK, 2,
                         "chosen/rejected pairs: preference, or generations paired by --pairs (DPO family)"),
    "group": TaskSpec(group_examples, "batches-group", _FEEDBACK, 1,
                      "one example per sampled answer with its advantage within its prompt's group (--advantage), "
                      "sampled token ids and per-token behaviour log-probs (policy-gradient losses)",
                      ("response1_token_ids", "response1_token_logps")),
}


def task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise UserError(f"--task '{name}': unknown (known: {', '.join(TASKS)})")
    return TASKS[name]


def make_examples(ds, kind: str, spec: TaskSpec, where: str, opts: TaskOptions) -> tuple[list[dict], Counter]:
    """The examples of one input dataset for a task, and the counts of what was skipped or dropped."""
    counts: Counter = Counter()
    examples = spec.fn(rows_of(ds, kind, where, counts, spec.extra), where, opts, counts)
    seen: dict[str, int] = {}
    for ex in examples:
        ex["_at"] = f"{where} row {ex['_row']}"
        if ex["example_id"] in seen:
            raise UserError(f"{where} rows {seen[ex['example_id']]} and {ex['_row']}: mismatched ids: example "
                            f"{ex['example_id']!r} twice (the same prompt_id and sample indices)")
        seen[ex["example_id"]] = ex["_row"]
    return examples, counts
