"""Rule annotators (pointwise, deterministic, no model): length, regular expression, VADER sentiment, and a
user function named explicitly as `function:MODULE:FN` (user code runs only when named on the command line).
"""
from __future__ import annotations

import math
import re
import sys

from alignpipe.core.errors import UserError
from alignpipe.feedback.annotators import Query, Verdict, load_function


class Rule:
    """A pointwise annotator from a per-response function `fn(prompt, response) -> float | None`."""

    pairwise = False

    def __init__(self, name: str, fn, about: dict | None = None, with_reference: bool = False):
        self.name, self.fn, self.about, self.inputs = name, fn, about or {}, []
        self.with_reference = with_reference  # fn(prompt, response, reference)

    def describe(self) -> dict:
        return {"name": self.name, "kind": "pointwise", **self.about}

    def score(self, queries: list[Query]) -> list[Verdict]:
        return [self._one(q) for q in queries]

    def _one(self, q: Query) -> Verdict:
        try:
            value = self.fn(q.prompt, q.response, q.reference) if self.with_reference else self.fn(q.prompt, q.response)
        except Exception as e:  # noqa: BLE001 - user code: any failure becomes a one-line error
            raise UserError(f"{q.where}: annotator {self.name} raised {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160] if str(e) else ''}")
        if value is None:
            return Verdict(abstained=True, reason=f"{self.name} returned None")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{q.where}: annotator {self.name} returned {type(value).__name__} {value!r}; "
                            f"expected a number or None")
        if not math.isfinite(value):
            raise UserError(f"{q.where}: annotator {self.name} returned a non-finite reward ({value})")
        return Verdict(score=float(value))


def build_length(spec, runtime) -> Rule:
    unit = spec.options["unit"]
    if unit not in ("chars", "words"):
        raise UserError(f"--annotator '{spec.text}': unit must be chars or words, found '{unit}'")
    count = len if unit == "chars" else (lambda text: len(text.split()))
    return Rule(spec.identity(), lambda prompt, response: float(count(response)), {"unit": unit})


def build_regex(spec, runtime) -> Rule:
    try:
        pattern = re.compile(spec.arg)
    except re.error as e:
        raise UserError(f"--annotator '{spec.text}': invalid regular expression ({e})")
    if spec.options["count"]:
        fn = lambda prompt, response: float(len(pattern.findall(response)))
    else:
        fn = lambda prompt, response: 1.0 if pattern.search(response) else 0.0
    return Rule(spec.identity(), fn, {"pattern": spec.arg, "count": spec.options["count"]})


def build_vader(spec, runtime) -> Rule:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise UserError("annotator vader: package vadersentiment is not installed "
                        "(pip install vadersentiment)")
    analyzer = SentimentIntensityAnalyzer()
    return Rule(spec.identity(), lambda prompt, response: analyzer.polarity_scores(response)["compound"],
                {"package": "vadersentiment"})


def build_function(spec, runtime) -> Rule:
    fn = load_function(spec.arg, f"--annotator '{spec.text}'")
    module_file = getattr(sys.modules.get(getattr(fn, "__module__", "")), "__file__", None)
    return Rule(spec.identity(), fn, {"function": spec.arg, "module_file": module_file}, _takes_reference(fn))


def _takes_reference(fn) -> bool:
    """Whether a user function takes the reference: three positional parameters (or *args)."""
    import inspect

    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)
