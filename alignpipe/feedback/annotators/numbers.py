r"""Reading numbers as language models write them, for the verifiers (`exact-answer`).

Every number-like token of a text is either READ (a value), REFUSED (it looks like a number but its value is
ambiguous: the answer is then unparsed, never a different number) or SKIPPED (digits inside a word: `x_1`,
`cm^2`, `H2O`). What is read (the table in docs/verifiers.md, one test row per case in tests/test_verifiers.py):

- Unicode: NFKC (full-width digits and signs), every Unicode decimal digit (Arabic-Indic, Devanagari, ...),
  minus signs U+2212, U+2012, U+2013, U+2010, U+2011, U+FE63, U+2796 as '-', Arabic decimal and thousands
  separators, superscript exponents (10³, 10⁻³), vulgar fractions (½, 3½);
- a sign attached to the digits (`-5`, `−5`) or the words `minus` / `negative` before them; decimals without a
  leading zero (`.5`); thousands groups of exactly three digits joined by one separator `,` ` ` `_` `'`
  (`1,234`, `1 234`, `1_234`, LaTeX `1{,}234` and `1\,234`);
- fractions of integers (`3/4`, `\frac{3}{4}`, `\dfrac34`); scientific notation (`1e3`, `1.5×10^3`,
  `1.5 \times 10^{3}`, `1.5*10**3`); integer powers (`2^10`); percentages (`50%`, `50\%`, `50 percent`: they
  match both 50 and 0.5, as math-verify does); currency before and units after (`$5`, `5 cm`, `5 apples`,
  `90^\circ`); `\boxed{}`, `\text{}`, `\mathrm{}` unwrapped.

What is refused: a decimal comma or other separator run that is not a thousands grouping (`3,5`, `1,23,456`,
`1.234,5`, `1.2.3`); a number that is an operand (`10 - 2`, `2 × 3`, `(1+2)/3`, `3:4`, a mixed number `1 1/2`,
two numbers side by side `2023 100`); a number under a root, a brace or a command (`\sqrt{2}`, `√2`,
`\frac{\pi}{2}`), followed by `!`, `π`, `\pi`, a power or a slash not read above, or glued to a variable
(`2x`); a value that overflows.
"""
from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from fractions import Fraction

MINUS = "\u2212\u2012\u2013\u2010\u2011\ufe63\u2796"
_SUPER = dict(zip("⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺", "0123456789-+"))
_VULGAR = {"½": (1, 2), "⅓": (1, 3), "⅔": (2, 3), "¼": (1, 4), "¾": (3, 4), "⅕": (1, 5), "⅖": (2, 5),
           "⅗": (3, 5), "⅘": (4, 5), "⅙": (1, 6), "⅚": (5, 6), "⅛": (1, 8), "⅜": (3, 8), "⅝": (5, 8),
           "⅞": (7, 8)}
_LATEX = [  # (pattern, replacement), in order, after unicode normalisation
    (r"\\[dt]?frac\s*\{\s*([-+]?\d+)\s*\}\s*\{\s*(\d+)\s*\}", r"\1/\2"), (r"\\[dt]?frac(\d)(\d)", r"\1/\2"),
    (r"\\(?:boxed|text|textbf|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}", r" \1 "),
    (r"(?<=\d)\{,\}(?=\d)", ","), (r"(?<=\d)\\[,;:! ](?=\d{3}(?!\d))", " "), (r"\\[,;:!]", " "),
    (r"\\%", "%"), (r"\\\$", "$"), (r"\\times", "×"), (r"\\cdot", "·"), (r"\\div", "÷"),
    (r"\^\s*\{?\s*\\circ\s*\}?", "°"), (r"\\left|\\right", ""), (r"\$", " "),
]
_INT = r"(?:\d{1,3}(?P<sep>[,_' ])\d{3}(?:(?P=sep)\d{3})*(?!\d)|\d+)"
TOKEN = re.compile(rf"""
    (?P<sign>(?<![\w)\]}}.])[-+])?
    (?:(?P<int>{_INT})(?P<dec>\.\d+)?|(?P<lead>(?<![\d.])\.\d+))
    (?:(?P<den>\s*/\s*\d+(?![\d.,]))
      |(?P<sci>[eE][-+]?\d+(?![\d.]))
      |\s*(?:[×xX*·])\s*10\s*(?:\^|\*\*)\s*(?:\{{\s*(?P<sci10>[-+]?\d+)\s*\}}|(?P<sci10b>[-+]?\d+))(?![\d.])
      |\s*(?:\^|\*\*)\s*(?:\{{\s*(?P<pow>[-+]?\d+)\s*\}}|(?P<powb>[-+]?\d+))(?![\d.])
    )?
    (?P<pct>\s*(?:%|\bpercent\b|\bper\s+cent\b))?
""", re.VERBOSE | re.IGNORECASE)
_SKIP_BEFORE = re.compile(r"[^\W\d][\^_]?\{?$")  # digits inside a word: x_1, cm^2, H2O
_REFUSE_BEFORE = re.compile(r"(?:(?:[\w)\]}%]\s*[-+*/×÷·^]|\d\s*[:xX]|√|\\sqrt|\\root)\s*|\d[,.'_]|\d\s+|\{"
                            r"|[\d)\]}%]\s*(?:plus|minus|times|over|divided\s+by)\s+)$", re.IGNORECASE)
