"""The one grammar and the registries: a new loss is one function plus one row; properties of every
registered component; docs/components.md is generated from the tables."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from alignpipe.cli import app
from alignpipe.components import all_registries, markdown
from alignpipe.core.errors import UserError
from alignpipe.core.registry import REQUIRED, Param, Registry, load_function

RUNNER = CliRunner()
DOCS = Path(__file__).resolve().parents[1] / "docs" / "components.md"
REGISTRIES = all_registries()
COMPONENTS = [(kind, name) for kind, reg in REGISTRIES.items() for name in reg]


# --------------------------------------------------------------------- a new loss: one function, one row
def hinge_loss(x, *, margin: float = 1.0, scale: float = 2.0):
    """Test-only hinge on the policy log-ratio margin: l_i = scale * max(0, margin - (logp1_i - logp2_i))."""
    from alignpipe.training.losses import _pair_metrics, _result

    per = scale * torch.clamp_min(margin - (x.logp1 - x.logp2), 0.0)
    return _result(per, x, _pair_metrics(x, x.logp1, x.logp2))


@pytest.fixture
def hinge():
    from alignpipe.training.losses import LOSSES

    LOSSES.add("test-hinge", hinge_loss, task="pairwise", needs_reference=False, paper="a test",
               monotone_in_logp1=True, docs={"margin": "hinge margin", "scale": "multiplier"})
    yield LOSSES
    LOSSES.remove("test-hinge")


def test_a_new_loss_is_one_function_and_one_row(hinge, tmp_path, tiny_lm_dir):
    """Registered at runtime, without editing any stage module: parsed, validated, in --help, computed,
    and trained on by `alignpipe train`."""
    from test_train import losses_of, pairs, write_batches

    from alignpipe.training.losses import LossInputs, compute_loss

    spec = hinge.parse("test-hinge,margin=0.5")
    assert spec.kwargs == {"margin": 0.5, "scale": 2.0} and spec.identity() == "test-hinge,margin=0.5"
    with pytest.raises(UserError, match="loss 'test-hinge' has no parameter 'beta' .known: margin, scale."):
        hinge.parse("test-hinge,beta=1")
    x = LossInputs(logp1=torch.tensor([-1.0, -3.0]), logp2=torch.tensor([-1.2, -1.0]), len1=torch.ones(2),
                   len2=torch.ones(2), weight=torch.tensor([1.0, 3.0]))
    loss, m = compute_loss("test-hinge", x, **spec.kwargs)  # per = 2*[0.3, 2.5]
    assert loss.item() == pytest.approx(1 * 0.6 + 3 * 5.0) and m["loss"].item() == pytest.approx(15.6 / 4)
    help_text = re.sub(r"\s+", " ", RUNNER.invoke(app, ["train", "--help"], terminal_width=300).output)
    assert "test-hinge,margin=1.0,scale=2.0" in help_text
    batches = write_batches(tmp_path / "b", "pairwise", pairs(4), tiny_lm_dir)
    r = RUNNER.invoke(app, ["train", str(batches), "--policy", str(tiny_lm_dir), "--loss", "test-hinge,scale=1",
                            "--out", str(tmp_path / "p"), "--device", "cpu", "--lr", "1e-3"])
    assert r.exit_code == 0, r.output
    assert len(losses_of(tmp_path / "p")) == 2


# ------------------------------------------------------------------------------------------ the grammar
@pytest.fixture
def toy():
    def fn(x, *, alpha: float = 1.0, n: int = 2, on: bool = False, bound: float | None = None, name: str = "a"):
        """Toy: y = alpha * x."""

    def needs(x, *, path: str):
        """Toy with a required parameter."""

    reg = Registry("toy", "--toy", common={"weight": Param(None, float, "w", nullable=True)})
    reg.add("plain", fn, arg="alpha", docs={"alpha": "scale"})
    reg.add("free", needs, arg="path", free_arg=True)
    yield reg
    from alignpipe.core.registry import REGISTRIES

    REGISTRIES.pop("toy")


@pytest.mark.parametrize("text, given", [
    ("plain", {}),
    ("plain:3", {"alpha": 3.0}),
    ("plain,alpha=3,n=4,on=yes,bound=none", {"alpha": 3.0, "n": 4, "on": True, "bound": None}),
    ("plain:alpha=3,n=4", {"alpha": 3.0, "n": 4}),  # NAME:key=value reads as NAME,key=value
    ("plain,weight=0.5", {"weight": 0.5}),
    ("free:a,b=c,weight=2", {"path": "a,b=c", "weight": 2.0}),  # a free ARG keeps unknown segments
    ("free,path=x", {"path": "x"}),
])
def test_grammar(toy, text, given):
    assert toy.parse(text).given == given


@pytest.mark.parametrize("text, message", [
    ("nope", "--toy 'nope': unknown toy 'nope' (known: plain, free)"),
    ("plain,beta=1", ("--toy 'plain,beta=1': toy 'plain' has no parameter 'beta' (known: alpha, n, on, bound, "
                      "name, weight)")),
    ("plain,n=1.5", "--toy 'plain,n=1.5': n: expected an integer, found '1.5'"),
    ("plain,alpha=inf", "alpha: expected a finite number, found 'inf'"),
    ("plain,on=maybe", "on: expected true or false, found 'maybe'"),
    ("plain,n=1,n=2", "parameter 'n' given twice"),
    ("plain:1,alpha=2", "parameter 'alpha' given twice"),
    ("free", "toy 'free' needs path (free:PATH)"),
])
def test_grammar_errors_are_one_line_naming_component_key_and_known_keys(toy, text, message):
    with pytest.raises(UserError) as e:
        toy.parse(text)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_shorthand_flags_go_through_the_registry(toy):
    assert toy.parse("plain", alpha=2.0).given == {"alpha": 2.0}
    assert toy.parse("plain", alpha=None).given == {}
    with pytest.raises(UserError, match="--alpha and 'alpha=' in --toy 'plain,alpha=1': give one of them"):
        toy.parse("plain,alpha=1", alpha=2.0)


# ------------------------------------------------------------------ properties of every component
@pytest.mark.parametrize("kind, name", COMPONENTS)
def test_every_component_is_documented_and_round_trips(kind, name):
    reg = REGISTRIES[kind]
    c = reg[name]
    assert c.doc, f"{kind} {name}: no doc line"
    for key, p in c.params.items():
        assert p.kind in (str, int, float, bool)
        assert p.doc or key == c.arg or c.fn is not None and p.default is not REQUIRED, (kind, name, key)
    text = name + "".join(f",{k}={_example(p)}" for k, p in c.params.items() if p.default is REQUIRED)
    if kind == "strategy" and name == "function":
        text = f"{name}:reweight_userfn:by_reward"
    if kind == "annotator" and c.arg:  # the factory checks its ARG (a folder, a pattern) when it builds
        text = f"{name}:{_example(c.params[c.arg])}" + "".join(
            f",{k}={_example(p)}" for k, p in c.params.items() if p.default is REQUIRED and k != c.arg)
    if kind != "strategy" or name not in ("function",):
        spec = reg.parse(text)
        again = reg.parse(spec.identity())
        assert again.values == spec.values and again.identity() == spec.identity()
    assert reg.usage(name) in reg.help_text()


def _example(p):
    return {str: "x", int: "1", float: "1.5", bool: "true"}[p.kind]


@pytest.mark.parametrize("kind", list(REGISTRIES))
def test_every_registry_has_a_flag_and_docs(kind):
    reg = REGISTRIES[kind]
    assert reg.flag.startswith("--") and f"## {kind.capitalize()} (`{reg.flag}`)" in reg.markdown()


def test_the_estimator_slot_exists_and_parses_what_is_registered():
    from alignpipe.core.registry import ESTIMATORS

    assert ESTIMATORS.kind == "advantage estimator"
    with pytest.raises(UserError, match="unknown advantage estimator 'nope'"):
        ESTIMATORS.parse("nope")


def test_docs_are_generated_from_the_registries():
    """docs/components.md == `python -m alignpipe.core.registry` (regenerate it after adding a component)."""
    assert DOCS.read_text() == markdown(), "run: python -m alignpipe.components > docs/components.md"


# ------------------------------------------------------------------------------ one load_function
def test_one_load_function(tmp_path, monkeypatch):
    from alignpipe.feedback import annotators, weights

    assert annotators.load_function is load_function and weights.load_function is load_function
    (tmp_path / "userfns_xyz.py").write_text("def f(t):\n    return 1\nX = 3\n")
    monkeypatch.chdir(tmp_path)
    assert load_function("userfns_xyz:f", "here")(0) == 1
    for target, message in (("userfns_xyz", "is not of the form pkg.module:fn"), ("userfns_xyz:X", "not callable"),
                            ("userfns_xyz:g", "cannot load 'userfns_xyz:g'"), ("nomod_xyz:f", "cannot import")):
        with pytest.raises(UserError, match=message):
            load_function(target, "here")


def test_pairing_is_one_implementation_with_one_tie_rule():
    """annotate's make_pairs and build-batches' pairing call the same functions; among equal rewards the
    first is best and the last is worst."""
    from alignpipe.feedback.pairing import PAIRINGS, pairs

    assert pairs("best-worst", [1.0, 3.0, 3.0, 0.0, 0.0], 0, "p") == [(1, 4)]
    assert pairs("best-worst", [2.0, 2.0, 2.0], 0, "p") == [(0, 2)]
    assert pairs("best-worst", [None, 1.0], 0, "p") == []
    assert pairs("margin:1", [0.0, 0.5, 2.0], 0, "p") == [(0, 2), (1, 2)]
    assert pairs("random", [0.0] * 5, 7, "p") == pairs("random", [1.0] * 5, 7, "p")
    assert set(PAIRINGS) == {"all", "random", "best-worst", "margin"}


# ------------------------------------------------------------------------------ hyperparameter ranges
def _spec_text(kind: str, name: str, skip: str = "") -> str:
    """A parseable spec of the component with its required parameters (but `skip`) filled, as the round trip."""
    c = REGISTRIES[kind][name]
    if kind == "strategy" and name == "function":
        return f"{name}:reweight_userfn:by_reward"
    if kind == "annotator" and c.arg:
        return f"{name}:{_example(c.params[c.arg])}" + "".join(
            f",{k}={_example(p)}" for k, p in c.params.items() if p.default is REQUIRED and k not in (c.arg, skip))
    return name + "".join(f",{k}={_example(p)}" for k, p in c.params.items() if p.default is REQUIRED and k != skip)


def _all_params(kind: str, name: str) -> dict:
    return {**REGISTRIES[kind][name].params, **REGISTRIES[kind].common}


@pytest.mark.parametrize("kind, name", COMPONENTS)
def test_every_numeric_hyperparameter_declares_a_range_holding_its_default(kind, name):
    from alignpipe.core.ranges import parse_range

    missing = [k for k, p in _all_params(kind, name).items() if p.kind in (int, float) and not p.range]
    assert not missing, (f"{kind} '{name}': declare the range of {', '.join(missing)} in its registry row, e.g. "
                         f"ranges={{'{missing[0]}': '>=0'}} (syntax: alignpipe/core/ranges.py; 'any' for unbounded)")
    for key, p in _all_params(kind, name).items():
        if p.range and p.default is not REQUIRED and p.default is not None:
            assert parse_range(p.range).contains(p.default), f"{kind} '{name}': default {key}={p.default} outside {p.range}"


OUTSIDE = [(kind, name, key, value) for kind, name in COMPONENTS
           for key, p in _all_params(kind, name).items() if p.range
           for value in __import__("alignpipe.core.ranges", fromlist=["x"]).parse_range(p.range).outside(p.kind)]


@pytest.mark.parametrize("kind, name, key, value", OUTSIDE)
def test_a_value_just_outside_its_range_is_one_line_naming_component_key_value_and_range(kind, name, key, value):
    reg = REGISTRIES[kind]
    text = f"{_spec_text(kind, name, skip=key)},{key}={value}"
    with pytest.raises(UserError) as e:
        reg.parse(text)
    message, p = str(e.value), _all_params(kind, name)[key]
    assert f"{kind} '{name}'" in message and f"{key}={value}" in message and "\n" not in message
    assert (p.range.replace("|", ", ") if "|" in p.range else p.range) in message


@pytest.mark.parametrize("text, inside, outside", [
    (">0", [1e-300, 5.0], [0.0, -1.0]), (">=0", [0.0, 3], [-1e-12]), ("<1", [0.99], [1.0]), ("<=1", [1.0], [1.0001]),
    ("[0,0.5)", [0.0, 0.4999], [0.5, -0.1]), ("(0,1]", [1.0, 1e-9], [0.0, 1.5]), ("[2,9]", [2, 9], [1, 10]),
    ("[1,inf)", [1.0, 1e300], [0.5]), ("any", [-1e300, 0.0], []), ("chars|words", ["chars", "words"], ["lines", 1]),
])
def test_range_syntax(text, inside, outside):
    from alignpipe.core.ranges import parse_range

    r = parse_range(text)
    assert all(r.contains(v) for v in inside) and not any(r.contains(v) for v in outside)
    assert not any(r.contains(v) for v in r.outside(float if not r.choices else str))
    assert not r.contains(True)


@pytest.mark.parametrize("bad", [">", "0..1", "[1,0]", "between 0 and 1"])
def test_a_bad_range_in_a_row_is_a_programming_error(bad):
    from alignpipe.core.ranges import parse_range

    with pytest.raises(ValueError, match="range"):
        parse_range(bad)
    reg = Registry("toy-ranges", "--toy")
    try:
        with pytest.raises(ValueError, match="range"):
            reg.add("x", lambda t, *, a=1.0: t, ranges={"a": bad})
        with pytest.raises(ValueError, match="unknown parameter 'b'"):
            reg.add("y", lambda t, *, a=1.0: t, ranges={"b": ">0"})
    finally:
        from alignpipe.core.registry import REGISTRIES as ALL

        ALL.pop("toy-ranges")


@pytest.mark.parametrize("args, message", [
    # a negative beta trained in the reverse direction, silently (exit 0)
    (["--loss", "dpo,beta=-0.1"], ("--loss 'dpo,beta=-0.1': loss 'dpo': beta=-0.1 is outside its range: must be "
                                   "in the range >0")),
    (["--loss", "dpo", "--beta", "-0.1"], "loss 'dpo': beta=-0.1 is outside its range"),
    # IPO's target margin 1/(2 tau): ZeroDivisionError, exit 1
    (["--loss", "ipo,tau=0"], "loss 'ipo': tau=0.0 is outside its range: must be in the range >0"),
    # robust DPO divides by 1 - 2 eps: an internal ValueError, exit 1
    (["--loss", "robust-dpo,label_smoothing=0.5"], ("loss 'robust-dpo': label_smoothing=0.5 is outside its range: "
                                                    "must be in the range [0,0.5)")),
])
def test_out_of_range_hyperparameters_exit_2_before_any_model_loads(tmp_path, tiny_tokenizer_dir, args, message):
    """Through the CLI, with a policy folder that does not exist: the range is what fails, in one line."""
    from test_train import pairs, write_batches

    batches = write_batches(tmp_path / "b", "pairwise", pairs(2), tiny_tokenizer_dir)
    r = RUNNER.invoke(app, ["train", str(batches), "--policy", str(tmp_path / "no-model"), *args,
                            "--out", str(tmp_path / "p"), "--device", "cpu"])
    assert r.exit_code == 2, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists()


def test_out_of_range_annotator_and_estimator_exit_2(tmp_path):
    """The judge's score scale (one token per score: 2..9) and GRPO's std epsilon (0 divides by zero on an
    all-equal group kept by --equal-groups keep) are refused while parsing, before the missing model matters."""
    r = RUNNER.invoke(app, ["annotate", str(tmp_path / "gens"), "--annotator",
                            f"pointwise-judge:{tmp_path / 'judge'},scale=12", "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "annotator 'pointwise-judge': scale=12 is outside its range: must be in the range [2,9]" \
        in r.output, r.output
    from alignpipe.batches.advantages import estimator

    with pytest.raises(UserError, match="advantage estimator 'grpo': eps=0.0 is outside its range: must be in the range >0"):
        estimator("grpo,eps=0")
