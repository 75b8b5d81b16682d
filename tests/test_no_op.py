"""No silent no-ops: an iteration whose every group has equal rewards stops build-batches with what to do, and a
train that cannot change the policy (every advantage 0, or a zero gradient at every step) says so in its summary
line and its manifest."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alignpipe.cli import app
from alignpipe.training.noop import ZERO_ADVANTAGES, ZERO_GRADIENT, no_op_notes

ROOT = Path(__file__).resolve().parents[1]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def all_equal(tmp_path_factory, tiny_lm_dir):
    """Arithmetic prompts answered by the tiny random model, which writes no numbers: every answer's exact-answer
    reward is 0, so every group is all-equal."""
    d = tmp_path_factory.mktemp("equal")
    rows = [json.loads(x) for x in (ROOT / "pipelines/data/arithmetic.jsonl").read_text().splitlines()]
    (d / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [r for r in rows if r["split"] == "train"][:3]))
    for args in (["import", d / "p.jsonl", "--out", d / "prompts"],
                 ["generate", d / "prompts", "--policy", tiny_lm_dir, "--out", d / "gen", "--num-samples", 3,
                  "--max-new-tokens", 4, "--device", "cpu"],
                 ["annotate", d / "gen", "--annotator", "exact-answer", "--pairing", "pointwise", "--out", d / "ann"]):
        r = invoke(*args)
        assert r.exit_code == 0, r.output
    return d


def test_all_equal_groups_stop_build_batches_with_what_to_do(all_equal, tiny_lm_dir):
    r = invoke("build-batches", all_equal / "ann", "--task", "group", "--tokenizer", tiny_lm_dir,
               "--out", all_equal / "dropped")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    for hint in ("every one of the 3 groups got the same reward", "--equal-groups keep",
                 "generate --num-samples", "an easier split"):
        assert hint in r.output, r.output
    assert not (all_equal / "dropped").exists()


def test_train_on_zero_advantages_says_nothing_was_learned(all_equal, tiny_lm_dir):
    r = invoke("build-batches", all_equal / "ann", "--task", "group", "--tokenizer", tiny_lm_dir,
               "--equal-groups", "keep", "--batch-size", 3, "--out", all_equal / "kept")
    assert r.exit_code == 0, r.output
    out = all_equal / "policy"
    r = invoke("train", all_equal / "kept", "--policy", tiny_lm_dir, "--loss", "grpo", "--lr", "1e-3",
               "--device", "cpu", "--out", out)
    assert r.exit_code == 0, r.output
    line = r.output.strip().splitlines()[-1]
    assert line.startswith("train: 3 steps") and f"nothing learned: {ZERO_ADVANTAGES}; {ZERO_GRADIENT}" in line
    report = json.loads((out / "manifest.json").read_text())["report"]
    assert report["no_op"] == [ZERO_ADVANTAGES, ZERO_GRADIENT]


def _batches(advantages, weights=None, token_advantages=None):
    from datasets import Dataset

    cols = {"response1_advantage": advantages, "weight": weights or [1.0] * len(advantages)}
    if token_advantages is not None:
        cols["response1_token_advantages"] = token_advantages
    return Dataset.from_dict(cols)


@pytest.mark.parametrize("ds_args, policy_gradient, history, expected", [
    (([0.0, 0.0],), True, [{"grad_norm": 0.3}], [ZERO_ADVANTAGES]),
    (([0.5, -0.5],), True, [{"grad_norm": 0.3}], []),
    (([0.0, 2.0], [1.0, 0.0]), True, [{"grad_norm": 0.3}], [ZERO_ADVANTAGES]),  # the row that counts is 0
    (([0.0, 0.0],), False, [{"grad_norm": 0.3}], []),  # the critic (value loss) learns from returns
    (([0.0, 0.0], None, [[0.0, 0.0], [0.0]]), True, [], [ZERO_ADVANTAGES]),  # per-token (GAE) advantages
    (([0.0, 0.0], None, [[0.0, 0.1], [0.0]]), True, [], []),
    (([0.5, -0.5],), True, [{"grad_norm": 0.0}, {"grad_norm": 0.0}], [ZERO_GRADIENT]),
    (([0.5, -0.5],), True, [{"grad_norm": 0.0}, {"grad_norm": 1e-9}], []),
])
def test_no_op_notes(ds_args, policy_gradient, history, expected):
    assert no_op_notes(_batches(*ds_args), policy_gradient=policy_gradient, history=history) == expected


def test_no_op_notes_on_other_tasks_look_at_the_gradient_only():
    from datasets import Dataset

    ds = Dataset.from_dict({"weight": [1.0]})
    assert no_op_notes(ds, policy_gradient=False, history=[{"grad_norm": 0.0}]) == [ZERO_GRADIENT]
    assert no_op_notes(ds, policy_gradient=False, history=[]) == []
