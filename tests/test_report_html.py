"""alignpipe report's report.html on run folders written in a second (tests/report_fixtures.py): what it holds,
escaping, a bounded size on large runs, tolerance of missing parts, extra metric columns, offline layouts,
tracker links. The browser's view of it is tests/test_browser.py."""
from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser

from helpers import cli, ok
from report_fixtures import PAYLOAD, make_run

from alignpipe.report import rl_table
from alignpipe.report.figures import label
from alignpipe.report.html import CSP, text


class Tags(HTMLParser):
    """Every start tag with its attributes, and the visible text."""

    def __init__(self):
        super().__init__()
        self.tags, self.data = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.data.append(data)


def _parse(html: str) -> Tags:
    t = Tags()
    t.feed(html)
    return t


def test_report_html_holds_table_answers_weights_curves_stages_lineage(tmp_path):
    run = make_run(tmp_path / "run", iters=2, prompts=6)
    ok("report", run)
    html = (run / "report" / "report.html").read_text()
    summary = json.loads((run / "report" / "summary.json").read_text())
    tags = _parse(html)
    # the table: one row per policy, each cell's exact value next to its text
    cells = [a for t, a in tags.tags if t == "td" and "data-key" in a]
    assert [r["policy"] for r in summary] == [0, 1, 2]
    rows = []
    for a in cells:  # the policy column comes first in each row
        if a["data-key"] == "policy":
            rows.append({})
        rows[-1][a["data-key"]] = json.loads(a["data-value"])
    assert [{k: v for k, v in r.items() if v is not None} for r in rows] == \
        [{k: v for k, v in r.items() if v is not None} for r in summary]  # absent or null: an empty cell
    # self-contained: no script, no remote resource, CSP forbidding scripts
    assert not any(t == "script" for t, _ in tags.tags)
    assert ("meta", {"http-equiv": "Content-Security-Policy", "content": CSP}) in tags.tags
    assert "script-src 'none'" in CSP and "default-src 'none'" in CSP
    srcs = [a.get("src") or a.get("href") for t, a in tags.tags if t in ("img", "link", "iframe", "object")]
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    # answers of policies 0, 1, 2 side by side, with reward and verdict
    visible = "".join(tags.data)
    assert "policy 0" in visible and "policy 2" in visible
    assert "Read, wonder, grow. Truly wonderful! Truly wonderful!" in visible  # policy 2's answer
    assert "P(better than policy 0) 0.70" in visible and "reward 0.2" in visible
    # weights: histogram, ESS, dropped rows; training curves; stage budgets; lineage back to import
    assert "iteration 1: example weights" in visible and "effective sample size" in visible
    assert "dropped rows" in visible and "train: loss" in visible and "train: logratio" in visible
    assert re.search(r"<td[^>]*>reweight</td>", html) and "Token budget and wall time" in visible
    assert "policy 2:" in visible and "train &larr; reweight &larr; annotate &larr; generate &larr; import" in html
    assert "alignpipe reweight" in visible and "--strategy confidence" in visible


def test_model_text_is_escaped_everywhere(tmp_path):
    run = make_run(tmp_path / "run", iters=1, prompts=3, payload=True)
    ok("report", run)
    html = (run / "report" / "report.html").read_text()
    tags = _parse(html)
    assert not any(t == "script" for t, _ in tags.tags)
    assert not any(t == "img" and a.get("src") == "x" for t, a in tags.tags)
    assert "onerror" not in " ".join(k for _, a in tags.tags for k in a)
    assert "".join(tags.data).count(PAYLOAD) == 2  # policies 0 and 1, as text
    assert text("a\x1bb<") == "a\\x1bb&lt;"  # control characters shown, not passed through


def test_large_run_stays_small_answers_are_sampled(tmp_path):
    run = make_run(tmp_path / "run", iters=1, prompts=300, payload=False)
    ok("report", run, "--answers", 5)
    html = (run / "report" / "report.html").read_text()
    rows = re.findall(r'<div class="muted">(p\d{4})</div>', html)
    assert len(rows) == 5 and len(set(rows)) == 5
    assert len(html.encode()) < 400_000
    again = tmp_path / "again"
    ok("report", run, "--answers", 5, "--out", again)  # the choice is seeded: the same prompts again
    assert re.findall(r'<div class="muted">(p\d{4})</div>', (again / "report.html").read_text()) == rows


