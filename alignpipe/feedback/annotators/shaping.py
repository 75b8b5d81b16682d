"""Reward shaping annotators and the per-component summary of a combined reward.

    overlong,max_tokens=L_MAX[,cache=L_CACHE]   DAPO's soft overlong punishment of the answer's length in tokens
    format[:REGEX]                              1 when the whole answer matches REGEX (a `\\boxed{...}` with
                                                something inside when no REGEX is given), else 0

Both are pointwise rules meant to be added to a verifier's reward with a weight (`alignpipe annotate
--annotator exact-answer --annotator overlong,max_tokens=16,cache=4,weight=0.5`): annotate combines
pointwise annotators as r = sum_k w_k * score_k (`stages.annotate`) and the group task of build-batches
reads that combined reward. `component_means` is what annotate's manifest records per annotator.
"""
from __future__ import annotations

import math
import re

from alignpipe.core.errors import UserError
from alignpipe.feedback.annotators import Verdict
from alignpipe.feedback.annotators.rules import Rule
from alignpipe.feedback.annotators.verifiers import boxed


def overlong_penalty(length: int, *, max_tokens: int, cache: int) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, eq. 13), |y| = `length` in tokens:

        R_length(y) = 0                                  if |y| <= L_max - L_cache
                      ((L_max - L_cache) - |y|) / L_cache if L_max - L_cache < |y| <= L_max
                      -1                                 if L_max < |y|

    with L_max = max_tokens and L_cache = cache (0 <= cache <= max_tokens; cache 0: -1 beyond L_max only).
    """
    start = max_tokens - cache
    if length <= start:
        return 0.0
    if length <= max_tokens:
        return (start - length) / cache
    return -1.0


class Overlong:
    """A pointwise annotator scoring each answer's length in tokens (`num_tokens`, from generate: the sampled
    tokens, EOS included when produced) by :func:`overlong_penalty`."""

    pairwise = False

    def __init__(self, name: str, max_tokens: int, cache: int):
        self.name, self.max_tokens, self.cache, self.inputs = name, max_tokens, cache, []

    def describe(self) -> dict:
        return {"name": self.name, "kind": "pointwise", "max_tokens": self.max_tokens, "cache": self.cache,
                "unit": "tokens"}

    def score(self, queries) -> list[Verdict]:
        out = []
        for q in queries:
            n = getattr(q, "num_tokens", None)
            if not n:
                raise UserError(f"{q.where}: annotator {self.name} needs the answer's length in tokens "
                                "(num_tokens, written by `alignpipe generate`); this row has none (imported?)")
            out.append(Verdict(score=overlong_penalty(n, max_tokens=self.max_tokens, cache=self.cache)))
        return out


def build_overlong(spec, runtime) -> Overlong:
    o = spec.options
    if o["max_tokens"] < 1 or not 0 <= o["cache"] <= o["max_tokens"]:
        raise UserError(f"--annotator '{spec.text}': need max_tokens >= 1 and 0 <= cache <= max_tokens, found "
                        f"max_tokens={o['max_tokens']}, cache={o['cache']}")
    return Overlong(spec.identity(), o["max_tokens"], o["cache"])


def has_boxed(response: str) -> bool:
    r"""Whether the response holds a `\boxed{...}` with braces balanced and something inside."""
    inside = boxed(response)
    return inside is not None and bool(inside.strip())


def build_format(spec, runtime) -> Rule:
    """1 when the stripped response matches the whole pattern (re.fullmatch, '.' matching newlines too), or
    holds a non-empty `\\boxed{}` when no pattern is given; else 0."""
    pattern = spec.arg
    if pattern is None:
        return Rule(spec.identity(), lambda prompt, response: float(has_boxed(response)), {"check": "boxed"})
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise UserError(f"--annotator '{spec.text}': invalid regular expression ({e})")
    return Rule(spec.identity(), lambda prompt, response: float(bool(compiled.fullmatch(response.strip()))),
                {"check": "fullmatch", "pattern": pattern})


def component_means(out, annotators: list, weights: list[float]) -> dict:
    """Per annotator of an annotate output: its weight, the mean of its scores over the distinct responses it
    scored (pointwise; abstentions left out) or of its preferences over the rows (pairwise), and how many."""
    keys = zip(out["prompt_id"], out["iteration"], out["response1_sample_index"], out["response2_sample_index"])
    seen: dict = {a.name: {} for a in annotators}
    for (pid, it, s1, s2), raw in zip(keys, out["raw"]):
        for r in raw:
            values = seen.setdefault(r["name"], {})
            if r["preference"] is not None:
                values[(pid, it, s1, s2, "pair")] = r["preference"]
            for score, sample in ((r["score1"], s1), (r["score2"], s2)):
                if score is not None:  # an abstaining verdict has no score
                    values[(pid, it, sample)] = score
    result = {}
    for a, w in zip(annotators, weights):
        values = list(seen.get(a.name, {}).values())
        mean = math.fsum(values) / len(values) if values else None
        result[a.name] = {"weight": w, "mean": mean, "count": len(values)}
    return result
