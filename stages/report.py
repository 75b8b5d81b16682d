"""report: figures across the iterations of a run folder: a self-contained HTML report, PNG plots and a
Markdown summary.

Reads the run layout the pipelines write (alignpipe.report.layout):
    RUN/iter-K/{generations,annotations,weighted,batches,policy}   iteration K = 1, 2, ...: its policy is policy K
    RUN/eval/policy-K/{generations,scores,versus-0,...}             held-out evaluation of policy K (0 = the start)
    RUN/{data,weighted,batches,policy}                              an offline recipe (one policy)
and writes RUN/report/{report.html, report.png, summary.md, summary.json}. Numeric figures that evaluation
stages report beyond the usual ones (accuracy, pass@k, ...) become extra columns. The panels fit the run
(alignpipe.report.figures): an RL run shows accuracy, training reward, answer length, KL, entropy and clipping.
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


def _mean(path: Path, column: str) -> float | None:
    from alignpipe.data.io import _load

    if not (path / "manifest.json").exists():
        return None
    values = [v for v in _load(path)[column] if v is not None]
    return sum(values) / len(values) if values else None


def _train_metrics(policy: Path) -> dict:
    """The last quarter of a policy's training steps, averaged: the loss, the implicit-reward accuracy, and the
    KL, log-ratio, entropy and clipped fraction its loss logged (older metric names read as today's)."""
    from alignpipe.training.metrics import policy_metrics

    rows = [r for r in policy_metrics(policy) if "loss" in r]
    if not rows:
        return {}
    last = rows[-max(1, len(rows) // 4):]  # the last quarter of the steps

    def avg(*keys):  # the keys' sum per step, averaged over the steps that logged them all (not "nan" strings)
        vals = [sum(r[k] for k in keys) for r in last if all(isinstance(r.get(k), (int, float)) for k in keys)]
        return sum(vals) / len(vals) if vals else None
    out = {"train_loss": avg("loss"), "reward_accuracy": avg("rewards/accuracy"),
           "train_clip_fraction": avg("clip/low", "clip/high")}
    out.update({f"train_{key}": avg(key) for key in ("logratio", "z0", "kl", "entropy", "entropy_estimate")})
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


def _policy_row(lay, k: int, rl: bool) -> dict:
    """The figures of policy K that the run has (see alignpipe.report.figures for what each means)."""
    row, e = {"policy": k}, lay.evals.get(k)
    if e is not None:
        versus = (read_manifest(e / "versus-0") or {}).get("report", {})
        row.update(mean_reward=_mean(e / "scores", "response1_reward"), win_rate_vs_0=versus.get("win_rate"),
                   response_tokens=_mean(e / "generations", "num_tokens"),
                   kl=versus.get("kl_vs_reference"))  # KL(policy K || start) on its held-out answers
    if k in lay.policies:
        row.update(_train_metrics(lay.policies[k]))
    if (sampled := lay.sampled_by(k)) is not None:
        row["train_reward"] = _train_reward(sampled / "annotations")  # policy K's training answers: RL's curve
    if e is not None:
        row.update(_extra(e))
    if rl:
        row.pop("train_loss", None)  # a policy-gradient loss is no measure of progress
    if row.get("accuracy") is not None and row.get("mean_reward") is not None \
            and abs(row["accuracy"] - row["mean_reward"]) < 1e-9:
        row.pop("mean_reward")  # a 0/1 verifier: the mean reward is the sampled accuracy
    return {key: v for key, v in row.items() if v is not None}


def collect(run: Path) -> list[dict]:
    """One dict of figures per policy K (policy 0 = the start model); a figure the run lacks is left out."""
    from alignpipe.report.figures import run_kind
    from alignpipe.report.layout import layout

    lay = layout(run)
    rl = run_kind(lay) == "rl"
    return [row for row in (_policy_row(lay, k, rl) for k in lay.numbers()) if len(row) > 1]


ORDER = ["policy", "greedy_accuracy", "accuracy", "mean_reward", "win_rate_vs_0", "train_reward", "response_tokens",
         "kl", "train_loss", "reward_accuracy", "train_logratio", "train_z0", "train_kl", "train_entropy",
         "train_entropy_estimate", "train_clip_fraction"]


def columns(rows: list[dict]) -> list[str]:
    """The keys some row has: the main figures first, then the others (extra evaluation figures, steps)."""
    present = dict.fromkeys(k for r in rows for k in r)
    return [k for k in ORDER if k in present] + [k for k in present if k not in ORDER]


def plot(rows: list[dict], out: Path, kind: str = "preference") -> None:
    """report.png: the panels that fit the run (alignpipe.report.figures.panels), three to a row."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from alignpipe.report.figures import panels

    charts = panels(rows, kind)
    ncols = min(3, max(1, len(charts)))
    nrows = max(1, -(-len(charts) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.3 * nrows), squeeze=False)
    policies = [r["policy"] for r in rows] or [0]
    xlim = (min(policies) - 0.25, max(policies) + 0.25)
    for ax, p in zip(axes.flat, charts):
        for name, pts in p.points.items():
            ax.plot(*zip(*pts), marker="o", label=name)
        if len(p.points) > 1:
            ax.legend(fontsize=8)
        if p.unit:  # probabilities: the whole range
            ax.set_ylim(0, 1.02)
        if p.chance is not None:
            ax.axhline(p.chance, color="grey", linestyle="--", linewidth=1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(*xlim)  # one policy axis for every panel
        ax.yaxis.get_major_formatter().set_useOffset(False)
        ax.set_title("\n".join(textwrap.wrap(p.title, 42)), fontsize=10)
        ax.set_xlabel("policy (0 = the start model)", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(charts):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def markdown(rows: list[dict], run: Path) -> str:
    from alignpipe.report.figures import label

    cols = columns(rows)
    lines = [f"# alignpipe report: {run}", "", "| " + " | ".join(label(c) for c in cols) + " |",
             "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else (f"{r[c]:.4g}" if isinstance(r[c], float)
                                                                     else str(r[c])) for c in cols) + " |")
    return "\n".join(lines) + ("\n\nPolicy K is the model after K training iterations (0 = the start model)."
                                " Held-out figures are of policy K's answers to the test prompts;"
                                " training figures average the last quarter of iteration K's steps; the training"
                                " reward is that of the answers policy K sampled for iteration K+1.\n")


@handle_errors
def command(run: Annotated[Path, typer.Argument(help="A run folder (runs/NAME) written by a pipeline.")],
            out: Annotated[Path | None, typer.Option("--out", "-o", help="Report folder (default RUN/report).")] = None,
            answers: Annotated[int, typer.Option(min=0, help="Held-out prompts shown with every policy's answer.")] = 8,
            seed: Annotated[int, typer.Option(help="Seed of the choice of those prompts.")] = 0):
    """A self-contained HTML report (answers side by side, weights, curves, lineage), PNG plots and a Markdown
    summary of a pipeline run."""
    from alignpipe.report.figures import run_kind
    from alignpipe.report.html import render
    from alignpipe.report.layout import layout

    if not run.is_dir():
        raise UserError(f"{run}: no such run folder")
    rows = collect(run)
    if not rows:
        raise UserError(f"{run}: no iterations with results found (expected iter-K/ and eval/policy-K/ folders)")
    out = out or run / "report"
    out.mkdir(parents=True, exist_ok=True)
    plot(rows, out / "report.png", run_kind(layout(run)))
    (out / "summary.md").write_text(markdown(rows, run))
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    html = render(run, rows, columns(rows), (out / "report.png").read_bytes(), sample=answers, seed=seed)
    tmp = out / f".report.html.tmp{os.getpid()}"
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, out / "report.html")
    print(markdown(rows, run))
    say(f"report: {out / 'report.html'} ({len(html.encode()) / 1e3:.0f} kB), {out / 'report.png'}")
