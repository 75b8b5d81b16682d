"""What the report shows of a run: a human label for every figure of the per-policy summary, the kind of run
(RL with a verifier, or preference learning), the panels that fit that kind (report.png and report.html's
charts draw the same ones; a panel without data is left out) and a headline of what the run achieved.

Summary keys (one row per policy K, see alignpipe.report.layout): held-out figures of policy K's answers
(`mean_reward`, `accuracy`, `greedy_accuracy`, `response_tokens`, `kl`, `win_rate_vs_0`), figures of the
training iteration that made policy K (`train_*` but `train_reward`, `reward_accuracy`, `steps`), and
`train_reward`: the mean reward of the training answers policy K sampled (for iteration K+1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from alignpipe.data.manifest import read_manifest
from alignpipe.report.layout import Layout

LABELS = {
    "policy": "policy",
    "greedy_accuracy": "greedy accuracy (held-out)",
    "accuracy": "sampled accuracy (held-out)",
    "mean_reward": "mean reward (held-out)",
    "win_rate_vs_0": "win rate vs policy 0 (held-out)",
    "accuracy_vs_0": "accuracy, judged with policy 0 (held-out)",
    "response_tokens": "answer length, tokens (held-out)",
    "kl": "KL to the start model, nats per answer (held-out)",
    "train_reward": "training reward (answers it sampled)",
    "train_loss": "training loss",
    "reward_accuracy": "implicit-reward pair accuracy (training)",
    "train_logratio": "log-ratio to the reference, nats per answer (training)",
    "train_z0": "KTO reference point z0 (training)",
    "train_kl": "KL to the reference per token, k3 (training)",
    "train_entropy": "entropy per token (training)",
    "train_entropy_estimate": "entropy estimate per token (training)",
    "train_clip_fraction": "clipped fraction of tokens (training)",
    "steps": "training steps",
}
NOT_PLOTTED = {"policy", "steps"}


def label(key: str) -> str:
    """The words a reader sees for a summary key (the key itself, spaced, when it has no label)."""
    return LABELS.get(key) or key.replace("_", " ")


def is_probability(key: str) -> bool:
    return "accuracy" in key or "rate" in key


@dataclass
class Panel:
    """One chart: a title and its series (legend -> summary key), on [0, 1] with chance marked or free."""

    title: str
    series: dict[str, str]
    unit: bool = False
    chance: float | None = None
    points: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


RL_PANELS = [
    Panel("held-out accuracy", {"greedy": "greedy_accuracy", "sampled": "accuracy"}, unit=True),
    Panel(label("mean_reward"), {"mean reward": "mean_reward"}),
    Panel("training reward of the answers each policy sampled", {"reward": "train_reward"}),
    Panel(label("response_tokens"), {"tokens": "response_tokens"}),
    Panel(label("kl"), {"KL": "kl"}),
    Panel("entropy per token (training)", {"entropy": "train_entropy", "estimate": "train_entropy_estimate"}),
    Panel(label("train_clip_fraction"), {"clipped": "train_clip_fraction"}),
    Panel(label("train_kl"), {"k3": "train_kl"}),
]
PREFERENCE_PANELS = [
    Panel(label("mean_reward"), {"mean reward": "mean_reward"}),
    Panel(label("win_rate_vs_0"), {"win rate": "win_rate_vs_0"}, unit=True, chance=0.5),
    Panel("training reward of the answers each policy sampled", {"reward": "train_reward"}),
    Panel(label("response_tokens"), {"tokens": "response_tokens"}),
    Panel(label("kl"), {"KL": "kl"}),
    Panel(label("train_loss"), {"loss": "train_loss"}),
    Panel(label("reward_accuracy"), {"accuracy": "reward_accuracy"}, unit=True, chance=0.5),
    Panel(label("train_logratio"), {"log-ratio": "train_logratio"}),
    Panel(label("train_z0"), {"z0": "train_z0"}),
]


def run_kind(lay: Layout) -> str:
    """`rl` when a policy was trained with a token-level policy-gradient loss or the held-out evaluation has
    greedy scores (pipelines/rl.mk), else `preference`."""
    from alignpipe.training.losses import LOSSES

    for folder in lay.policies.values():
        name = str(((read_manifest(folder) or {}).get("config") or {}).get("loss") or "").split(",")[0]
        if name in LOSSES and LOSSES[name].task == "group":
            return "rl"
    return "rl" if any((f / "greedy-scores").is_dir() for f in lay.evals.values()) else "preference"


def panels(rows: list[dict], kind: str) -> list[Panel]:
    """The charts that fit a run of `kind`, each with its points; then one chart per other figure with data.
    An RL run's policy-gradient loss is no measure of progress and gets none."""
    skip = NOT_PLOTTED | ({"train_loss", "win_rate_vs_0", "accuracy_vs_0"} if kind == "rl" else set())
    out, used = [], set(skip)
    for p in RL_PANELS if kind == "rl" else PREFERENCE_PANELS:
        used |= set(p.series.values())
        points = {name: [(r["policy"], r[key]) for r in rows if r.get(key) is not None] for name, key in p.series.items()}
        if any(points.values()):
            out.append(Panel(p.title, p.series, p.unit, p.chance, {k: v for k, v in points.items() if v}))
    for key in dict.fromkeys(k for r in rows for k in r):
        pts = [(r["policy"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r.get(key) is not None]
        if key not in used and pts:
            prob = is_probability(key) and all(0 <= v <= 1 for _, v in pts)
            out.append(Panel(label(key), {key: key}, prob, None, {key: pts}))
    return out


def _config(folder: Path | None, key: str):
    value = ((read_manifest(folder) or {}).get("config") or {}).get(key) if folder else None
    return ", ".join(map(str, value)) if isinstance(value, list) else value


def _task(lay: Layout) -> str:
    """`the prompts of SOURCE`, from the import manifest (empty when the run has none)."""
    inputs = (read_manifest(lay.run / "prompts") or {}).get("inputs") or []
    return f"prompts of {Path(inputs[0]['path']).name}" if inputs else ""


def describe(lay: Layout) -> str:
    """What the run did, in one sentence: loss, iterations, start model, prompts, reward."""
    first = lay.iterations.get(1)
    policy = next(iter(lay.policies.values()), None)
    loss = _config(policy, "loss")
    advantage = _config(first / "batches", "advantage") if first and (first / "batches").is_dir() else None
    start = _config(lay.evals[0] / "generations", "policy") if 0 in lay.evals else _config(policy, "policy")
    reward = _config(first / "annotations", "annotator") if first else None
    judge = _config(lay.evals[0] / "scores", "annotator") if 0 in lay.evals else None
    held = (read_manifest(lay.evals[0] / "generations") or {}).get("report", {}).get("prompts") if 0 in lay.evals else None
    n = len(lay.policies)
    parts = [f"{n} training iteration{'s' * (n != 1)}" + (f" of {loss}" if loss else ""),
             f"with {advantage} advantages" if advantage else "", f"from {start}" if start else "",
             f"on the {_task(lay)}" if _task(lay) else "", f"rewarded by {reward}" if reward else ""]
    text = " ".join(p for p in parts if p)
    if held:
        text += f"; evaluated on {held} held-out prompts" + (f" by {judge}" if judge else "")
    return text + "."


HEADLINE = {"greedy_accuracy": "greedy accuracy", "accuracy": "sampled accuracy", "mean_reward": "mean reward",
            "win_rate_vs_0": "win rate vs policy 0"}


def achieved(rows: list[dict]) -> str:
    """The run's main figures in one sentence: the first two of greedy accuracy, sampled accuracy, mean reward
    and win rate from the first policy to the last (and the best policy where it is not the last), then the
    last policy's KL to the start model."""
    parts = []
    for key, words in HEADLINE.items():
        pts = [(r["policy"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if not pts or len(parts) == 2:
            continue
        (k0, v0), (k1, v1), best = pts[0], pts[-1], max(pts, key=lambda p: p[1])
        text = f"{words} {v0:.3g} (policy {k0}) \u2192 {v1:.3g} (policy {k1})" if k0 != k1 else \
            f"{words} {v1:.3g} (policy {k1})"
        parts.append(text + (f", best {best[1]:.3g} at policy {best[0]}" if best[1] > v1 else ""))
    kl = [(r["policy"], r["kl"]) for r in rows if isinstance(r.get("kl"), (int, float))]
    if kl:
        parts.append(f"KL to the start model {kl[-1][1]:.3g} nats per answer (policy {kl[-1][0]})")
    return "; ".join(parts) + "." if parts else ""
