"""The self-contained HTML report of a run folder: `alignpipe report RUN` writes RUN/report/report.html.

One file, no network and no script: inline CSS, plots as inline SVG and one base64 PNG, a Content-Security-
Policy that forbids scripts. Every text a model or a user wrote (answers, prompts, configs, paths) goes through
`html.escape`, so an answer holding `<script>` shows as text. Sections:

    headline    what the run did (loss, iterations, start model, prompts, reward) and what it achieved
    summary     the per-policy table of summary.json under human labels (extra numeric columns such as accuracy
                adapt) and the charts that fit the run (alignpipe.report.figures; report.png holds the same)
    answers     a fixed, seeded sample of held-out prompts: policy 0..K's answers side by side, with their
                reward (correct / wrong under a 0/1 verifier) and a judge's verdict against policy 0 (answers
                sampled and cut: the size stays small)
    iterations  per iteration: weight histogram, effective sample size, dropped rows; training curves
                (loss, KL, accuracy, ... from metrics.jsonl); rows, tokens and wall time of each stage
    lineage     per policy: the chain of manifests back to the prompts (alignpipe.data.lineage)
    trackers    links to the experiment trackers' runs (local folders, URIs) when there are any

Layouts (alignpipe.report.layout): online and RL runs (RUN/iter-K/{generations,annotations,weighted?,batches,
policy} and RUN/eval/policy-K/...), and offline recipes (RUN/{data,weighted,batches,policy}). Missing parts are
left out.
"""
from __future__ import annotations

import base64
import json
import random
import re
import time
from html import escape
from pathlib import Path

from alignpipe.data.lineage import lineage
from alignpipe.data.manifest import read_manifest
from alignpipe.report import svg
from alignpipe.report.figures import achieved, describe, label, panels, run_kind
from alignpipe.report.layout import Layout, layout

CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'none'; object-src 'none'; "
       "base-uri 'none'; form-action 'none'; frame-src 'none'")
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1400px;color:#222;
padding:0 16px}h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
h3{font-size:15px;margin-bottom:6px}table{border-collapse:collapse;font-size:13px;margin:8px 0}
td,th{border:1px solid #ddd;padding:4px 8px;vertical-align:top;text-align:left}th{background:#f4f4f4}
td.num{text-align:right;font-variant-numeric:tabular-nums}.answers td{max-width:420px}
.answer{white-space:pre-wrap;word-break:break-word;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
.badge{display:inline-block;font-size:11px;padding:1px 6px;border-radius:8px;background:#eef;margin:0 4px 4px 0}
.win{background:#dfd}.loss{background:#fdd}.tie{background:#eee}.charts{display:flex;flex-wrap:wrap;gap:8px}
pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:12px;white-space:pre-wrap;word-break:break-all}
details{margin:6px 0}summary{cursor:pointer;font-weight:600}.muted{color:#777;font-size:12px}
p.headline{font-size:15px;line-height:1.5;max-width:1100px}
img.plot{max-width:100%;border:1px solid #eee}code{font-size:12px}
"""
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SKIP_CURVES = {"step", "epoch", "batch_index", "seconds", "tokens/s", "examples/s", "tokens", "examples"}


def text(value) -> str:
    """Model or user text, safe for HTML: escaped, control characters shown as \\xNN."""
    return escape(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value)), quote=True)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _load(path: Path):
    """The dataset at `path`, or None when it is absent, empty or unreadable (the report leaves it out)."""
    from alignpipe.core.errors import UserError
    from alignpipe.data.io import _load as load

    try:
        return load(path) if read_manifest(path) else None
    except (UserError, OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------- answers
def answers(evals: dict[int, Path], n: int = 8, seed: int = 0, max_chars: int = 1200) -> dict:
    """A seeded sample of `n` held-out prompts and each policy's first answer, reward and verdict vs policy 0."""
    by_policy = {}
    for k, folder in sorted(evals.items()):
        gens = _load(folder / "generations")
        if gens is None:
            continue
        rewards = {}
        scores = _load(folder / "scores")
        if scores is not None:
            for r in scores.select_columns([c for c in ("prompt_id", "response1_sample_index", "response1_reward",
                                                        "response1_label") if c in scores.column_names]):
                rewards[(r["prompt_id"], r.get("response1_sample_index") or 0)] = (r.get("response1_reward"),
                                                                                   r.get("response1_label"))
        verdicts, verifier = {}, _verifier(folder)
        versus = None if verifier else _load(folder / "versus-0")  # a 0/1 verdict: right or wrong
        if versus is not None:
            verdicts = dict(zip(versus["prompt_id"], versus["preference"]))
        rows = {}
        for r in gens.select_columns(["prompt_id", "prompt", "sample_index", "response", "num_tokens",
                                      "finish_reason"]):
            if r["sample_index"] == 0:
                reward, label = rewards.get((r["prompt_id"], 0), (None, None))
                resp = r["response"] or ""
                rows[r["prompt_id"]] = {"prompt": r["prompt"], "response": resp[:max_chars], "verifier": verifier,
                                        "cut": len(resp) > max_chars, "tokens": r["num_tokens"],
                                        "finish": r["finish_reason"], "reward": reward, "label": label,
                                        "p_vs_0": verdicts.get(f"{r['prompt_id']}#0")}
        by_policy[k] = rows
    if not by_policy:
        return {"policies": [], "prompts": []}
    first = by_policy[min(by_policy)]
    ids = sorted(first)
    chosen = sorted(random.Random(seed).sample(ids, min(n, len(ids))))
    return {"policies": sorted(by_policy), "prompts": [
        {"prompt_id": pid, "prompt": first[pid]["prompt"],
         "answers": {k: by_policy[k].get(pid) for k in sorted(by_policy)}} for pid in chosen]}


def _verifier(folder: Path) -> bool:
    """Whether the held-out scores of an evaluation folder come from verifiers alone (rewards: right or wrong)."""
    annotators = ((read_manifest(folder / "scores") or {}).get("report") or {}).get("annotators") or []
    return bool(annotators) and all(a.get("verifier") for a in annotators)


# -------------------------------------------------------------------------------------------- iterations
def _tokens(folder: Path, m: dict) -> int | None:
    rep = m.get("report") or {}
    for key in ("num_tokens", "tokens", "total_tokens"):
        if isinstance(rep.get(key), (int, float)):
            return int(rep[key])
    metrics = folder / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        if rows and "tokens" in rows[0]:
            return int(sum(r.get("tokens") or 0 for r in rows))
    return None


def stage_rows(folder: Path) -> list[dict]:
    """Each stage output directly under `folder`: stage, rows, tokens, wall time."""
    out = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        m = read_manifest(sub)
        if m and m.get("stage"):
            out.append({"output": sub.name, "stage": m["stage"], "rows": m.get("num_rows"),
                        "tokens": _tokens(sub, m), "seconds": m.get("seconds")})
    return out


def weights(folder: Path) -> dict | None:
    """The example weights of a `weighted` dataset and its reweight report (ESS, dropped rows)."""
    ds = _load(folder)
    if ds is None or "response1_weight" not in ds.column_names:
        return None
    w1, w2 = ds["response1_weight"], ds["response2_weight"]
    ex = [a if b is None else (a + b) / 2 for a, b in zip(w1, w2)]
    s, s2 = sum(ex), sum(x * x for x in ex)
    rep = (read_manifest(folder) or {}).get("report", {})
    return {"values": ex, "ess": rep.get("ess", s * s / s2 if s2 else None),
            "ess_fraction": rep.get("ess_fraction", (s * s / s2 / len(ex)) if s2 and ex else None),
            "dropped": rep.get("dropped"), "rows_in": rep.get("rows_in"), "rows_out": rep.get("rows_out", len(ex)),
            "strategies": rep.get("strategies")}


def curves(policy: Path, max_charts: int = 12) -> list[str]:
    """SVG charts of the training metrics of a policy folder (loss first, then every other numeric metric)."""
    from alignpipe.training.metrics import policy_metrics

    rows = policy_metrics(policy)
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items()
                              if k not in _SKIP_CURVES and isinstance(v, (int, float)) and not isinstance(v, bool)))
    keys.sort(key=lambda k: (k != "loss", "kl" not in k.lower(), k))
    return [svg.line_chart({k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]},
                               f"train: {k}", integer_x=True) for k in keys[:max_charts]]


def tracker_links(run: Path, policies: dict[int, Path]) -> list[dict]:
    """Tracker runs recorded beside the policies (trackers.json) and in RUN/trackers/*.json."""
    found = {}
    files = [p / "trackers.json" for p in policies.values()] + sorted((run / "trackers").glob("*.json"))
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        for name, link in (data.get("trackers") or {}).items():
            found[(data.get("run_name"), name)] = {"run": data.get("run_name"), "tracker": name, **link}
    return list(found.values())


# -------------------------------------------------------------------------------------------- rendering
def _table(rows: list[dict], cols: list[str], table_id: str = "", numeric_data: bool = False) -> str:
    """A table; with `numeric_data` its columns are summary keys: human labels, each cell's exact value kept."""
    head = "".join(f'<th title="{text(c)}">{text(label(c))}</th>' if numeric_data else f"<th>{text(c)}</th>"
                   for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            num = isinstance(v, (int, float)) and not isinstance(v, bool)
            data = f' data-key="{text(c)}" data-value="{text(json.dumps(v))}"' if numeric_data else ""
            cells.append(f'<td class="{"num" if num else ""}"{data}>{text(_fmt(v))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _answers_html(sample: dict) -> str:
    if not sample["prompts"]:
        return '<p class="muted">No held-out generations (RUN/eval/policy-K/generations) in this run.</p>'
    head = "<th>prompt</th>" + "".join(f"<th>policy {k}</th>" for k in sample["policies"])
    rows = []
    for p in sample["prompts"]:
        cells = [(f'<td><div class="answer">{text(p["prompt"])}</div><div class="muted">{text(p["prompt_id"])}'
                  f"</div></td>")]
        for k in sample["policies"]:
            a = p["answers"].get(k)
            if a is None:
                cells.append('<td class="muted">-</td>')
                continue
            badges = []
            if a["verifier"]:
                right = {None: ("tie", "no answer"), True: ("win", "correct"), False: ("loss", "wrong")}
                cls, word = right[None if a["reward"] is None else a["reward"] > 0]
                badges.append(f'<span class="badge {cls}">{word}</span>')
            elif a["reward"] is not None:
                badges.append(f'<span class="badge">reward {text(_fmt(a["reward"]))}</span>')
            if a["label"] is not None:
                badges.append(f'<span class="badge">label {text(a["label"])}</span>')
            if a["p_vs_0"] is not None:
                cls = "win" if a["p_vs_0"] > 0.5 else "loss" if a["p_vs_0"] < 0.5 else "tie"
                badges.append(f'<span class="badge {cls}">P(better than policy 0) {a["p_vs_0"]:.2f}</span>')
            badges.append(f'<span class="badge">{text(a["tokens"])} tokens, {text(a["finish"])}</span>')
            cut = '<span class="muted"> [cut]</span>' if a["cut"] else ""
            cells.append(f'<td>{"".join(badges)}<div class="answer">{text(a["response"])}{cut}</div></td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table class="answers"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
            f'<p class="muted">{len(sample["prompts"])} held-out prompts drawn with a fixed seed; the first sampled '
            f"answer of each policy (sample_index 0), cut at 1200 characters.</p>")


def _iteration_html(title: str, folder: Path, policy: Path | None, eval_folder: Path | None) -> str:
    short = title.split(":")[0]
    parts = [f"<h3>{text(title)}</h3>"]
    w = weights(folder / "weighted") if (folder / "weighted").is_dir() else None
    charts = []
    if w:
        charts.append(svg.histogram(w["values"], f"{short}: example weights"))
        facts = {"rows in": w["rows_in"], "rows out": w["rows_out"], "dropped rows": w["dropped"],
                 "effective sample size": w["ess"], "ESS / rows": w["ess_fraction"],
                 "strategies": ", ".join(w["strategies"] or [])}
        parts.append(_table([facts], list(facts)))
    lag = ((read_manifest(policy) or {}).get("report") or {}).get("staleness") if policy is not None else None
    if lag:
        parts.append("<p>Answers trained on, by lag (policies between the one that sampled them and the one "
                     "trained; OFF_POLICY=K gives lag K):</p>" + _table([{f"lag {k}": v for k, v in lag.items()}],
                                                                      [f"lag {k}" for k in lag]))
    if policy is not None:
        charts += curves(policy)
    if charts:
        parts.append('<div class="charts">' + "".join(c for c in charts if c) + "</div>")
    stages = stage_rows(folder) + ([{**r, "output": f"eval/{eval_folder.name}/{r['output']}"}
                                    for r in stage_rows(eval_folder)] if eval_folder else [])
    if folder.name != "eval":
        stages = [r for r in stages if r["output"] not in ("eval", "report")]
    if stages:
        total = {"output": "total", "stage": "", "rows": None,
                 "tokens": sum(r["tokens"] or 0 for r in stages) or None,
                 "seconds": round(sum(r["seconds"] or 0 for r in stages), 3)}
        parts.append("<p>Token budget and wall time of each stage:</p>"
                     + _table(stages + [total], ["output", "stage", "rows", "tokens", "seconds"]))
    return "".join(parts)


def _size(n) -> str:
    """What a lineage node holds: its rows, or for a model folder the training steps that made it."""
    if n.num_rows is not None:
        return f"{n.num_rows} rows, "
    steps = n.report.get("steps")
    return f"model, {steps} training steps, " if steps is not None else ""


def _lineage_html(k: int, policy: Path) -> str:
    nodes = lineage(policy)
    items = []
    for n in nodes:
        inputs = "".join(f"<li><code>{text(i.path)}</code> {text(i.fingerprint)} ({text(i.status)})</li>"
                         for i in n.inputs)
        items.append(
            f'<details><summary>{"&nbsp;" * 4 * n.depth}{text(n.stage)}: <code>{text(n.path)}</code> '
            f'<span class="muted">{text(_size(n))}{text(_fmt(n.seconds))} s, {text(n.started_at)}'
            f"</span></summary><p>rerun:</p><pre>{text(n.rerun)}</pre><p>inputs:</p><ul>{inputs}</ul>"
            f"<p>config:</p><pre>{text(json.dumps(n.config, indent=1, sort_keys=True, default=str))}</pre>"
            f"<p class=\"muted\">fingerprint {text(n.fingerprint)}</p></details>")
    chain = " &larr; ".join(text(s) for s in dict.fromkeys(n.stage for n in nodes))
    return (f'<details class="lineage"><summary>policy {k}: <code>{text(policy)}</code> &mdash; {chain}</summary>'
            f'{"".join(items)}</details>')


def _trackers_html(links: list[dict]) -> str:
    rows = []
    for link in links:
        target = link.get("url") or link.get("uri") or link.get("dir")
        href = target if str(target).startswith(("http://", "https://", "file:")) else Path(target).absolute().as_uri()
        rest = {k: v for k, v in link.items() if k not in ("run", "tracker", "url", "uri", "dir")}
        rows.append(f"<tr><td>{text(link['run'])}</td><td>{text(link['tracker'])}</td>"
                    f'<td><a href="{text(href)}">{text(target)}</a></td><td><code>{text(json.dumps(rest))}</code></td></tr>')
    return ("<table><thead><tr><th>run</th><th>tracker</th><th>where</th><th>details</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def _charts(rows: list[dict], kind: str) -> list[str]:
    """The summary's charts: the panels that fit the run, as SVG (the same as report.png's), on one policy axis."""
    policies = [r["policy"] for r in rows] or [0]
    return [svg.line_chart(p.points, p.title, "policy (0 = the start model)", integer_x=True,
                           ylim=(0, 1.02) if p.unit else None, hline=p.chance, xlim=(min(policies), max(policies)))
            for p in panels(rows, kind)]


def _iterations(lay: Layout) -> str:
    parts = []
    for k, folder in lay.iterations.items():
        title = "run" if lay.offline else (f"iteration {k}: answers of policy {k - 1} train policy {k} "
                                           f"({folder.relative_to(lay.run)}/)")
        parts.append(_iteration_html(title, folder, lay.policies.get(k), None))
    for k, folder in lay.evals.items():
        if stage_rows(folder):
            parts.append(f"<h3>held-out evaluation of policy {k} ({text(folder.relative_to(lay.run))}/)</h3>"
                         + _table(stage_rows(folder), ["output", "stage", "rows", "tokens", "seconds"]))
    return "".join(parts) or '<p class="muted">No iteration folders.</p>'


def render(run: Path, rows: list[dict], columns: list[str], png: bytes | None = None, *, sample: int = 8,
           seed: int = 0) -> str:
    """The whole report as one HTML string."""
    lay = layout(run)
    png_html = ('<details><summary>report.png: the same charts as one image</summary><img class="plot" '
                f'alt="report plots" src="data:image/png;base64,{base64.b64encode(png).decode()}"></details>'
                if png else "")
    links = tracker_links(run, lay.policies)
    sections = [
        f"<h1>alignpipe report: {text(run)}</h1>",
        f'<p class="headline">Run: {text(describe(lay))}<br>Result: <b>{text(achieved(rows))}</b></p>',
        (f'<p class="muted">written {time.strftime("%Y-%m-%d %H:%M:%S")}; policy K is the model after K training '
         f"iterations (0 = the start model).</p>"),
        "<h2 id=\"summary-section\">Summary</h2>", _table(rows, columns, "summary", numeric_data=True),
        '<div class="charts">' + "".join(c for c in _charts(rows, run_kind(lay)) if c) + "</div>", png_html,
        "<h2>Answers on held-out prompts</h2>", _answers_html(answers(lay.evals, n=sample, seed=seed)),
        "<h2>Iterations</h2>", _iterations(lay),
        "<h2>Lineage of each policy</h2>",
        "".join(_lineage_html(k, p) for k, p in sorted(lay.policies.items())) or '<p class="muted">No policies.</p>',
    ]
    if links:
        sections += ["<h2>Experiment trackers</h2>", _trackers_html(links)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>alignpipe report: {text(run.name)}</title><style>{CSS}</style></head><body>"
            + "".join(sections) + "</body></html>\n")
