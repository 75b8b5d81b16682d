"""The `group` batch task of online RL: one example per sampled answer, its advantage from its group.

A group is the answers sampled for one prompt in one iteration (pointwise annotation rows with the same
prompt_id and iteration). Each example carries what a token-level policy-gradient step needs:

    response1_input_ids           the answer's token ids exactly as sampled (not re-tokenised; EOS included
                                  when it was sampled)
    response1_behaviour_logps     the sampling policy's log-prob of each of those tokens
    response1_reward              the annotator's reward
    response1_advantage           the estimator's advantage (`alignpipe.batches.advantages`, from the group)
    response1_weight              the per-answer training weight (reweight; 1 without)
    response1_values, _returns,   --advantage gae (PPO): the critic's per-token values, GAE returns and
    response1_token_advantages    per-token advantages, filled after tokenising (`alignpipe.batches.gae`)

Answers without a reward (an abstaining annotator) are dropped and counted (`unscored`); groups whose rewards
are all equal are dropped and counted (`equal_groups`, DAPO's dynamic sampling) or kept with
`--equal-groups keep`. Data without per-token behaviour log-probs (imported, or generated before schema
1.3) is an error naming the row: the importance ratio needs them.
"""
from __future__ import annotations

from collections import Counter

from alignpipe.core.errors import UserError


def _group_key(row: dict) -> tuple:
    return (row["iteration"] or 0, row["prompt_id"])


def _check(row: dict, where: str) -> None:
    at = f"{where} row {row['_row']} (prompt_id {row['prompt_id']})"
    ids, logps = row.get("response1_token_ids"), row.get("response1_token_logps")
    if ids is None or logps is None:
        missing = "response1_token_ids" if ids is None else "response1_token_logps"
        raise UserError(f"{at}: column '{missing}' is null; the group task needs the answers' sampled token ids and "
                        "per-token behaviour log-probs (list<int32>, list<float32>), written by `alignpipe generate` "
                        "(schema >= 1.3) and carried by `alignpipe annotate`")
    if len(ids) != len(logps) or not ids:
        raise UserError(f"{at}: response1_token_ids has {len(ids)} tokens but response1_token_logps "
                        f"{len(logps)} values; expected the same non-zero number")


def group_examples(rows: list[dict], where: str, advantage, equal_groups: str, counts: Counter) -> list[dict]:
    """Examples of the group task from pointwise rows. `advantage(groups) -> advantages` is the parsed
    estimator (`alignpipe.batches.advantages`); `equal_groups` is drop | keep. Counts: unscored, equal_groups,
    groups, pair_rows_skipped."""
    from alignpipe.batches.advantages import split_equal_groups

    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("response2") is not None:
            counts["pair_rows_skipped"] += 1
            continue
        if row["response1_reward"] is None:
            counts["unscored"] += 1
            continue
        _check(row, where)
        groups.setdefault(_group_key(row), []).append(row)
    keys = list(groups)
    rewards = [[float(r["response1_reward"]) for r in groups[k]] for k in keys]
    kept, equal = split_equal_groups(rewards, equal_groups)
    counts["groups"] += len(keys)
    counts["equal_groups"] += equal
    counts["equal_groups_dropped"] += len(keys) - len(kept)
    advantages = advantage([rewards[i] for i in kept]) if kept else []
    out = []
    for i, adv in zip(kept, advantages):
        for row, a in zip(groups[keys[i]], adv):
            out.append({
                "example_id": f"{row['prompt_id']}/{row['iteration'] or 0}.{row['response1_sample_index']}",
                "prompt_id": row["prompt_id"], "prompt": row["prompt"], "messages": row["messages"] or [],
                "response1": row["response1"], "response1_weight": float(row["response1_weight"]),
                "response1_reward": float(row["response1_reward"]), "response1_advantage": float(a),
                "response1_group_size": len(adv), "_ids1": list(row["response1_token_ids"]),
                "response1_behaviour_logps": [float(v) for v in row["response1_token_logps"]], "_row": row["_row"],
            })
    return out


def trim_to_ids(examples: list[dict]) -> None:
    """After truncation (batching.tokenise), cut each example's per-token columns to its response ids."""
    for ex in examples:
        n = len(ex["response1_input_ids"])
        ex["response1_behaviour_logps"] = ex["response1_behaviour_logps"][:n]
        if ex.get("response1_ref_logps") is not None:
            ex["response1_ref_logps"] = ex["response1_ref_logps"][:n]
