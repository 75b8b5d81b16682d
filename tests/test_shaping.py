"""Reward shaping and combination: DAPO's overlong punishment and the format check as annotators, computed by
hand; several annotators combined with weights in annotate, the manifest's per-component means, and the
combined reward reaching the group task's advantages."""
from __future__ import annotations

import json

import pytest
from helpers import cli, generation, ok, rows_of, write_dataset

from alignpipe.core.errors import UserError
from alignpipe.feedback.annotators import ANNOTATORS, Query, Runtime, build
from alignpipe.feedback.annotators.shaping import has_boxed, overlong_penalty


# ------------------------------------------------------------------------ DAPO eq. 13, by hand
@pytest.mark.parametrize("length, expected", [
    (1, 0.0), (12, 0.0),  # |y| <= L_max - L_cache = 16 - 4 = 12: no penalty
    (13, -0.25), (14, -0.5), (15, -0.75), (16, -1.0),  # ((16 - 4) - |y|) / 4 inside the window
    (17, -1.0), (100, -1.0),  # beyond L_max
])
def test_overlong_penalty_by_hand(length, expected):
    assert overlong_penalty(length, max_tokens=16, cache=4) == expected


def test_overlong_without_a_window_is_the_hard_punishment():
    assert [overlong_penalty(n, max_tokens=8, cache=0) for n in (7, 8, 9)] == [0.0, 0.0, -1.0]
    assert [overlong_penalty(n, max_tokens=8, cache=8) for n in (0, 1, 4, 8)] == [0.0, -0.125, -0.5, -1.0]


def _score(spec: str, responses: list[str], num_tokens=None) -> list[float]:
    annotator = build(ANNOTATORS.parse(spec), Runtime())
    lengths = num_tokens or [None] * len(responses)
    return [v.score for v in annotator.score([Query("q", [], r, num_tokens=n, where=f"row {i}")
                                              for i, (r, n) in enumerate(zip(responses, lengths))])]


def test_overlong_annotator_scores_num_tokens():
    assert _score("overlong,max_tokens=16,cache=4", ["a"] * 4, [3, 13, 16, 20]) == [0.0, -0.25, -1.0, -1.0]


@pytest.mark.parametrize("spec, message", [
    ("overlong,max_tokens=4,cache=5", "need max_tokens >= 1 and 0 <= cache <= max_tokens"),
    ("overlong,max_tokens=0", "annotator 'overlong': max_tokens=0 is outside its range: must be in the range >=1"),
    ("overlong,max_tokens=4,cache=-1", "annotator 'overlong': cache=-1 is outside its range: must be in the range >=0"),
    ("overlong", "annotator 'overlong' needs max_tokens"),
    ("format:(", "invalid regular expression"),
])
def test_bad_shaping_options_are_one_line_errors(spec, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")) as e:
        build(ANNOTATORS.parse(spec), Runtime())
    assert "\n" not in str(e.value)


def test_overlong_needs_token_counts():
    with pytest.raises(UserError, match=r"row 0: annotator overlong,max_tokens=4 needs the answer's length in tokens"):
        _score("overlong,max_tokens=4", ["imported answer"], [0])


# ------------------------------------------------------------------------------- the format check
def test_format_boxed_by_hand():
    responses = [r"so \boxed{42}", r"\boxed{ }", r"\boxed{\frac{1}{2}} done", r"\boxed{4", "42", r"\boxed{}"]
    assert _score("format", responses) == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert has_boxed(r"a \boxed{x} b") and not has_boxed("no box")


def test_format_regex_must_match_the_whole_answer():
    spec = r"format:<think>.*</think>\s*The answer is -?\d+\.?"
    responses = ["<think>2+2,\nso 4</think> The answer is 4.", "  <think>x</think>The answer is -3  ",
                 "The answer is 4.", "<think>x</think> The answer is 4. And more."]
    assert _score(spec, responses) == [1.0, 1.0, 0.0, 0.0]
    assert ANNOTATORS.parse("format:a,b{1,2}").arg == "a,b{1,2}"  # a free ARG keeps its commas


# ----------------------------------------------------- combined in annotate, then in the group task
RESPONSES = [  # (text, num_tokens): reference 7; max_tokens=8, cache=4 -> penalty 0 up to 4 tokens
    (r"\boxed{7}", 3),  # correct, boxed, short:          1 + 0.5*0     + 0.25*1 = 1.25
    ("7", 6),  # correct, no box, in the window:          1 + 0.5*(-0.5) + 0     = 0.75
    (r"\boxed{8}", 8),  # wrong, boxed, at L_max:         0 + 0.5*(-1)  + 0.25*1 = -0.25
    ("no idea", 2),  # nothing parseable (lowest, 0), short: 0             = 0.0
]
EXPECTED = [1.25, 0.75, -0.25, 0.0]


@pytest.fixture(scope="module")
def generations(tmp_path_factory):
    d = tmp_path_factory.mktemp("shaping")
    rows = [generation(0, j, text, reference="7", num_tokens=n, response_token_ids=list(range(5, 5 + n)),
                       response_token_logps=[-1.0] * n) for j, (text, n) in enumerate(RESPONSES)]
    return write_dataset(d / "gen", "generations", rows)


def test_annotators_combine_with_weights_and_the_manifest_has_each_mean(generations, tmp_path):
    out = tmp_path / "ann"
    ok("annotate", generations, "--annotator", "exact-answer", "--annotator", "overlong,max_tokens=8,cache=4,weight=0.5",
       "--annotator", "format,weight=0.25", "--pairing", "pointwise", "--out", out)
    rows = sorted(rows_of(out), key=lambda r: r["response1_sample_index"])
    assert [r["response1_reward"] for r in rows] == EXPECTED
    assert rows[0]["annotator"] == "1*exact-answer + 0.5*overlong,cache=4,max_tokens=8 + 0.25*format"
    components = json.loads((out / "manifest.json").read_text())["report"]["components"]
    assert components == {
        "exact-answer": {"weight": 1.0, "mean": 0.5, "count": 4},  # 2 of 4 correct
        "overlong,cache=4,max_tokens=8": {"weight": 0.5, "mean": (0 - 0.5 - 1 + 0) / 4, "count": 4},
        "format": {"weight": 0.25, "mean": 0.5, "count": 4},
    }


def test_the_group_task_takes_the_combined_reward(generations, tmp_path, tiny_lm_dir):
    ann, batches = tmp_path / "ann", tmp_path / "batches"
    ok("annotate", generations, "--annotator", "exact-answer", "--annotator", "overlong,max_tokens=8,cache=4,weight=0.5",
       "--annotator", "format,weight=0.25", "--pairing", "pointwise", "--out", ann)
    ok("build-batches", ann, "--task", "group", "--advantage", "dr-grpo", "--tokenizer", tiny_lm_dir, "--out", batches)
    got = {r["example_id"]: (r["response1_reward"], r["response1_advantage"]) for r in rows_of(batches)}
    mean = sum(EXPECTED) / 4  # 0.4375
    assert got == {f"p0/0.{j}": (pytest.approx(r), pytest.approx(r - mean)) for j, r in enumerate(EXPECTED)}


def test_overlong_on_imported_rows_is_exit_2(tmp_path):
    gen = write_dataset(tmp_path / "gen", "generations", [generation(0, 0, "hi", num_tokens=0)])
    r = cli("annotate", gen, "--annotator", "overlong,max_tokens=4", "--pairing", "pointwise", "--out", tmp_path / "a")
    assert r.exit_code == 2 and "needs the answer's length in tokens" in r.output
