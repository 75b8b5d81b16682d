"""Verifier annotators: final-answer extraction, numeric and string matching, the lowest reward for an
answer with nothing parseable, a missing reference as an error, and math-verify when installed."""
from __future__ import annotations

import pytest

from alignpipe.core.errors import UserError
from alignpipe.feedback.annotators.verifiers import NO_ANSWER, exact_answer, extract, matches, math_verify


@pytest.mark.parametrize("text, how, pattern, expected", [
    ("3 + 5 = 8", "last-number", None, "8"),
    ("3 + 5 = 8", "first-number", None, "3"),
    ("It is -12.5 degrees, or 1,200 ft", "last-number", None, "1,200"),
    ("It is -12.5 degrees", "first-number", None, "-12.5"),
    (r"so \boxed{\frac{1}{2}} and \boxed{x^{2}}", "boxed", None, "x^{2}"),
    (r"\boxed{3", "boxed", None, None),
    ("Answer: 42. Final answer: 41", "regex", r"Answer:\s*(\d+)", "42"),
    ("Answer: 42. Final Answer: 41", "regex", r"[Aa]nswer:\s*(\d+)", "41"),
    ("no digits here", "last-number", None, None),
    ("", "first-number", None, None),
])
def test_extract(text, how, pattern, expected):
    assert extract(text, how, pattern) == expected


@pytest.mark.parametrize("answer, reference, ok", [
    ("8", "8", True), ("8.0", "8", True), ("1,000", "1000", True), ("8.", "8", True), ("$8", "8", True),
    ("7", "8", False), ("-8", "8", False), ("8.0000001", "8", True), ("8.001", "8", False),
    ("Paris", " paris. ", True), ("New  York", "new york", True), ("Rome", "Paris", False),
])
def test_matches(answer, reference, ok):
    assert matches(answer, reference) is ok


def test_tolerance_is_relative_beyond_one():
    assert matches("1000.5", "1000", tolerance=1e-3) and not matches("1002", "1000", tolerance=1e-3)


def test_exact_answer_rewards_and_unparseable_gets_lowest():
    v = exact_answer()
    assert v.one("3 + 5 = 8", "8").score == 1.0
    assert v.one("It is 9", "8").score == 0.0
    miss = v.one("I cannot say", "8")
    assert miss.score == 0.0 and miss.reason == NO_ANSWER
    low = exact_answer(correct=1.0, wrong=-1.0)
    assert low.one("nothing", "8").score == -1.0 and low.one("8", "8").score == 1.0
    first = exact_answer(how="first-number")
    assert first.one("3 + 5 = 8", "8").score == 0.0 and first.one("8, since 3 + 5 = 8", "8").score == 1.0


def test_missing_reference_is_an_error_naming_the_row():
    with pytest.raises(UserError, match="row 3.*reference"):
        exact_answer().one("8", None, where="generations row 3")


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="extract must be"):
        exact_answer(how="middle-number")
    with pytest.raises(UserError, match="needs pattern"):
        exact_answer(how="regex")
    with pytest.raises(UserError, match="invalid pattern"):
        exact_answer(how="regex", pattern="(")


def test_math_verify_symbolic_equivalence():
    pytest.importorskip("math_verify")
    v = math_verify()
    assert v.one(r"The answer is $\frac{1}{2}$", "0.5").score == 1.0
    assert v.one(r"The answer is $\frac{1}{3}$", "0.5").score == 0.0
    assert v.one("I do not know", "0.5").reason == NO_ANSWER