_REFUSE_AFTER = re.compile(r"^(?:\s*(?:[/^!√π{]|\\pi|\\sqrt)|\(|[,.'_]\d|[xyzijnabc](?![A-Za-z]))")
_NEGATIVE = re.compile(r"\b(?:minus|negative)\s+$", re.IGNORECASE)


@dataclass(frozen=True)
class Number:
    """A token of the normalised text (`text` reads back as `value`), its value (None: refused), whether it had a
    percent sign, its span."""

    text: str
    value: float | None
    percent: bool
    start: int
    end: int


def normalise(text: str) -> str:
    """Unicode and LaTeX forms of numbers as plain ASCII ones (module doc); positions are of the result."""
    text = re.sub(r"(\d*)([" + "".join(_VULGAR) + "])",
                  lambda m: _vulgar(m.group(1), *_VULGAR[m.group(2)]), text)
    text = re.sub("[" + "".join(_SUPER) + "]+", lambda m: "^" + "".join(_SUPER[c] for c in m.group()), text)
    text = unicodedata.normalize("NFKC", text)
    out = []
    for c in text:
        d = unicodedata.decimal(c, None)
        out.append(str(d) if d is not None and not c.isascii() else
                   "-" if c in MINUS else {"٫": ".", "٬": ",", "٪": "%", "⁄": "/", "∕": "/"}.get(c, c))
    text = "".join(out)
    for pattern, repl in _LATEX:
        text = re.sub(pattern, repl, text)
    return text


def _vulgar(whole: str, num: int, den: int) -> str:
    return f"{int(whole) * den + num}/{den}" if whole else f" {num}/{den}"


def numbers(text: str) -> list[Number]:
    """The number tokens of `text` after `normalise`, in order, skipped ones left out."""
    text = normalise(text)
    found = []
    for m in TOKEN.finditer(text):
        before, after = text[max(0, m.start() - 64):m.start()], text[m.end():m.end() + 64]  # the context the rules read
        if _SKIP_BEFORE.search(before):
            continue
        value = None if _REFUSE_BEFORE.search(before) or _REFUSE_AFTER.search(after) else _value(m)
        token = m.group().strip()
        if value is not None and not m.group("sign") and _NEGATIVE.search(before):
            value, token = -value, "-" + token
        found.append(Number(token, value, bool(m.group("pct")), m.start(), m.end()))
    return found


def _value(m: re.Match) -> float | None:
    """The value of a TOKEN match, exact until the final float; None when a denominator is 0 or it overflows."""
    g = m.groupdict()
    mantissa = (g["int"] or "0") + (g["dec"] or g["lead"] or "")
    x = Fraction(re.sub(r"[,_' ]", "", mantissa))
    if g["den"]:
        den = int(g["den"].strip().lstrip("/"))
        if den == 0 or g["dec"]:
            return None
        x /= den
    exp = next((int(g[k]) for k in ("sci10", "sci10b") if g[k]), int(g["sci"][1:]) if g["sci"] else 0)
    power = g["pow"] or g["powb"]
    if abs(exp) > 400 or (power and abs(int(power)) > 400):
        return None
    x *= Fraction(10) ** exp
    if power:
        if x == 0 and int(power) < 0:
            return None
        x = x ** int(power)
    try:
        value = float(x) * (-1 if g["sign"] == "-" else 1)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


_PREFIX = re.compile(r"^\s*(?:[^\W\d]\w*\s*=\s*)?[$€£¥]?\s*$")
_SUFFIX = re.compile(r"^[\s\w°%./^()]*$")


def as_number(text: str) -> Number | None:
    """`text` as one number read (a currency sign and `name =` before it and a unit after it allowed), else
    None."""
    found = numbers(text)
    if len(found) != 1 or found[0].value is None:
        return None
    n, plain = found[0], normalise(text)
    if not _PREFIX.match(plain[:n.start]) or not _SUFFIX.match(plain[n.end:]):
        return None
    return n


def equal(a: Number, r: Number, tolerance: float) -> bool:
    """|a - r| <= tolerance * max(1, |r|), where a number written with % stands for p or p/100."""
    def values(n: Number) -> list[float]:
        return [n.value, n.value / 100] if n.percent else [n.value]

    return any(abs(x - y) <= tolerance * max(1.0, abs(y)) for x in values(a) for y in values(r))
