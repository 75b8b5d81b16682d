"""How many policies behind the trained one the answers of a batches dataset were sampled (overlapped
iterations, `OFF_POLICY=K` in pipelines/rl.mk and online.mk), and `train --max-staleness N`.

The lag of an answer is the number of training iterations between the policy that sampled it and `--policy`
(the policy this train starts from): 0 when `--policy` itself sampled it (on-policy iterations), 1 when its
parent did, and so on. Both ends come from manifests: the behaviour policy is the policy input of each
`generate` output upstream of the batches (annotate and build-batches record their inputs), and the parents of
`--policy` are the policy inputs of the `train` outputs it descends from. An answer from a policy that is none
of these has an unknown lag (None).

The ratio pi_theta / mu of the group losses already corrects the gradient for the lag (the behaviour
log-probs are stored per token); the bound keeps that ratio from being taken over too many updates.
"""
from __future__ import annotations

from pathlib import Path

from alignpipe.core.errors import UserError
from alignpipe.data.manifest import fingerprint, read_manifest

MAX_DEPTH = 64


def generate_ancestors(path: Path) -> list[dict]:
    """The manifests of the `generate` outputs that `path` was made from (nearest first, each once)."""
    found, seen, todo = [], set(), [Path(path)]
    while todo and len(seen) < MAX_DEPTH:
        p = todo.pop(0)
        if str(p) in seen:
            continue
        seen.add(str(p))
        m = read_manifest(p)
        if not m:
            continue
        if m.get("stage") == "generate":
            found.append(m)
            continue
        if m.get("stage") == "train" and p != Path(path):
            continue  # a model the rows were computed with (PPO's critic), not data they came from
        todo += [Path(i["path"]) for i in m.get("inputs", []) if i.get("path")]
    return found


def policy_chain(policy: Path) -> list[str]:
    """Fingerprints of `policy`, its parent (the policy its train started from), grandparent, ..."""
    chain, path = [fingerprint(policy)], Path(policy)
    while len(chain) < MAX_DEPTH:
        m = read_manifest(path)
        if not m or m.get("stage") != "train" or len(m.get("inputs", [])) < 2:
            return chain
        parent = m["inputs"][1]
        chain.append(parent["fingerprint"])
        path = Path(parent["path"])
        if not path.exists() or fingerprint(path) != parent["fingerprint"]:
            return chain  # moved or replaced since: its own parents are unknown


def lags(batches: Path, policy: Path, num_rows: int) -> dict:
    """{lag or None: rows}: each generate output upstream of `batches` counts its rows (all of the batches'
    rows when there is one)."""
    sources = generate_ancestors(batches)
    chain = policy_chain(policy)
    out: dict = {}
    for m in sources:
        inputs = m.get("inputs", [])
        behaviour = inputs[1]["fingerprint"] if len(inputs) > 1 else None
        lag = chain.index(behaviour) if behaviour in chain else None
        rows = num_rows if len(sources) == 1 else int(m.get("num_rows") or 0)
        out[lag] = out.get(lag, 0) + rows
    return out


def check(found: dict, max_staleness: int | None, batches: Path) -> None:
    """--max-staleness N: every answer sampled at most N policies before --policy (one line naming the lag)."""
    if max_staleness is None:
        return
    if None in found:
        raise UserError(f"{batches}: {found[None]} rows were sampled by a policy that is neither --policy nor one "
                        f"of its ancestors (unknown lag); --max-staleness {max_staleness} needs it known")
    worst = max(found, default=0)
    if worst > max_staleness:
        raise UserError(f"{batches}: {found[worst]} rows were sampled {worst} policies before --policy (lag "
                        f"{worst} > --max-staleness {max_staleness})")


def summary(found: dict) -> dict:
    """The lag distribution for the manifest: {"0": rows, "1": rows, "unknown": rows}."""
    known = sorted(k for k in found if k is not None)
    return {**{str(k): found[k] for k in known}, **({"unknown": found[None]} if None in found else {})}