def test_missing_parts_and_extra_metrics(tmp_path):
    run = make_run(tmp_path / "run", iters=2, prompts=4, accuracy=True)
    shutil.rmtree(run / "iter-2" / "weighted")  # e.g. an RL run without reweighting
    (run / "iter-1" / "policy" / "metrics.jsonl").unlink()
    ok("report", run)
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert summary[2]["accuracy_vs_0"] == 0.65  # reported by an evaluation stage: a column of its own
    html = (run / "report" / "report.html").read_text()
    assert 'data-key="accuracy_vs_0"' in html and f"{label('accuracy_vs_0')}</text>" in html  # column and chart
    assert "iteration 2: example weights" not in html and "iteration 1: example weights" in html
    shutil.rmtree(run / "eval")
    (run / "iter-1" / "policy" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    ok("report", run)
    assert "No held-out generations" in (run / "report" / "report.html").read_text()


def test_rl_recipe_columns(tmp_path):
    """pipelines/rl.mk's layout: no weighted/, sampled and greedy accuracy, the reward of the training answers."""
    from helpers import set_manifest

    run = make_run(tmp_path / "run", iters=2, prompts=4, accuracy=True, payload=False)
    for k in range(3):
        shutil.copytree(run / f"eval/policy-{k}/scores", run / f"eval/policy-{k}/greedy-scores")
        set_manifest(run / f"eval/policy-{k}/greedy-scores", report={"accuracy": 0.5 + 0.1 * k, "unparsed": 0})
    for k in range(2):
        shutil.rmtree(run / f"iter-{k + 1}" / "weighted")
    ok("report", run)
    rows = json.loads((run / "report" / "summary.json").read_text())
    assert [r["accuracy"] for r in rows] == [0.2, 0.30000000000000004, 0.4]
    assert [r["greedy_accuracy"] for r in rows] == [0.5, 0.6, 0.7]
    assert rows[0]["train_reward"] == 0.5 and "train_reward" not in rows[2]  # mean of both answers' rewards
    assert rows[1]["train_entropy"] == 2.0 - 0.1 * 7.5 and rows[2]["accuracy_vs_0"] == 0.65
    html = (run / "report" / "report.html").read_text()
    charts = {"accuracy": "held-out accuracy", "greedy_accuracy": "held-out accuracy",
              "train_reward": "training reward of the answers each policy sampled",
              "train_entropy": "entropy per token (training)"}
    for column, chart in charts.items():
        assert f'data-key="{column}"' in html and f"{chart}</text>" in html  # a column and its chart
    assert "example weights" not in html and "train: entropy" in html


def test_offline_recipe_layout(tmp_path):
    run = make_run(tmp_path / "src", iters=1, prompts=4)
    off = tmp_path / "offline"
    off.mkdir()
    for name in ("weighted", "policy"):
        shutil.copytree(run / "iter-1" / name, off / name)
    ok("report", off)
    summary = json.loads((off / "report" / "summary.json").read_text())
    assert summary[0]["policy"] == 1 and summary[0]["train_loss"] is not None
    html = (off / "report" / "report.html").read_text()
    assert "run: example weights" in html and "train: loss" in html and "policy 1:" in html


def _summary_charts(html: str) -> dict[str, str]:
    """The SVG charts of the summary section, by title."""
    block = html.split('<h2 id="summary-section">')[1].split("<h2>")[0]
    return {re.search(r"<title>(.*?)</title>", c).group(1): c for c in re.findall(r"<svg.*?</svg>", block)}


def test_rl_run_report_fits_the_run(tmp_path):
    """pipelines/rl.mk's run: accuracy, training reward, length, KL, entropy and clipping, no empty or
    preference-only panel, a headline, human column labels, verdicts of a 0/1 verifier as right or wrong,
    row counts in the lineage, train_reward on the same policies as rl-table.md."""
    run = make_run(tmp_path / "run", iters=2, prompts=6, payload=False, rl=True)
    ok("report", run)
    html = (run / "report" / "report.html").read_text()
    rows = json.loads((run / "report" / "summary.json").read_text())
    charts = _summary_charts(html)
    assert list(charts) == ["held-out accuracy", "training reward of the answers each policy sampled",
                            "answer length, tokens (held-out)", "KL to the start model, nats per answer (held-out)",
                            "entropy per token (training)", "clipped fraction of tokens (training)",
                            "KL to the reference per token, k3 (training)"]
    assert all("<polyline" in c for c in charts.values())  # no empty panel
    assert ">greedy</text>" in charts["held-out accuracy"] and ">sampled</text>" in charts["held-out accuracy"]
    assert not any("train_loss" in r or "reward_accuracy" in r for r in rows)  # no PG loss, no pair accuracy
    headline = re.search(r'<p class="headline">(.*?)</p>', html).group(1)
    assert "grpo" in headline and "arithmetic.jsonl" in headline and "exact-answer" in headline
    assert "greedy accuracy 0.333 (policy 0) \u2192 0.667 (policy 2)" in headline
    heads = re.findall(r'<th title="([^"]*)">([^<]*)</th>', html)
    assert heads and all(shown == text(label(key)) and "_" not in shown for key, shown in heads)
    assert "P(better than policy 0)" not in html and "reward 1" not in html
    assert '<span class="badge win">correct</span>' in html and '<span class="badge loss">wrong</span>' in html
    assert not re.search(r'class="muted">\s*(None)? rows', html) and "model, 8 training steps" in html
    table = {r["policy"]: r["train_reward"] for r in rl_table.rows(run) if r["train_reward"] is not None}
    assert table == {r["policy"]: r["train_reward"] for r in rows if "train_reward" in r} == {0: 1 / 6, 1: 2 / 6}
    assert [r["policy"] for r in rl_table.rows(run)] == [r["policy"] for r in rows] == [0, 1, 2]


def test_preference_run_panels(tmp_path):
    run = make_run(tmp_path / "run", iters=2, prompts=4, payload=False)
    ok("report", run)
    html = (run / "report" / "report.html").read_text()
    charts = _summary_charts(html)
    assert list(charts) == [label("mean_reward"), label("win_rate_vs_0"),
                            "training reward of the answers each policy sampled",
                            *[label(k) for k in ("response_tokens", "kl", "train_loss", "reward_accuracy",
                                                 "train_logratio", "train_entropy")]]
    assert all("<polyline" in c for c in charts.values())
    assert "win rate vs policy 0 0.6 (policy 1) \u2192 0.7 (policy 2)" in html and "P(better than policy 0)" in html


def test_older_runs_read_under_the_same_numbers_and_names(tmp_path):
    """A run written with RUN/iter-0 and eval/iter-K folders and DPO's old `kl` metric: the same summary."""
    new, old = make_run(tmp_path / "new" / "run", iters=2, prompts=4), make_run(tmp_path / "old" / "run", iters=2,
                                                                                  prompts=4, legacy=True)
    ok("report", new)
    ok("report", old)
    summary = json.loads((old / "report" / "summary.json").read_text())
    assert summary == json.loads((new / "report" / "summary.json").read_text())
    assert [r["policy"] for r in summary] == [0, 1, 2] and abs(summary[2]["train_logratio"] - 0.15) < 1e-12
    html = (old / "report" / "report.html").read_text()
    assert "train: logratio" in html and "train: kl<" not in html
    assert "iteration 1: answers of policy 0 train policy 1 (iter-0/)" in html
    for k in range(2):  # a loop by hand that keeps policy K in RUN/policy-K
        shutil.move(old / f"iter-{k}" / "policy", old / f"policy-{k + 1}")
    ok("report", old)
    assert json.loads((old / "report" / "summary.json").read_text()) == summary


def test_tracker_runs_are_linked(tmp_path):
    run = make_run(tmp_path / "run", iters=1, prompts=3)
    (run / "trackers").mkdir()
    (run / "trackers" / "run-iter-0-policy.json").write_text(json.dumps({"run_name": "run-iter-0-policy", "trackers": {
        "mlflow": {"uri": (run / "trackers" / "mlruns").as_uri(), "run_id": "abc"},
        "wandb": {"dir": str(run / "trackers" / "wandb" / "offline-run-x"), "id": "x1"}}}))
    ok("report", run)
    html = (run / "report" / "report.html").read_text()
    assert "Experiment trackers" in html and f'href="{(run / "trackers" / "mlruns").as_uri()}"' in html
    assert (run / "trackers" / "wandb" / "offline-run-x").as_uri() in html


def test_report_bad_input(tmp_path):
    r = cli("report", tmp_path / "nothing")
    assert r.exit_code == 2 and "no such run folder" in r.output
    (tmp_path / "empty").mkdir()
    r = cli("report", tmp_path / "empty")
    assert r.exit_code == 2 and "no iterations with results" in r.output
