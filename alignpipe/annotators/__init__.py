"""Annotators: what turns responses into rewards (pointwise) or preferences (pairwise).

One table, `ANNOTATORS`, drives the CLI (`alignpipe annotate --help` lists it), the docs and the
parametrised tests. A spec on the command line is

    NAME[:ARG][,key=value...]   e.g.  reward-model:runs/rm    pairwise-judge:MODEL,template=conciseness
                                      http:https://api.x/v1,model=gpt-4o-mini,key_env=OPENAI_API_KEY
                                      length,weight=-0.01    regex:\\bsorry\\b    function:mypkg.scores:fn

Every annotator takes `weight=W` (see `stages.annotate` for how weights combine). A `key=value` segment
whose key the annotator does not know is an error, except for the free-text ARG of `regex` and `function`,
where it is part of the ARG.

An annotator object has: `name` (its identity, recorded in the output), `pairwise` (bool), `inputs`
(model folders / template files whose fingerprints decide up-to-date), `describe()` (a dict for the
manifest: identity, options, template text), and either `score(queries)` (pointwise: one `Verdict.score`
per query) or `compare(queries)` (pairwise: `Verdict.preference` = P(query.response preferred over
query.response2) with `p12` / `p21` the two presentation orders). Heavy imports happen in the factories.
"""
from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from alignpipe import PIPELINES_DIR
from alignpipe.errors import UserError

TEMPLATE_DIR = PIPELINES_DIR / "templates"


@dataclass
class Query:
    """One thing to annotate: a response (pointwise) or two responses (pairwise) to one prompt."""

    prompt: str
    messages: list
    response: str
    response2: str | None = None
    where: str = ""  # the row, for error messages


@dataclass
class Verdict:
    score: float | None = None
    preference: float | None = None
    p12: float | None = None  # P(first shown is better) with response1 shown first
    p21: float | None = None  # P(first shown is better) with response2 shown first
    abstained: bool = False
    reason: str | None = None


@dataclass
class Runtime:
    """Settings shared by every annotator of a run (stage flags)."""

    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 8
    cache_dir: Path | None = None


@dataclass(frozen=True)
class Option:
    default: object
    doc: str
    kind: type = str  # str | int | float | bool


@dataclass(frozen=True)
class AnnotatorInfo:
    factory: str  # "module:function" inside alignpipe.annotators, imported only when used
    pairwise: bool
    arg: str | None  # metavar of the required ARG, or None when the annotator takes none
    doc: str
    options: dict[str, Option] = field(default_factory=dict)
    free_arg: bool = False  # ARG may contain ',' and '=' (regex, function)
    model_arg: bool = False  # ARG is a local model folder (its fingerprint decides up-to-date)


_TEMPLATE = Option("helpfulness", "built-in template name (see pipelines/templates) or a .txt file")
_LABELS = Option("1/2", "the two answer tokens, first/second")
_SWAP = Option(True, "judge both orders and average (cancels position bias)", bool)

ANNOTATORS: dict[str, AnnotatorInfo] = {
    "reward-model": AnnotatorInfo(
        "reward_model:build", False, "PATH", "local sequence-classification model; score = its logit",
        {"max_length": Option(0, "keep the last this many tokens of each input (0: model maximum)", int)},
        model_arg=True),
    "pairwise-judge": AnnotatorInfo(
        "judge:build_pairwise", True, "MODEL_DIR",
        "local causal LM; P(first better) = softmax of the two answer tokens' log-probs",
        {"template": _TEMPLATE, "labels": _LABELS, "swap": _SWAP}, model_arg=True),
    "pointwise-judge": AnnotatorInfo(
        "judge:build_pointwise", False, "MODEL_DIR",
        "local causal LM; score = expected value over the score tokens 1..scale",
        {"template": _TEMPLATE, "scale": Option(5, "top of the 1..scale score (2..9: one token each)", int)},
        model_arg=True),
    "http": AnnotatorInfo(
        "http_judge:build", True, "BASE_URL", "OpenAI-compatible /chat/completions pairwise judge", {
            "model": Option(None, "model name sent to the endpoint (required)"),
            "key_env": Option("OPENAI_API_KEY", "environment variable holding the API key ('' for none)"),
            "concurrency": Option(8, "requests in flight at most", int),
            "timeout": Option(30.0, "seconds per request", float),
            "retries": Option(5, "retries on 429, 5xx, timeouts and connection errors", int),
            "backoff": Option(1.0, "first retry delay in seconds, doubled each retry, plus jitter", float),
            "max_tokens": Option(8, "max_tokens of the reply", int),
            "template": _TEMPLATE, "labels": _LABELS, "swap": _SWAP}),
    "length": AnnotatorInfo(
        "rules:build_length", False, None, "length of the response (a negative weight prefers shorter)",
        {"unit": Option("chars", "chars | words")}),
    "regex": AnnotatorInfo(
        "rules:build_regex", False, "PATTERN", "1 if the pattern occurs in the response, else 0",
        {"count": Option(False, "score = number of matches instead", bool)}, free_arg=True),
    "vader": AnnotatorInfo("rules:build_vader", False, None, "VADER sentiment compound score in [-1, 1]"),
    "function": AnnotatorInfo("rules:build_function", False, "MODULE:FN",
                              "your fn(prompt, response) -> float | None (None = abstain)", free_arg=True),
}
WEIGHT = Option(None, "weight of this annotator in the combination", float)


