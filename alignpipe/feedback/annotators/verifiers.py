"""Verifiers: pointwise annotators that check a response's final answer against the prompt's `reference`.

    exact-answer[,extract=last-number|first-number|boxed|regex][,pattern=RE][,tolerance=1e-6]
    math-verify                     (Hugging Face's `math-verify` package: symbolic equivalence; optional extra)
    function:MODULE:FN              fn(prompt, response, reference) -> float | None  (the reference is passed
                                    when the function takes three parameters; see rules.build_function)

Reward: `correct` (1) when the answer matches, `wrong` (0) otherwise. An answer with nothing parseable gets the
lowest reward, min(correct, wrong), and the verdict's reason says so: `alignpipe annotate` counts those rows in
its manifest (`unparsed`). A row without a reference is an error naming it.

Numbers are read as models write them (alignpipe.feedback.annotators.numbers: Unicode signs and digits, `.5`,
thousands groups, fractions, percentages, scientific notation, units, LaTeX), or refused as unparsed when
their value is ambiguous, never read as a different number (the table: docs/verifiers.md). `last-number` and
`first-number` take the last / first number token; a refused one makes the answer unparsed.

Matching in `exact-answer`: when both the extracted answer and the reference read as one number each,
|a - r| <= tolerance * max(1, |r|) (a percentage p stands for p or p/100); otherwise the normalised strings are
equal (case-folded, surrounding whitespace, `$` and a trailing period removed, inner whitespace collapsed).
"""
from __future__ import annotations

import re

from alignpipe.core.errors import UserError
from alignpipe.feedback.annotators import Verdict
from alignpipe.feedback.annotators.numbers import as_number, equal, numbers

EXTRACTORS = ("last-number", "first-number", "boxed", "regex")
NO_ANSWER = "no answer found"


def boxed(text: str) -> str | None:
    r"""The content of the last \boxed{...} (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{") - 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1: j]
    return None


def extract(text: str, how: str = "last-number", pattern: str | None = None) -> str | None:
    """The final answer in `text` by rule `how` (see EXTRACTORS); `regex` takes group 1 of the last match of
    `pattern` (the whole match when it has no group). None when nothing is found."""
    if how in ("last-number", "first-number"):
        found = numbers(text)
        n = (found[-1] if how == "last-number" else found[0]) if found else None
        return None if n is None or n.value is None else n.text
    if how == "boxed":
        return boxed(text)
    if how == "regex":
        matches = list(re.finditer(pattern or "", text))
        if not matches:
            return None
        m = matches[-1]
        return m.group(1) if m.re.groups else m.group()
    raise ValueError(f"extract {how!r}: choose from {', '.join(EXTRACTORS)}")


def normalise(text: str) -> str:
    return " ".join(text.strip().strip("$").strip().rstrip(".").casefold().split())


def matches(answer: str, reference: str, tolerance: float = 1e-6) -> bool:
    """Numbers within a relative tolerance, else equal normalised strings (module doc)."""
    a, r = as_number(answer), as_number(reference)
    if a is not None and r is not None:
        return equal(a, r, tolerance)
    return normalise(answer) == normalise(reference)


class Verifier:
    """A pointwise annotator from `check(response, reference) -> bool | None` (None: nothing parseable)."""

    pairwise = False

    def __init__(self, name: str, check, about: dict, correct: float = 1.0, wrong: float = 0.0):
        self.name, self.check, self.about, self.inputs = name, check, about, []
        self.correct, self.wrong = correct, wrong

    def describe(self) -> dict:
        return {"name": self.name, "kind": "pointwise", "verifier": True, "correct": self.correct,
                "wrong": self.wrong, **self.about}

    def score(self, queries) -> list[Verdict]:
        return [self.one(q.response, getattr(q, "reference", None), q.where) for q in queries]

    def one(self, response: str, reference: str | None, where: str = "") -> Verdict:
        if reference is None or not str(reference).strip():
            raise UserError(f"{where}: annotator {self.name} needs the prompt's reference answer; this row has none "
                            "(column `reference`, from `alignpipe import`)")
        ok = self.check(response, str(reference))
        if ok is None:
            return Verdict(score=min(self.correct, self.wrong), reason=NO_ANSWER)
        return Verdict(score=self.correct if ok else self.wrong)


def exact_answer(how: str = "last-number", pattern: str | None = None, tolerance: float = 1e-6, **kw) -> Verifier:
    if how not in EXTRACTORS:
        raise UserError(f"exact-answer: extract must be one of {', '.join(EXTRACTORS)}, found {how!r}")
    if how == "regex":
        try:
            re.compile(pattern or "")
        except re.error as e:
            raise UserError(f"exact-answer: invalid pattern ({e})")
        if not pattern:
            raise UserError("exact-answer: extract=regex needs pattern=REGEX")

    def check(response: str, reference: str) -> bool | None:
        answer = extract(response, how, pattern)
        return None if answer is None else matches(answer, reference, tolerance)

    return Verifier("exact-answer", check, {"extract": how, "pattern": pattern, "tolerance": tolerance}, **kw)


def math_verify(**kw) -> Verifier:
    """Symbolic equivalence by Hugging Face's math-verify: parse(reference) vs parse(response)."""
    try:
        from math_verify import parse, verify
    except ImportError:
        raise UserError("annotator math-verify: package math-verify is not installed (pip install 'alignpipe[math]' "
                        "or pip install math-verify)")

    def check(response: str, reference: str) -> bool | None:
        gold, answer = parse(reference), parse(response)
        if not answer:
            return None
        return bool(verify(gold, answer))

    return Verifier("math-verify", check, {"package": "math-verify"}, **kw)


def build_exact_answer(spec, runtime) -> Verifier:
    o = spec.options
    v = exact_answer(o["extract"], o["pattern"], o["tolerance"], correct=o["correct"], wrong=o["wrong"])
    v.name = spec.identity()
    return v


def build_math_verify(spec, runtime) -> Verifier:
    v = math_verify(correct=spec.options["correct"], wrong=spec.options["wrong"])
    v.name = spec.identity()
    return v
