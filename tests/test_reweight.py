"""reweight: every strategy and post-processing step by hand, the table's properties, the command end to end."""
from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path

import pytest
from alignpipe.stages.reweight import reweight
from typer.testing import CliRunner

from alignpipe import schemas
from alignpipe.cli import app
from alignpipe.core.errors import UserError
from alignpipe.data.io import read_input
from alignpipe.data.output import StageOutput
from alignpipe.feedback import weights as W

runner = CliRunner()


def sig(z):
    return 1 / (1 + math.exp(-z))


def close(a, b, tol=1e-12):
    if hasattr(a, "__iter__"):  # lists, tuples, dataset columns
        a, b = list(a), list(b)
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b))
    if a is None or b is None:
        return a is b
    return abs(a - b) <= tol


# ------------------------------------------------------------------------------------------------- fixtures
def vote(preference=None, score1=None, score2=None, abstained=False, name="j") -> dict:
    return {"name": name, "score1": score1, "score2": score2, "preference": preference, "preference_12": None,
            "preference_21": None, "abstained": abstained, "reason": ""}


def pair(**kw) -> dict:
    """One annotations pair row; keyword arguments override columns."""
    row = {"prompt_id": "p0", "prompt": "Say hi", "messages": [], "iteration": 0,
           "response1": "hello", "response1_sample_index": 0, "response1_num_tokens": 3,
           "response1_behaviour_logp": -2.0, "response1_reward": 1.0, "response1_label": None,
           "response1_finish_reason": "eos", "response1_token_ids": None, "response1_token_logps": None,
           "response2": "bye", "response2_sample_index": 1, "response2_num_tokens": 1,
           "response2_behaviour_logp": -1.0, "response2_reward": 0.0, "response2_label": None,
           "response2_finish_reason": "eos", "response2_token_ids": None, "response2_token_logps": None, "reference": None, "preference": 0.8, "annotator": "test", "raw": [vote(0.9), vote(0.3)], "pairing": "all", "policy": "abc"}
    return {**row, **kw}


def point(**kw) -> dict:
    """One pointwise annotations row."""
    none2 = {c: None for c in ("response2", "response2_sample_index", "response2_num_tokens",
                               "response2_behaviour_logp", "response2_reward", "response2_label", "response2_finish_reason",
                               "response2_token_ids", "preference")}
    return {**pair(raw=[vote(score1=1.0)], pairing="pointwise", response1_label=True), **none2, **kw}


def table(rows: list[dict], current=None) -> dict:
    t = {c.name: [r[c.name] for r in rows] for c in schemas.columns("annotations")}
    if current is not None:
        t["current_logp1"], t["current_logp2"] = current
    return t


