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


# ------------------------------------------------------------------ numbers as language models write them
# (response, reference, exact-answer's verdict, math-verify's verdict): docs/verifiers.md shows this table.
VERDICT = {True: "correct", False: "wrong", None: "unparsed"}
NUMBER_CASES = [
    # signs and digits in Unicode, signs in words
    ('The answer is −5', '5', 'wrong', 'unparsed'),
    ('The answer is −5', '-5', 'correct', 'unparsed'),
    ('The answer is －５', '-5', 'correct', 'unparsed'),
    ('The answer is ١٢٣', '123', 'correct', 'unparsed'),
    ('The answer is १२', '12', 'correct', 'unparsed'),
    ('The answer is minus 5', '5', 'wrong', 'correct'),
    ('The answer is minus 5', '-5', 'correct', 'wrong'),
    ('The answer is – 5', '5', 'unparsed', 'correct'),
    # decimals without a leading zero
    ('The answer is .5', '0.5', 'correct', 'correct'),
    ('The answer is .5', '5', 'wrong', 'wrong'),
    ('The answer is -.5', '-0.5', 'correct', 'unparsed'),
    # thousands separators, decimal commas refused
    ('Total: 1,234', '1234', 'correct', 'correct'),
    ('Total: 1 234', '1234', 'correct', 'correct'),
    ('Total: 1 234', '234', 'wrong', 'wrong'),
    ('Total: 1_234', '1234', 'correct', 'wrong'),
    ("Total: 1'234", '1234', 'correct', 'wrong'),
    ('Total: $1{,}234$', '1234', 'correct', 'correct'),
    ('Total: $1\\,234$', '1234', 'correct', 'wrong'),
    ('Total: 1,234,567', '1234567', 'correct', 'correct'),
    ('Total: 1.234.567', '567', 'unparsed', 'wrong'),
    ('It is 3,5', '5', 'unparsed', 'wrong'),
    ('It is 3,5', '3.5', 'unparsed', 'correct'),
    ('Total: 1,23,456', '456', 'unparsed', 'wrong'),
    # fractions
    ('Answer: 3/4', '0.75', 'correct', 'correct'),
    ('Answer: 3/4', '4', 'wrong', 'wrong'),
    ('Answer: $\\frac{3}{4}$', '0.75', 'correct', 'correct'),
    ('Answer: $\\dfrac34$', '3/4', 'correct', 'correct'),
    ('Answer: $-\\frac{3}{4}$', '-0.75', 'correct', 'correct'),
    ('Answer: 1 1/2', '0.5', 'unparsed', 'wrong'),
    ('Answer: 3½', '3.5', 'correct', 'wrong'),
    ('Answer: 3½', '0.5', 'wrong', 'wrong'),
    ('Answer: $\\frac{\\pi}{2}$', '2', 'unparsed', 'wrong'),
    ('Answer: 1/0', '0', 'unparsed', 'wrong'),
    # percentages (p matches p and p/100, as math-verify)
    ('It rose by 50%', '50', 'correct', 'correct'),
    ('It rose by 50%', '0.5', 'correct', 'correct'),
    ('It rose by $50\\%$', '50', 'correct', 'correct'),
    ('It rose by 50 percent', '50', 'correct', 'correct'),
    # scientific notation and powers
    ('Answer: 1e3', '1000', 'correct', 'wrong'),
    ('Answer: 1.5×10^3', '1500', 'correct', 'wrong'),
    ('Answer: 1.5×10^3', '3', 'wrong', 'wrong'),
    ('Answer: $1.5 \\times 10^{3}$', '1500', 'correct', 'correct'),
    ('Answer: 1.5 × 10³', '1500', 'correct', 'wrong'),
    ('Answer: 2.5*10**-2', '0.025', 'correct', 'correct'),
    ('Answer: 2^10', '1024', 'correct', 'correct'),
    ('Answer: 2^10', '10', 'wrong', 'wrong'),
    ('Answer: 1e999', '1', 'unparsed', 'correct'),
    # currency, units, degrees
    ('It costs $5', '5', 'correct', 'correct'),
    ('It costs $5.00.', '5', 'correct', 'correct'),
    ('It costs 5 dollars', '5', 'correct', 'correct'),
    ('Length: 5 cm', '5', 'correct', 'correct'),
    ('Area: 25 cm²', '25', 'correct', 'correct'),
    ('She has 12 apples.', '12', 'correct', 'correct'),
    ('Angle: 90^\\circ', '90', 'correct', 'correct'),
    ('Angle: 90°', '90', 'correct', 'correct'),
    # LaTeX boxed and text
    ('So \\boxed{42}', '42', 'correct', 'correct'),
    ('So \\boxed{42} apples', '42', 'correct', 'correct'),
    ('So \\boxed{\\text{5 cm}}', '5', 'correct', 'wrong'),
    ('So $\\boxed{-\\frac{1}{2}}$', '-0.5', 'correct', 'correct'),
    # operands, roots, factorials, variables, dates, versions: refused
    ('So x = 10 - 2', '2', 'unparsed', 'wrong'),
    ('So 2 × 3', '3', 'unparsed', 'correct'),
    ('So 5!', '5', 'unparsed', 'correct'),
    ('So √2', '2', 'unparsed', 'unparsed'),
    ('So $\\sqrt{2}$', '2', 'unparsed', 'wrong'),
    ('So 2π', '2', 'unparsed', 'correct'),
    ('So 2x', '2', 'unparsed', 'correct'),
    ('So 5 minus 3', '-3', 'unparsed', 'wrong'),
    ('So 3:4', '4', 'unparsed', 'wrong'),
    ('Released 2024-01-05', '5', 'unparsed', 'wrong'),
    ('Version 1.2.3', '3', 'unparsed', 'wrong'),
    ('Use x_1 = 4', '4', 'correct', 'correct'),
    # digits inside words are not numbers
    ('CO2 count: 7', '7', 'correct', 'correct'),
]


def _verdict(v, response, reference):
    d = v.one(response, reference)
    return "unparsed" if d.reason == NO_ANSWER else VERDICT[d.score == 1.0]


@pytest.mark.parametrize("response, reference, ours, theirs", NUMBER_CASES)
def test_numbers_as_models_write_them(response, reference, ours, theirs):
    assert _verdict(exact_answer(), response, reference) == ours
    try:
        from math_verify import parse, verify
    except ImportError:
        return
    answer = parse(response)
    assert VERDICT[bool(verify(parse(reference), answer)) if answer else None] == theirs


def test_a_unicode_minus_is_a_sign_not_a_wrong_answer_scored_correct():
    """Before numbers.py, `−5` (U+2212) was read as 5: the wrong answer scored correct against 5."""
    v = exact_answer()
    assert v.one("The answer is \u22125", "5").score == 0.0 and v.one("The answer is \u22125", "-5").score == 1.0


@pytest.mark.parametrize("response, reference", [(r[0], r[1]) for r in NUMBER_CASES if r[2] == "correct"])
def test_an_answer_read_as_correct_is_wrong_against_any_other_number(response, reference):
    """Every row read as correct is wrong against the reference moved by max(1, |r|/1000) (beyond the tolerance),
    negated and times ten."""
    from alignpipe.feedback.annotators.numbers import as_number

    r = as_number(reference).value
    step = max(1.0, abs(r) / 1000)
    for other in {r + step, r - step, -r, 10 * r} - {r}:
        assert _verdict(exact_answer(), response, repr(other)) == "wrong", other
