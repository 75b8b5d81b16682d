"""The per-policy table of an RL run folder (pipelines/rl.mk), as Markdown on stdout.

    python -m alignpipe.report.rl_table runs/demo-rl > runs/demo-rl/report/rl-table.md

One row per evaluated policy K (0 = the start model): held-out accuracy greedy and over the sampled answers
(temperature 1), the mean reward of the training answers policy K sampled (for iteration K+1; the same row as
`train_reward` in summary.md), the mean held-out answer length in tokens, KL(policy K || policy 0) on its
held-out answers (nats per answer), the equal-reward groups dropped from policy K's training answers, the mean
lag of the answers that trained policy K (0 sequential, K under OFF_POLICY=K from iteration K+1 on), the
stage seconds of iteration K, which trained policy K (generate, annotate, build-batches, train, and the critic's
train under ALGO=ppo), and of
policy K's evaluation.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _manifest(path: Path) -> dict:
    f = path / "manifest.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def _mean(path: Path, column: str) -> float | None:
    if not (path / "manifest.json").is_file():
        return None
    from alignpipe.data.io import _load

    values = [v for v in _load(path)[column] if v is not None]
    return sum(values) / len(values) if values else None


def _seconds(*paths: Path) -> float:
    return sum(_manifest(p).get("seconds", 0.0) for p in paths)


def _lag(policy: Path) -> float | None:
    """The mean lag of the answers that trained `policy` (policies between sampler and trained; OFF_POLICY)."""
    lag = _manifest(policy).get("report", {}).get("staleness") or {}
    known = {int(k): n for k, n in lag.items() if k != "unknown"}
    return sum(k * n for k, n in known.items()) / sum(known.values()) if known else None


def rows(run: Path) -> list[dict]:
    from alignpipe.report.layout import layout

    lay, out = layout(run), []
    for k, ev in lay.evals.items():
        trained, sampled = lay.iterations.get(k), lay.sampled_by(k)
        dropped = None
        if sampled is not None:
            inputs = _manifest(sampled / "batches").get("report", {}).get("inputs") or [{}]
            dropped = inputs[0].get("equal_groups_dropped")
        out.append({
            "policy": k,
            "greedy_accuracy": _mean(ev / "greedy-scores", "response1_reward"),
            "sampled_accuracy": _mean(ev / "scores", "response1_reward"),
            "train_reward": _mean(sampled / "annotations", "response1_reward") if sampled else None,
            "answer_tokens": _mean(ev / "generations", "num_tokens"),
            "kl_to_start": _manifest(ev / "versus-0").get("report", {}).get("kl_vs_reference", 0.0 if k == 0 else None),
            "equal_groups_dropped": dropped,
            "lag": _lag(trained / "policy") if trained else None,
            "iteration_s": _seconds(*(trained / s for s in ("generations", "annotations", "batches", "policy",
                                                                   "critic")))
            if trained else 0.0,
            "eval_s": _seconds(*(ev / s for s in ("generations", "scores", "greedy-generations", "greedy-scores",
                                                  "versus-0"))),
        })
    return out


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def markdown(table: list[dict]) -> str:
    if not table:
        return "(no evaluated policies)\n"
    cols = list(table[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in cols) + " |" for r in table]
    total = sum(r["iteration_s"] + r["eval_s"] for r in table)
    return "\n".join(lines) + f"\n\nstage seconds in all: {total:.0f}\n"


if __name__ == "__main__":
    sys.stdout.write(markdown(rows(Path(sys.argv[1]))))