def dataset(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_list(rows, features=schemas.features("annotations"))


def write_annotations(path: Path, rows: list[dict]) -> Path:
    with StageOutput(path, stage="annotate", kind="annotations", config={}, inputs=[], force=True) as so:
        so.finish(dataset(rows))
    return path


def run(spec: str, rows: list[dict], current=None) -> W.Weights:
    return W.run_strategy(W.STRATEGIES.parse(spec), table(rows, current))


@pytest.fixture(scope="module")
def userfn(tmp_path_factory):
    """An importable module of user weight functions; yields its name."""
    folder = tmp_path_factory.mktemp("userfn")
    (folder / "reweight_userfn.py").write_text(textwrap.dedent("""
        def by_reward(t):
            return [abs(r) for r in t["response1_reward"]]
        def per_response(t):
            return [1.0] * len(t["response1"]), [3.0] * len(t["response1"])
        def wrong_length(t):
            return [1.0]
        def negative(t):
            return [-1.0] * len(t["response1"])
        def nan(t):
            return [float("nan")] * len(t["response1"])
        def broken(t):
            return t["no such column"]
        def words(t):
            return ["heavy"] * len(t["response1"])
        NOT_CALLABLE = 3
    """))
    sys.path.insert(0, str(folder))
    yield "reweight_userfn"
    sys.path.remove(str(folder))


# ------------------------------------------------------------------------------------ strategies by hand
def test_constant():
    w = run("constant:value=2", [pair(), point()])
    assert w == ([2.0, 2.0], [2.0, None])
    assert run("constant", [pair()]) == ([1.0], [1.0])


def test_margin_is_sigmoid_of_absolute_margin_over_temperature():
    rows = [pair(response1_reward=3.0, response2_reward=1.0), pair(response1_reward=1.0, response2_reward=3.0),
            pair(response1_reward=0.5, response2_reward=0.5)]
    w1, w2 = run("margin:temperature=2", rows)
    assert close(w1, [1 / (1 + math.exp(-1)), 1 / (1 + math.exp(-1)), 0.5]) and w2 == w1  # |3-1|/2 = 1
    assert close(run("margin:4", rows)[0][0], 1 / (1 + math.exp(-0.5)))  # lone value = first hyperparameter
    assert close(run("margin", rows)[0][0], 0.8807970779778823)  # sigmoid(2)


def test_abs_margin_clipped():
    rows = [pair(response1_reward=3.0, response2_reward=1.0), pair(response1_reward=0.5, response2_reward=1.0)]
    assert close(run("abs-margin:clip=1.5", rows)[0], [1.5, 0.5])  # min(2, 1.5), min(0.5, 1.5)
    assert close(run("abs-margin", rows)[0], [2.0, 0.5])


def test_confidence():
    w1, w2 = run("confidence", [pair(preference=p) for p in (0.8, 0.5, 0.1, 1.0)])
    assert close(w1, [0.6, 0.0, 0.8, 1.0], 1e-15) and w2 == w1  # |1.6-1|, |1-1|, |0.2-1|, |2-1|


def test_agreement_counts_votes_with_the_combined_direction():
    rows = [pair(preference=0.75, raw=[vote(0.9), vote(0.7), vote(0.2)]),  # 2 of 3 say response1
            pair(preference=0.3, raw=[vote(0.9), vote(abstained=True), vote(score1=0.0, score2=1.0)]),  # 1 of 2
            pair(preference=0.5, raw=[vote(0.5), vote(0.6)]),  # a tie agrees with a tie: 1 of 2
            pair(preference=0.9, raw=[vote(score1=2.0, score2=1.0), vote(None)])]  # the score-less vote is none
    w1, w2 = run("agreement", rows)
    assert close(w1, [2 / 3, 1 / 2, 1 / 2, 1.0]) and w2 == w1


def test_length_norm():
    rows = [pair(response1_num_tokens=3, response2_num_tokens=1), point(response1_num_tokens=2)]
    w1, w2 = run("length-norm", rows)  # mean length (3 + 1 + 2) / 3 = 2
    assert close(w1, [2 / 3, 1.0]) and close(w2, [2.0, None])
    w1, w2 = run("length-norm:alpha=0.5", rows)
    assert close(w1, [math.sqrt(2 / 3), 1.0]) and close(w2, [math.sqrt(2), None])
    rows = [pair(response1="abcd", response2=""), point(response1="ab", response1_num_tokens=0)]
    w1, w2 = run("length-norm:by=chars", rows)  # lengths 4, 1 (empty counts 1), 2: mean 7/3
    assert close(w1, [7 / 12, 7 / 6]) and close(w2, [7 / 3, None])


def test_recency():
    rows = [point(iteration=0), point(iteration=1), pair(iteration=2)]
    assert close(run("recency:decay=0.5", rows), ([0.25, 0.5, 1.0], [None, None, 1.0]))  # current = newest = 2
    assert close(run("recency:decay=0.5,current=3", rows)[0], [0.125, 0.25, 0.5])
    with pytest.raises(UserError, match="row 2: column 'iteration' is 2, newer than recency:current=1"):
        run("recency:current=1", rows)


def test_importance_ratio_truncated_and_clipped():
    rows = [pair(response1_behaviour_logp=-2.0, response2_behaviour_logp=-1.0), point(response1_behaviour_logp=-5.0)]
    current = ([-1.0, -5.0], [-3.0, None])  # log-ratios 1, -2 (pair) and 0 (pointwise)
    assert close(run("importance:policy=P", rows, current), ([math.e, 1.0], [math.exp(-2), None]))
    assert close(run("importance:policy=P,truncate=2", rows, current), ([2.0, 1.0], [math.exp(-2), None]))
    assert close(run("importance:policy=P,clip=2", rows, current), ([2.0, 1.0], [0.5, None]))
    assert close(run("importance:policy=P,clip=4,truncate=2", rows, current), ([2.0, 1.0], [0.25, None]))
    with pytest.raises(UserError, match="row 0: strategy importance gave response1 weight inf"):
        run("importance:policy=P", rows, ([1000.0, 0.0], [0.0, None]))


def test_class_balance_from_labels_and_from_a_reward_threshold():
    rows = [point(response1_label=v) for v in (True, True, True, False)]
    assert close(run("class-balance", rows), ([4 / 6] * 3 + [4 / 2], [None] * 4))  # n/(2 n_d), n/(2 n_u)
    rows = [point(response1_label=None, response1_reward=r) for r in (1.0, -1.0, 0.5)]
    assert close(run("class-balance:threshold=0.5", rows)[0], [3 / 4, 3 / 2, 3 / 4])  # reward >= 0.5 desirable
    with pytest.raises(UserError, match="row 0: column 'response1_label' is null; give class-balance:threshold"):
        run("class-balance", rows)
    with pytest.raises(UserError, match="all 2 rows are desirable"):
        run("class-balance", [point(), point()])


def test_user_function(userfn):
    rows = [pair(response1_reward=-2.0), point(response1_reward=0.5)]
    assert run(f"function:{userfn}:by_reward", rows) == ([2.0, 0.5], [2.0, None])
    assert run(f"function:target={userfn}:per_response", rows) == ([1.0, 1.0], [3.0, None])
    bad = {"wrong_length": "returned 1 weights for 2 rows", "negative": "row 0: strategy function gave response1 "
           "weight -1.0", "nan": "weight nan", "words": "must return one number per row",
           "NOT_CALLABLE": "is not callable",
           "broken": "function reweight_userfn:broken raised KeyError: 'no such column'", "missing": "cannot load"}
    for name, message in bad.items():
        with pytest.raises(UserError, match=message):
            run(f"function:{userfn}:{name}", rows)
    with pytest.raises(UserError, match="not of the form pkg.module:fn"):
        W.STRATEGIES.parse(f"function:{userfn}")


# ---------------------------------------------------------------------------- the table's properties
EXAMPLE_PARAMS = {"importance": "policy=P,clip=10", "function": "target=reweight_userfn:by_reward",
                  "class-balance": "threshold=0.5"}


@pytest.mark.parametrize("name", list(W.STRATEGIES))
def test_every_strategy_gives_finite_nonnegative_weights_and_documents_its_formula(name, userfn):
    s = W.STRATEGIES[name]
    assert s.fn.__doc__ and ("=" in s.fn.__doc__.splitlines()[0]), "docstring starts with the formula"
    if s.rows == "pointwise":
        rows = [point(response1_label=None, response1_reward=r, iteration=i) for i, r in enumerate((1.0, -1.0, 2.0))]
        current = ([-1.0, -2.0, -3.0], [None] * 3)
    else:
        rows = [pair(), pair(response1_reward=-1.5, preference=0.2, iteration=1, response2_num_tokens=7)]
        rows += [point(response1_reward=0.0)] if s.rows == "any" else []
        current = ([-1.0, -4.0, -0.5][: len(rows)], [-3.0, -0.5, None][: len(rows)])
    spec = W.STRATEGIES.parse(f"{name}:{EXAMPLE_PARAMS[name]}" if name in EXAMPLE_PARAMS else name)
    w1, w2 = W.run_strategy(spec, table(rows, current))
    assert len(w1) == len(w2) == len(rows)
    for r, a, b in zip(rows, w1, w2):
        assert math.isfinite(a) and a >= 0
        assert (b is None) == (r["response2"] is None) and (b is None or (math.isfinite(b) and b >= 0))
    assert W.STRATEGIES[name].fn(W.empty_table(), **spec.kwargs) == ([], [])


@pytest.mark.parametrize("spec, message", [
    ("nope", ("unknown strategy 'nope' (known: constant, margin, abs-margin, confidence, agreement, length-norm, "
              "recency, importance, class-balance, function)")),
    ("margin:temperature=0", "strategy 'margin': temperature=0.0 is outside its range: must be in the range >0"),
    ("margin:temperature=abc", "--strategy 'margin:temperature=abc': temperature: expected a number, found 'abc'"),
    ("margin,temperature=nan", "temperature: expected a finite number, found 'nan'"),
    ("margin:temp=1", "strategy 'margin' has no parameter 'temp' (known: temperature)"),
    ("margin,temp=1", "--strategy 'margin,temp=1': strategy 'margin' has no parameter 'temp' (known: temperature)"),
    ("margin:temperature=1,temperature=2", "given twice"),
    ("margin:1,temperature=2", "parameter 'temperature' given twice"),
    ("margin:1,2", "strategy 'margin' has no parameter '2'"),
    ("confidence:1", "strategy 'confidence' takes no ':ARG'"),
    ("importance", "strategy 'importance' needs policy (importance:POLICY,clip=None,truncate=None)"),
    ("importance:policy=P,clip=0.5", "clip=0.5 is outside its range: must be in the range >=1"),
    ("recency:decay=2", "decay=2.0 is outside its range: must be in the range (0,1]"),
    ("recency:current=1.5", "current: expected an integer, found '1.5'"),
    ("abs-margin:clip=-1", "clip=-1.0 is outside its range: must be in the range >0"),
    ("constant:value=-1", "value=-1.0 is outside its range: must be in the range >=0"),
    ("length-norm:by=words", "by=words is outside its range: must be one of tokens, chars"),
])
def test_bad_specs(spec, message):
    with pytest.raises(UserError) as e:
        W.STRATEGIES.parse(spec)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_spec_text_is_canonical_with_defaults():
    assert str(W.STRATEGIES.parse("importance:truncate=5,policy=/m")) == "importance,policy=/m,clip=None,truncate=5.0"
    assert str(W.STRATEGIES.parse("importance:/m,truncate=5")) == "importance,policy=/m,clip=None,truncate=5.0"
    assert W.STRATEGIES.parse("margin:2").identity() == "margin:2.0"
    assert str(W.STRATEGIES.parse("confidence")) == "confidence"


@pytest.mark.parametrize("rows, message", [
    ([pair(), pair(response1_reward=float("nan"))], "row 1: column 'response1_reward' is nan"),
    ([pair(response2_behaviour_logp=float("-inf"))], "row 0: column 'response2_behaviour_logp' is -inf"),
    ([pair(preference=1.5)], "row 0: column 'preference' is 1.5, outside [0, 1]"),
    ([pair(response2_sample_index=0)], ("row 0: columns 'response1_sample_index' and 'response2_sample_index' "
                                        "are both 0: a pair must hold two different samples of prompt 'p0'")),
    ([pair(response2_sample_index=None)], "row 0: column 'response2_sample_index' is null but 'response2' is set"),
    ([point(response2_reward=1.0)], "row 0: column 'response2_reward' is set but 'response2' is null"),
])
def test_bad_rows(rows, message):
    with pytest.raises(UserError) as e:
        W.validate_table(table(rows))
    assert message in str(e.value)


def test_rows_must_fit_the_strategy():
    with pytest.raises(UserError, match="row 1: column 'response2' is null .a pointwise row. but strategy margin "
                                        "needs pairs"):
        run("margin", [pair(), point()])
    with pytest.raises(UserError, match="row 0: column 'response2' is set .a pair. but strategy class-balance"):
        run("class-balance", [pair()])
    with pytest.raises(UserError, match="row 0: column 'response2_reward' is null; strategy abs-margin needs it"):
        run("abs-margin", [pair(response2_reward=None)])
    with pytest.raises(UserError, match="column 'response1_behaviour_logp' is null; strategy importance needs it "
                                        r"\(imported data has none"):
        run("importance:policy=P", [point(response1_behaviour_logp=None)], ([0.0], [None]))
    with pytest.raises(UserError, match="row 0: column 'raw' has no annotator votes"):
        run("agreement", [pair(raw=[vote(abstained=True)])])


# ------------------------------------------------------------------------------ post-processing by hand
def test_combine_product_and_sum():
    a, b = ([2.0, 0.5], [3.0, None]), ([0.5, 4.0], [1.0, None])
    assert W.combine([a, b], "product") == ([1.0, 2.0], [3.0, None])
    assert W.combine([a, b], "sum") == ([2.5, 4.5], [4.0, None])
    with pytest.raises(UserError, match="--combine 'max': unknown .known: product, sum."):
        W.combine([a], "max")


def test_clip():
    assert W.clip(([0.05, 3.0, 20.0], [0.2, None, 11.0]), 0.1, 10.0) == ([0.1, 3.0, 10.0], [0.2, None, 10.0])
    assert W.clip(([0.05, 20.0], [None, 0.0]), None, 5.0) == ([0.05, 5.0], [None, 0.0])


def test_normalize_mean_over_the_example_weights():
    w = ([1.0, 4.0], [3.0, None])  # example weights: (1 + 3) / 2 = 2 (pair), 4 (pointwise); mean 3
    (w1, w2), zero = W.normalize(w, "mean", ["a", "b"])
    assert close(w1, [1 / 3, 4 / 3]) and close(w2, [1.0, None]) and zero == 0
    assert close(sum(W.example_weights((w1, w2))) / 2, 1.0)
    with pytest.raises(UserError, match="every weight is 0"):
        W.normalize(([0.0], [0.0]), "mean", ["a"])


def test_normalize_per_prompt_and_all_zero_prompts():
    w = ([1.0, 3.0, 0.0, 5.0], [None, None, 0.0, None])  # prompt a: mean 2; b: all 0; c: mean 5
    (w1, w2), zero = W.normalize(w, "per-prompt", ["a", "a", "b", "c"])
    assert close(w1, [0.5, 1.5, 0.0, 1.0]) and w2 == [None, None, 0.0, None] and zero == 1


def test_drop_below_needs_both_weights_of_a_pair_under_it():
    w = ([0.05, 0.05, 1.0, 0.09], [0.2, 0.01, None, None])
    assert W.keep_rows(w, 0.1) == [0, 2]  # row 0 keeps its 0.2; row 1 both under; row 3 pointwise under
    assert W.keep_rows(w, None) == [0, 1, 2, 3] and W.keep_rows(w, 0.0) == [0, 1, 2, 3]


def test_core_order_is_combine_clip_normalize_drop_with_report(userfn):
    # by_reward gives |r1| per row: 1, 2, 12; constant:value=2 doubles them; product: 2, 4, 24
    rows = [point(response1_reward=r, prompt_id=f"p{i}", response1_sample_index=i) for i, r in enumerate((1, 2, 12))]
    specs = [W.STRATEGIES.parse(f"function:{userfn}:by_reward"), W.STRATEGIES.parse("constant:value=2")]
    out, rep = reweight(dataset(rows), specs, clip=(None, 12.0), normalize="mean", drop_below=0.5)
    # clip: 2, 4, 12 -> mean 6 -> 1/3, 2/3, 2 -> drop the row under 0.5
    assert close(out["response1_weight"], [2 / 3, 2.0]) and list(out["response2_weight"]) == [None, None]
    assert list(out["response1_reward"]) == [2.0, 12.0] and len(out.column_names) == len(schemas.columns("weighted"))
    assert rep["dropped"] == 1 and rep["rows_in"] == 3 and rep["rows_out"] == 2
    assert close(rep["weight_mean"], 4 / 3) and close(rep["weight_min"], 2 / 3) and close(rep["weight_max"], 2.0)
    assert close(rep["ess"], (2 / 3 + 2) ** 2 / ((2 / 3) ** 2 + 4)) and close(rep["ess_fraction"], 1.6 / 2)
    assert close(rep["ess"], 1.6)
    assert rep["per_strategy"]["constant,value=2.0"] == {"mean": 2.0, "min": 2.0, "max": 2.0, "ess": 3.0}
    assert rep["strategies"] == [f"function,target={userfn}:by_reward", "constant,value=2.0"]


def test_core_pairs_example_weight_is_the_mean_and_row_errors_name_the_input():
    rows = [pair(response1_behaviour_logp=-2.0, response2_behaviour_logp=-1.0)]
    current = ([-2.0 + math.log(3)], [-1.0 + math.log(1)])  # ratios 3 and 1: example weight 2
    out, rep = reweight(dataset(rows), [W.STRATEGIES.parse("importance:policy=P")], current=current)
    assert close(out["response1_weight"][0], 3.0) and close(out["response2_weight"][0], 1.0, 1e-12)
    assert close(rep["weight_mean"], 2.0) and close(rep["importance_ess"], 16 / 10)  # (3 + 1)^2 / (9 + 1)
    with pytest.raises(UserError, match="^in.ds: row 0: column 'response1_reward' is nan"):
        reweight(dataset([pair(response1_reward=float("nan"))]), [W.STRATEGIES.parse("constant")], where="in.ds")
    with pytest.raises(UserError, match="--drop-below 5: every one of the 1 rows is below it"):
        reweight(dataset([pair()]), [W.STRATEGIES.parse("constant")], drop_below=5)


# ---------------------------------------------------------------------------------------- the command
def _invoke(*args):
    return runner.invoke(app, ["reweight", *map(str, args)])


def test_command_end_to_end_from_import_manifest_and_rerun(tmp_path):
    src = tmp_path / "scored.jsonl"
    src.write_text(json.dumps({"prompt": "a", "completions": ["x", "y", "z"], "scores": [1.0, -1.0, 2.0]}) + "\n"
                   + json.dumps({"prompt": "b", "completions": ["u"], "scores": [-3.0]}) + "\n")
    ann, out = tmp_path / "ann", tmp_path / "weighted"
    assert runner.invoke(app, ["import", str(src), "--out", str(ann)]).exit_code == 0
    args = [ann, "--out", out, "--strategy", "class-balance:threshold=0", "--normalize", "per-prompt"]
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    ds, kind = read_input(out, "weighted", stage="test")
    assert kind == "weighted" and ds.features == schemas.features("weighted")
    # desirable: 1.0, 2.0 (n_d = 2), undesirable: -1.0, -3.0; n = 4 -> all weights 4/(2*2) = 1 -> per prompt 1
    assert list(ds["response1_weight"]) == [1.0, 1.0, 1.0, 1.0]
    m = json.loads((out / "manifest.json").read_text())
    assert m["stage"] == "reweight" and m["schema"]["kind"] == "weighted" and m["num_rows"] == 4
    assert m["config"]["strategy"] == ["class-balance:threshold=0"] and m["config"]["normalize"] == "per-prompt"
    assert m["inputs"][0]["path"] == str(ann)
    assert m["report"]["ess"] == 4.0 and m["report"]["dropped"] == 0 and m["report"]["weight_mean"] == 1.0
    assert "ESS 4.0 (100%)" in result.output
    again = _invoke(*args)
    assert again.exit_code == 0 and "up to date" in again.output
    assert json.loads((out / "manifest.json").read_text()) == m
    forced = _invoke(*args, "--force")
    assert forced.exit_code == 0 and "up to date" not in forced.output
    inspected = runner.invoke(app, ["inspect", str(out), "--json"])
    assert json.loads(inspected.stdout)["columns"]["response1_weight"]["ess"] == 4.0


def test_command_drop_and_config_file(tmp_path):
    rows = [pair(prompt_id=f"p{i}", response1_reward=r, response2_reward=0.0) for i, r in enumerate((0.1, 1.0, 3.0))]
    ann = write_annotations(tmp_path / "ann", rows)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("strategy: ['abs-margin:clip=2']\nnormalize: mean\ndrop-below: 0.2\n")
    result = _invoke(ann, "--out", tmp_path / "w", "--config", cfg)
    assert result.exit_code == 0, result.output
    # abs-margin 0.1, 1, 2 (clipped) -> mean 3.1/3 -> 0.3/3.1, 3/3.1, 6/3.1 -> 0.0968 dropped
    ds, _ = read_input(tmp_path / "w", "weighted", stage="t")
    assert close(ds["response1_weight"], [3 / 3.1, 6 / 3.1]) and list(ds["prompt_id"]) == ["p1", "p2"]
    assert json.loads((tmp_path / "w" / "manifest.json").read_text())["report"]["dropped"] == 1
    assert "dropped 1 rows below 0.2" in result.output


def test_command_bad_inputs_exit_2_and_write_nothing(tmp_path, tiny_lm_dir):
    good = write_annotations(tmp_path / "good", [pair(), point(prompt_id="p1")])
    nan = write_annotations(tmp_path / "nan", [pair(response2_reward=float("nan"))])
    same = write_annotations(tmp_path / "same", [pair(response2_sample_index=0)])
    cases = {
        "unknown strategy": ([good, "-s", "magic"], "known: constant, margin"),
        "no strategy": ([good], "give at least one --strategy"),
        "bad parameter": ([good, "-s", "margin:temperature=-1"], "temperature=-1.0 is outside its range: must be in the range >0"),
        "nan reward": ([nan, "-s", "constant"], f"{nan}: row 0: column 'response2_reward' is nan"),
        "same sample": ([same, "-s", "constant"], "both 0: a pair must hold two different samples"),
        "pair strategy on a pointwise row": ([good, "-s", "confidence"], "row 1: column 'response2' is null"),
        "no behaviour logp": ([write_annotations(tmp_path / "imp", [point(response1_behaviour_logp=None)]), "-s",
                               f"importance:policy={tiny_lm_dir}"], "'response1_behaviour_logp' is null"),
        "bad clip": ([good, "-s", "constant", "--clip", "5,1"], "--clip '5,1': need finite 0 <= LO <= HI"),
        "bad clip text": ([good, "-s", "constant", "--clip", "a"], "expected LO,HI"),
        "bad normalize": ([good, "-s", "constant", "--normalize", "max"], "known: none, mean, per-prompt"),
        "bad combine": ([good, "-s", "constant", "--combine", "max"], "known: product, sum"),
        "negative drop": ([good, "-s", "constant", "--drop-below", "-1"], "must be a finite number >= 0"),
        "missing policy": ([good, "-s", "importance:policy=/nope"], "importance policy /nope: no such folder"),
        "no such input": ([tmp_path / "w0", "-s", "constant"], "no such file"),
        "everything dropped": ([good, "-s", "constant", "--drop-below", "5"], "every one of the 2 rows is below it"),
    }
    for case, (args, message) in cases.items():
        out = tmp_path / "out"
        result = _invoke(*args, "--out", out)
        assert result.exit_code == 2, (case, result.output)
        assert message in result.output and "Traceback" not in result.output, (case, result.output)
        assert not out.exists() and not list(tmp_path.glob(".out*")), case


def test_editing_the_user_function_makes_the_output_out_of_date(tmp_path, monkeypatch):
    (tmp_path / "reweight_userfn_edit.py").write_text("def w(t):\n    return [1.0] * len(t['response1'])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ann = write_annotations(tmp_path / "ann", [pair()])
    args = [ann, "--out", tmp_path / "w", "-s", "function:reweight_userfn_edit:w"]
    assert _invoke(*args).exit_code == 0
    m = json.loads((tmp_path / "w" / "manifest.json").read_text())
    assert m["inputs"][1]["path"] == str(tmp_path / "reweight_userfn_edit.py")
    assert "up to date" in _invoke(*args).output
    with open(tmp_path / "reweight_userfn_edit.py", "a") as f:
        f.write("# edited\n")
    assert "up to date" not in _invoke(*args).output


def test_command_importance_with_the_tiny_policy(tmp_path, tiny_lm_dir):
    import torch

    from alignpipe.models.loading import load_causal_lm, load_tokenizer
    from alignpipe.models.prompting import encode, render_prompt

    tok, model = load_tokenizer(tiny_lm_dir), load_causal_lm(tiny_lm_dir)

    def logp(prompt: str, response: str, eos: bool) -> float:  # an independent forward over the whole sequence
        p = encode(tok, render_prompt(tok, prompt, []))
        r = encode(tok, response) + [tok.eos_token_id] * eos
        with torch.no_grad():
            logits = model(torch.tensor([p + r])).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        return sum(float(lp[len(p) + j - 1, t]) for j, t in enumerate(r))

    n_hi = len(encode(tok, "hi there")) + 1  # generate counted an EOS after "hi there"
    cur = [logp("Say hi", "hi there", True), logp("Say hi", "bye", False), logp("Count", "one two", False)]
    rows = [pair(response1="hi there", response1_num_tokens=n_hi, response1_behaviour_logp=cur[0] - math.log(2),
                 response2="bye", response2_num_tokens=1, response2_behaviour_logp=cur[1] + math.log(4),
                 response2_finish_reason="length"),
            point(prompt_id="p1", prompt="Count", response1="one two", response1_num_tokens=2,
                  response1_behaviour_logp=cur[2] - 3.0, response1_finish_reason="length")]
    ann = write_annotations(tmp_path / "ann", rows)
    out = tmp_path / "w"
    result = _invoke(ann, "--out", out, "-s", f"importance:policy={tiny_lm_dir},clip=5", "--device", "cpu")
    assert result.exit_code == 0, result.output
    ds, _ = read_input(out, "weighted", stage="t")
    # ratios: 2 and 1/4 (pair), e^3 clipped to 5 (pointwise)
    assert close(ds["response1_weight"], [2.0, 5.0], 1e-4) and close(ds["response2_weight"], [0.25, None], 1e-4)
    m = json.loads((out / "manifest.json").read_text())
    assert close(m["report"]["importance_ess"], (2 + 0.25 + 5) ** 2 / (4 + 0.0625 + 25), 1e-4)
    assert [i["path"] for i in m["inputs"]] == [str(ann), str(tiny_lm_dir)]
    assert "importance ESS 1.8" in result.output
