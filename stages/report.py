"""report: figures across the iterations of a run folder: a self-contained HTML report, PNG plots and a
Markdown summary.

Reads the run layout the pipelines write:
    RUN/iter-K/{generations,annotations,weighted,batches,policy}   one online iteration (policy = policy K+1)
    RUN/eval/iter-K/{generations,scores,versus-0,...}               held-out evaluation of policy K
    RUN/{data,weighted,batches,policy}                              an offline recipe (one policy)
and writes RUN/report/{report.html, report.png, summary.md, summary.json}. Numeric figures that evaluation
stages report beyond the usual ones (accuracy, pass@k, ...) become extra columns.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated

import typer

from alignpipe.core.command import handle_errors, say
from alignpipe.core.errors import UserError
from alignpipe.data.manifest import read_manifest


def _iters(root: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in root.glob("iter-*") if p.name.split("-")[1].isdigit())


def _mean(path: Path, column: str) -> float | None:
    from alignpipe.data.io import _load

    if not (path / "manifest.json").exists():
        return None
    values = [v for v in _load(path)[column] if v is not None]
    return sum(values) / len(values) if values else None


def _train_metrics(policy: Path) -> dict:
    f = policy / "metrics.jsonl"
    if not f.exists():
        return {}
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return {}
    last = rows[-max(1, len(rows) // 4):]  # the last quarter of the steps

    def avg(key):
        vals = [r[key] for r in last if isinstance(r.get(key), (int, float))]  # not "nan" strings
        return sum(vals) / len(vals) if vals else None
    out = {"train_loss": avg("loss"), "reward_accuracy": avg("rewards/accuracy")}
    for key in sorted({k for r in last for k in r if k.lower().split("/")[-1] in ("kl", "entropy",
                                                                                   "entropy_estimate")}):
        out[f"train_{key.replace('/', '_')}"] = avg(key)  # KL and entropy terms of policy-gradient losses
    return {**out, "steps": len(rows)}


_EXTRA = re.compile(r"(accuracy|pass@\d+|pass_rate|solve_rate|exact_match)", re.IGNORECASE)


def _extra(folder: Path) -> dict:
    """Accuracy-like numbers reported by the evaluation stages of one policy (e.g. the RL recipe's): `accuracy`
    from `scores`, `accuracy_vs_0` from `versus-0`, `greedy_accuracy` from `greedy-scores`, ..."""
    out = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        report = (read_manifest(sub) or {}).get("report", {})
        for key, v in report.items():
            if _EXTRA.search(key) and isinstance(v, (int, float)) and not isinstance(v, bool):
                name = {"scores": key, "versus-0": f"{key}_vs_0"}.get(sub.name)
                out[name or f"{sub.name.removesuffix('-scores').replace('-', '_')}_{key}"] = v
    return out


def _train_reward(annotations: Path) -> float | None:
    """Mean reward of the answers an iteration sampled for training (both answers of a pair)."""
    from alignpipe.core.errors import UserError
    from alignpipe.data.io import _load

    if not (annotations / "manifest.json").exists():
        return None
    try:
        ds = _load(annotations)
    except UserError:
        return None
    values = [v for c in ("response1_reward", "response2_reward") if c in ds.column_names for v in ds[c]
              if v is not None]
    return sum(values) / len(values) if values else None


def collect(run: Path) -> list[dict]:
    """One dict of figures per policy index K (policy 0 = the starting policy)."""
    ev = run / "eval"
    if not _iters(run) and (run / "policy" / "manifest.json").exists():  # an offline recipe: one policy
        row = {"policy": 1, **_train_metrics(run / "policy")}
        return [row] if len(row) > 1 else []
    rows = []
    for k in sorted(set(_iters(run)) | set(_iters(ev)) | {i + 1 for i in _iters(run)}):
        e = ev / f"iter-{k}"
        versus = (read_manifest(e / "versus-0") or {}).get("report", {})
        row = {"policy": k,
               "mean_reward": _mean(e / "scores", "response1_reward"),
               "win_rate_vs_0": versus.get("win_rate"),
               "response_tokens": _mean(e / "generations", "num_tokens"),
               "kl": versus.get("kl_vs_reference")}  # KL(policy K || reference) on its held-out answers
        row.update(_train_metrics(run / f"iter-{k - 1}" / "policy") if k > 0 else {})
        if k > 0 and (reward := _train_reward(run / f"iter-{k - 1}" / "annotations")) is not None:
            row["train_reward"] = reward  # what policy K-1's training answers earned: the RL learning curve
        row.update(_extra(e))
        if any(v is not None for key, v in row.items() if key != "policy"):
            rows.append(row)
    return rows


COLUMNS = ["policy", "mean_reward", "win_rate_vs_0", "response_tokens", "train_loss", "reward_accuracy", "kl"]


def columns(rows: list[dict]) -> list[str]:
    """The usual columns, then every other key some row has (accuracy, train KL, steps, ...)."""
    extra = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in COLUMNS]
    return COLUMNS + extra


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("mean_reward", "mean reward (held-out)"), ("win_rate_vs_0", "win rate vs policy 0"),
            ("response_tokens", "response length (tokens)"), ("train_loss", "training loss"),
            ("reward_accuracy", "reward accuracy"), ("kl", "KL(policy || reference), nats")]
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    for ax, (key, title) in zip(axes.flat, keys):
        pts = [(r["policy"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o")
        if key in ("win_rate_vs_0", "reward_accuracy"):  # probabilities: the whole range, chance marked
            ax.set_ylim(0, 1.02)
            ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel("policy (iteration)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def markdown(rows: list[dict], run: Path) -> str:
    cols = columns(rows)
    lines = [f"# alignpipe report: {run}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else (f"{r[c]:.4g}" if isinstance(r[c], float)
                                                                     else str(r[c])) for c in cols) + " |")
    return "\n".join(lines) + ("\n\nPolicy K is the policy after K training iterations (0 = the start). mean_reward,"
                                " win_rate_vs_0, response_tokens and kl (KL(policy K || reference) in nats per answer)"
                                " are measured on held-out prompts; train_loss and reward_accuracy are the last"
                                " quarter of iteration K's training steps.\n")


@handle_errors
def command(run: Annotated[Path, typer.Argument(help="A run folder (runs/NAME) written by a pipeline.")],
            out: Annotated[Path | None, typer.Option("--out", "-o", help="Report folder (default RUN/report).")] = None,
            answers: Annotated[int, typer.Option(min=0, help="Held-out prompts shown with every policy's answer.")] = 8,
            seed: Annotated[int, typer.Option(help="Seed of the choice of those prompts.")] = 0):
    """A self-contained HTML report (answers side by side, weights, curves, lineage), PNG plots and a Markdown
    summary of a pipeline run."""
    from alignpipe.report.html import render

    if not run.is_dir():
        raise UserError(f"{run}: no such run folder")
    rows = collect(run)
    if not rows:
        raise UserError(f"{run}: no iterations with results found (expected iter-K/ and eval/iter-K/ folders)")
    out = out or run / "report"
    out.mkdir(parents=True, exist_ok=True)
    plot(rows, out / "report.png")
    (out / "summary.md").write_text(markdown(rows, run))
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    html = render(run, rows, columns(rows), (out / "report.png").read_bytes(), sample=answers, seed=seed)
    tmp = out / f".report.html.tmp{os.getpid()}"
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, out / "report.html")
    print(markdown(rows, run))
    say(f"report: {out / 'report.html'} ({len(html.encode()) / 1e3:.0f} kB), {out / 'report.png'}")