@dataclass
class Spec:
    name: str
    arg: str | None
    options: dict
    weight: float | None
    text: str

    @property
    def info(self) -> AnnotatorInfo:
        return ANNOTATORS[self.name]

    def identity(self) -> str:
        """The canonical spec: name, arg and the options that differ from their defaults, sorted."""
        defaults = self.info.options
        opts = [f"{k}={_show(v)}" for k, v in sorted(self.options.items()) if v != defaults[k].default]
        head = self.name + (f":{self.arg}" if self.arg is not None else "")
        return ",".join([head] + opts)


def _show(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _convert(value: str, opt: Option, where: str):
    if opt.kind is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"{where}: expected true or false, found '{value}'")
    try:
        return opt.kind(value)
    except ValueError:
        raise UserError(f"{where}: expected {opt.kind.__name__}, found '{value}'")


def parse_spec(text: str) -> Spec:
    """Parse `NAME[:ARG][,key=value...]`; one-line UserError naming the spec on every problem."""
    where = f"--annotator '{text}'"
    head, _, rest = text.partition(",")
    name, colon, arg = head.partition(":")
    name = name.strip()
    if name not in ANNOTATORS:
        raise UserError(f"{where}: unknown annotator '{name}' (known: {', '.join(ANNOTATORS)})")
    info = ANNOTATORS[name]
    known = {**info.options, "weight": WEIGHT}
    arg_parts, options = ([arg] if colon else []), {}
    for seg in rest.split(",") if rest else []:
        key, eq, value = seg.partition("=")
        key = key.strip()
        if eq and key in known:
            options[key] = _convert(value.strip(), known[key], f"{where}: option {key}")
        elif info.free_arg and arg_parts:
            arg_parts.append(seg)
        else:
            raise UserError(f"{where}: unknown option '{key}' for {name} "
                            f"(known: {', '.join(sorted(known))})")
    arg = ",".join(arg_parts) if arg_parts else None
    if info.arg is None and arg is not None:
        raise UserError(f"{where}: {name} takes no ':ARG'")
    if info.arg is not None and not arg:
        raise UserError(f"{where}: {name} needs an argument: {name}:{info.arg}")
    weight = options.pop("weight", None)
    full = {k: options.get(k, o.default) for k, o in info.options.items()}
    missing = [k for k, v in full.items() if v is None]
    if missing:
        raise UserError(f"{where}: {name} needs option(s) {', '.join(k + '=...' for k in missing)}")
    return Spec(name, arg, full, weight, text)


def spec_inputs(spec: Spec) -> list[Path]:
    """The files whose fingerprints decide up-to-date (model folder, template file, the user function's
    module file), checked before any model is loaded."""
    from alignpipe.models import check_model_folder

    paths = []
    if spec.info.model_arg:
        paths.append(check_model_folder(spec.arg, f"--annotator '{spec.text}':"))
    if spec.name == "function":
        fn = load_function(spec.arg, f"--annotator '{spec.text}'")
        origin = getattr(sys.modules.get(getattr(fn, "__module__", "")), "__file__", None)
        paths += [Path(origin)] if origin else []
    if "template" in spec.options:
        mode = "pairwise" if spec.info.pairwise else "pointwise"
        paths.append(load_template(spec.options["template"], mode)[1])
    return paths


