"""The range of a hyperparameter, declared in its registry row next to its default (`ranges={"beta": ">0"}`).

    >0   >=0   <1   <=1              one bound
    [0,1]   [0,0.5)   (0,1]   [2,9]  an interval: brackets include the end, parentheses exclude it; inf allowed
    any                              every value (a reward, a sign-carrying weight)
    chars|words                      one of these words (a str hyperparameter)

`Registry.parse` checks every given value against its range (a one-line UserError naming the component, the key,
the value and the range); tests/test_registry.py feeds every registered hyperparameter a value just outside
its range (`outside`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cache

_BOUND = re.compile(r"^(>=|<=|>|<)\s*([-+]?(?:inf|[\d.]+(?:e[-+]?\d+)?))$")
_INTERVAL = re.compile(r"^([\[(])\s*([-+]?(?:inf|[\d.]+(?:e[-+]?\d+)?))\s*,\s*([-+]?(?:inf|[\d.]+(?:e[-+]?\d+)?))\s*([\])])$")


@dataclass(frozen=True)
class Range:
    """lo < x < hi with each end open or closed, or one of `choices` (words)."""

    text: str
    lo: float = -math.inf
    lo_closed: bool = False
    hi: float = math.inf
    hi_closed: bool = False
    choices: tuple[str, ...] = ()

    def contains(self, value) -> bool:
        if self.choices:
            return str(value) in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        above = value >= self.lo if self.lo_closed else value > self.lo
        below = value <= self.hi if self.hi_closed else value < self.hi
        return above and below

    def outside(self, kind: type) -> list:
        """Values of type `kind` just outside the range: the nearest float (or integer) beyond each finite end,
        or a word that is not a choice."""
        if self.choices:
            return ["not-" + self.choices[0]]
        out = []
        if math.isfinite(self.lo):
            out.append(self.lo if not self.lo_closed else (self.lo - 1 if kind is int else math.nextafter(self.lo, -math.inf)))
        if math.isfinite(self.hi):
            out.append(self.hi if not self.hi_closed else (self.hi + 1 if kind is int else math.nextafter(self.hi, math.inf)))
        return [kind(v) if kind is int else float(v) for v in out]


@cache
def parse_range(text: str) -> Range:
    """A Range from its text (module doc); ValueError on bad syntax (a registry row's mistake, not a user's)."""
    t = text.strip()
    if t == "any":
        return Range(t)
    if m := _BOUND.match(t):
        op, x = m.group(1), float(m.group(2))
        if op.startswith(">"):
            return Range(t, lo=x, lo_closed=op == ">=")
        return Range(t, hi=x, hi_closed=op == "<=")
    if m := _INTERVAL.match(t):
        lo, hi = float(m.group(2)), float(m.group(3))
        if lo > hi:
            raise ValueError(f"range {text!r}: the lower end is above the upper end")
        return Range(t, lo=lo, lo_closed=m.group(1) == "[", hi=hi, hi_closed=m.group(4) == "]")
    if re.fullmatch(r"[\w.+-]+(\|[\w.+-]+)+", t):
        return Range(t, choices=tuple(t.split("|")))
    raise ValueError(f"range {text!r}: expected >x, >=x, <x, <=x, [a,b] (brackets or parentheses), any, or a|b")
