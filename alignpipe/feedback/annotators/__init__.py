"""Annotators: what turns responses into rewards (pointwise) or preferences (pairwise).

One table, `ANNOTATORS`, drives the CLI (`alignpipe annotate --help` lists it), the docs and the
parametrised tests. A spec on the command line is

    NAME[:ARG][,key=value...]   e.g.  reward-model:runs/rm    pairwise-judge:MODEL,template=conciseness
                                      http:https://api.x/v1,model=gpt-4o-mini,key_env=OPENAI_API_KEY
                                      length,weight=-0.01    regex:\\bsorry\\b    function:mypkg.scores:fn

This is the registry's grammar (alignpipe.core.registry, one parser for every component). Every annotator takes
`weight=W` (see `stages.annotate` for how weights combine). A `key=value` segment whose key the annotator
does not know is an error, except for the free-text ARG of `regex` and `function`, where it is part of the
ARG. `load_function` (user functions named explicitly) is the registry's, shared with `reweight`.

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
from dataclasses import dataclass
from pathlib import Path

from alignpipe import PIPELINES_DIR
from alignpipe.core.errors import UserError
from alignpipe.core.registry import REQUIRED, Param, Registry, Spec, load_function

TEMPLATE_DIR = PIPELINES_DIR / "templates"


@dataclass
class Query:
    """One thing to annotate: a response (pointwise) or two responses (pairwise) to one prompt."""

    prompt: str
    messages: list
    response: str
    response2: str | None = None
    where: str = ""  # the row, for error messages
    reference: str | None = None  # the prompt's reference answer (verifiers compare against it)
    num_tokens: int | None = None  # the response's length in sampled tokens (generate's num_tokens; 0 imported)


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


_TEMPLATE = Param("helpfulness", str, "built-in template name (see pipelines/templates) or a .txt file")
_LABELS = Param("1/2", str, "the two answer tokens, first/second")
_SWAP = Param(True, bool, "judge both orders and average (cancels position bias)")
_WEIGHT = Param(None, float, "weight of this annotator in the combination (default 1)", nullable=True, range="any")

# One row per annotator: its factory ("module:function" in alignpipe.feedback.annotators, imported only when used;
# it gets the parsed spec and the Runtime), pairwise or pointwise, whether its ARG is a local model folder
# (its fingerprint decides up-to-date), and its hyperparameters as Params (the ARG is one of them).
ANNOTATORS = Registry("annotator", "--annotator", common={"weight": _WEIGHT},
                      doc="What turns responses into rewards or preferences (alignpipe/feedback/annotators/); "
                          "`annotate --annotator`.")
ANNOTATORS.add("reward-model", doc="local sequence-classification model; score = its logit", arg="path",
               params={"path": Param(REQUIRED, str, "the reward model's folder"),
                       "max_length": Param(0, int, "keep the last this many tokens of each input (0: model maximum)")},
               factory="reward_model:build", pairwise=False, model_arg=True, ranges={"max_length": ">=0"})
ANNOTATORS.add("pairwise-judge", doc="local causal LM; P(first better) = softmax of the two answer tokens' log-probs",
               arg="model_dir", params={"model_dir": Param(REQUIRED, str, "the judge model's folder"),
                                        "template": _TEMPLATE, "labels": _LABELS, "swap": _SWAP},
               factory="judge:build_pairwise", pairwise=True, model_arg=True)
ANNOTATORS.add("pointwise-judge", doc="local causal LM; score = expected value over the score tokens 1..scale",
               arg="model_dir", params={"model_dir": Param(REQUIRED, str, "the judge model's folder"),
                                        "template": _TEMPLATE,
                                        "scale": Param(5, int, "top of the 1..scale score (2..9: one token each)")},
               factory="judge:build_pointwise", pairwise=False, model_arg=True, ranges={"scale": "[2,9]"})
ANNOTATORS.add("http", doc="OpenAI-compatible /chat/completions pairwise judge", arg="base_url", params={
    "base_url": Param(REQUIRED, str, "the endpoint, http:// or https://"),
    "model": Param(REQUIRED, str, "model name sent to the endpoint"),
    "key_env": Param("OPENAI_API_KEY", str, "environment variable holding the API key ('' for none)"),
    "concurrency": Param(8, int, "requests in flight at most"),
    "timeout": Param(30.0, float, "seconds per request"),
    "retries": Param(5, int, "retries on 429, 5xx, timeouts and connection errors"),
    "backoff": Param(1.0, float, "first retry delay in seconds, doubled each retry, plus jitter"),
    "max_tokens": Param(8, int, "max_tokens of the reply"),
    "template": _TEMPLATE, "labels": _LABELS, "swap": _SWAP}, factory="http_judge:build", pairwise=True,
    model_arg=False, ranges={"concurrency": ">=1", "timeout": ">0", "retries": ">=0", "backoff": ">=0",
                             "max_tokens": ">=1"})
ANNOTATORS.add("length", doc="length of the response (a negative weight prefers shorter)",
               params={"unit": Param("chars", str, "chars | words")}, factory="rules:build_length", pairwise=False,
               model_arg=False, ranges={"unit": "chars|words"})
ANNOTATORS.add("regex", doc="1 if the pattern occurs in the response, else 0", arg="pattern", free_arg=True,
               params={"pattern": Param(REQUIRED, str, "a Python regular expression (may hold ',' and '=')"),
                       "count": Param(False, bool, "score = number of matches instead")},
               factory="rules:build_regex", pairwise=False, model_arg=False)
ANNOTATORS.add("vader", doc="VADER sentiment compound score in [-1, 1]", params={}, factory="rules:build_vader",
               pairwise=False, model_arg=False)
_CORRECT = Param(1.0, float, "reward of a correct answer", range="any")
_WRONG = Param(0.0, float, "reward of a wrong one (an answer with nothing parseable gets min(correct, wrong))",
               range="any")
ANNOTATORS.add("exact-answer", doc="verifier: the final answer of the response vs the prompt's reference "
               "(numbers within a tolerance, else normalised strings)",
               params={"extract": Param("last-number", str, "how the final answer is found: last-number | "
                                        "first-number | boxed | regex"),
                       "pattern": Param(None, str, "extract=regex: the regular expression (group 1 = the answer)",
                                        nullable=True),
                       "tolerance": Param(1e-6, float, "numbers match when |a - r| <= tolerance * max(1, |r|)"),
                       "correct": _CORRECT, "wrong": _WRONG},
               factory="verifiers:build_exact_answer", pairwise=False, model_arg=False,
               ranges={"extract": "last-number|first-number|boxed|regex", "tolerance": ">=0"})
ANNOTATORS.add("math-verify", doc="verifier: symbolic equivalence with the reference by Hugging Face's math-verify "
               "(optional extra: pip install 'alignpipe[math]')", params={"correct": _CORRECT, "wrong": _WRONG},
               factory="verifiers:build_math_verify", pairwise=False, model_arg=False)
ANNOTATORS.add("overlong", doc="DAPO soft overlong punishment of the answer's length in tokens: 0 up to "
               "max_tokens - cache, then falling linearly to -1 at max_tokens, -1 beyond",
               params={"max_tokens": Param(REQUIRED, int, "L_max: the length budget in tokens (generate's "
                                           "--max-new-tokens)"),
                       "cache": Param(0, int, "L_cache: the soft window before L_max (0: -1 beyond L_max only)")},
               factory="shaping:build_overlong", pairwise=False, model_arg=False,
               ranges={"max_tokens": ">=1", "cache": ">=0"})
ANNOTATORS.add("format", doc="format check: 1 if the whole answer matches PATTERN (a non-empty \\boxed{} without "
               "one), else 0", arg="pattern", free_arg=True,
               params={"pattern": Param(None, str, "a Python regular expression the stripped answer must match "
                                        "whole ('.' matches newlines); none: a \\boxed{...} must be present",
                                        nullable=True)},
               factory="shaping:build_format", pairwise=False, model_arg=False)
ANNOTATORS.add("function", doc="your fn(prompt, response[, reference]) -> float | None (None = abstain)", arg="target",
               metavar="MODULE:FN", free_arg=True,
               params={"target": Param(REQUIRED, str, "the function, as pkg.module:fn")},
               factory="rules:build_function", pairwise=False, model_arg=False)


def parse_spec(text: str):
    """An --annotator spec through the registry (`NAME[:ARG][,key=value...]`)."""
    return ANNOTATORS.parse(text)


def spec_inputs(spec: Spec) -> list[Path]:
    """The files whose fingerprints decide up-to-date (model folder, template file, the user function's
    module file), checked before any model is loaded."""
    from alignpipe.models.loading import check_model_folder

    paths = []
    if spec.component.model_arg:
        paths.append(check_model_folder(spec.arg, f"--annotator '{spec.text}':"))
    if spec.name == "function":
        fn = load_function(spec.arg, f"--annotator '{spec.text}'")
        origin = getattr(sys.modules.get(getattr(fn, "__module__", "")), "__file__", None)
        paths += [Path(origin)] if origin else []
    if "template" in spec.options:
        mode = "pairwise" if spec.component.pairwise else "pointwise"
        paths.append(load_template(spec.options["template"], mode)[1])
    return paths


def build(spec: Spec, runtime: Runtime):
    """Instantiate the annotator of a parsed spec (imports its module, loads its model)."""
    module, fn = spec.component.factory.split(":")
    return getattr(importlib.import_module(f"alignpipe.feedback.annotators.{module}"), fn)(spec, runtime)


def help_text() -> str:
    """The table as text, for `alignpipe annotate --help`."""
    return ANNOTATORS.help_text(lambda c: "pairwise" if c.pairwise else "pointwise")


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