def build(spec: Spec, runtime: Runtime):
    """Instantiate the annotator of a parsed spec (imports its module, loads its model)."""
    module, fn = spec.info.factory.split(":")
    return getattr(importlib.import_module(f"alignpipe.annotators.{module}"), fn)(spec, runtime)


def help_text() -> str:
    """The table as text, for `alignpipe annotate --help` and the docs."""
    lines = []
    for name, info in ANNOTATORS.items():
        kind = "pairwise" if info.pairwise else "pointwise"
        head = name + (f":{info.arg}" if info.arg else "")
        opts = ", ".join(f"{k}={'(required)' if o.default is None else _show(o.default)}"
                         for k, o in info.options.items())
        lines.append(f"{head} ({kind}): {info.doc}" + (f" [{opts}]" if opts else ""))
    return "\n".join(lines)


# -- templates ------------------------------------------------------------------------------------------
_PLACEHOLDER = re.compile(r"\{(prompt|response|response_a|response_b|label_a|label_b|scale)\}")
NEEDS = {"pairwise": ("{response_a}", "{response_b}"), "pointwise": ("{response}",)}


def builtin_templates(mode: str) -> list[str]:
    return sorted(p.stem.split("-", 1)[1] for p in TEMPLATE_DIR.glob(f"{mode}-*.txt"))


def load_template(name: str, mode: str) -> tuple[str, Path]:
    """(text, file) of a built-in template name or a template file; checks its placeholders."""
    path = Path(name)
    if not (name.endswith(".txt") or "/" in name):
        path = TEMPLATE_DIR / f"{mode}-{name}.txt"
        if not path.is_file():
            raise UserError(f"template '{name}': no built-in {mode} template of that name "
                            f"(known: {', '.join(builtin_templates(mode))}; or give a .txt file)")
    if not path.is_file():
        raise UserError(f"template {path}: no such file")
    text = path.read_text().rstrip("\n")
    missing = [p for p in NEEDS[mode] if p not in text]
    if missing:
        raise UserError(f"template {path}: a {mode} template needs {' and '.join(missing)}")
    return text, path


def prompt_text(prompt: str, messages: list) -> str:
    """The prompt as a judge sees it: the text, or a transcript of a multi-turn conversation."""
    if messages and len(messages) > 1:
        return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
    return prompt


def fill(template: str, **values) -> str:
    """Substitute the known {placeholders} only (other braces, e.g. JSON examples, stay as they are)."""
    return _PLACEHOLDER.sub(lambda m: str(values.get(m.group(1), m.group(0))), template)


def parse_labels(text: str, where: str) -> tuple[str, str]:
    a, sep, b = text.partition("/")
    if not sep or not a or not b or a == b:
        raise UserError(f"{where}: labels must be two different answers as A/B, found '{text}'")
    return a, b


# -- combining two presentation orders ------------------------------------------------------------------
_GRID = 2.0 ** 32


def quantise(p: float) -> float:
    """p rounded to a multiple of 2^-32 (far below any meaningful difference of probabilities)."""
    return round(p * _GRID) / _GRID


def swap_average(p12: float, p21: float) -> float:
    """P(1 > 2) = 1/2 [P_12 + (1 - P_21)] where P_12, P_21 are P(first shown is better) in each order.

    On the 2^-32 grid every step is exact in float64, so swapping the pair gives exactly 1 - P:
    swap_average(p21, p12) == 1 - swap_average(p12, p21), bit for bit.
    """
    return 0.5 * (quantise(p12) + (1.0 - quantise(p21)))


def load_function(target: str, where: str) -> Callable:
    """Import `pkg.module:fn` (the current directory is searched too); one-line errors."""
    module, colon, attr = target.partition(":")
    if not colon or not module or not attr:
        raise UserError(f"{where}: expected MODULE:FUNCTION, e.g. mypkg.rewards:score, found '{target}'")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.append(str(Path.cwd()))
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"{where}: cannot import module '{module}' ({e})")
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise UserError(f"{where}: module '{module}' has no function '{attr}'")
    return fn
