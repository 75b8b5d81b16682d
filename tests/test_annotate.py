"""annotate: reward models, local LM judges, rules, user functions, combining, pairing, shards, bad input."""
from __future__ import annotations

import json
import math

import pytest
import torch
from alignpipe.stages.annotate import combined_preference, make_pairs
from typer.testing import CliRunner

from alignpipe import schemas
from alignpipe.cli import app
from alignpipe.core.errors import UserError
from alignpipe.core.registry import REQUIRED
from alignpipe.data.io import read_input
from alignpipe.data.manifest import read_manifest
from alignpipe.feedback.annotators import ANNOTATORS, Query, Runtime, Verdict, build, parse_spec, swap_average

runner = CliRunner()

RESPONSES = {  # prompt_id -> three responses of clearly different length and tone
    "p1": ["Yes.", "I love this wonderful, delightful idea and it makes me very happy!",
           "This is a terrible, awful plan and I hate it."],
    "p2": ["Great!", "Sadly this is bad news and a horrible failure for everyone involved.",
           "A fine and pleasant answer."],
    "p3": ["No.", "An excellent, joyful, brilliant outcome that everyone will enjoy.",
           "Ugly, miserable and disappointing."],
    "p4": ["Maybe.", "Wonderful!", "I am angry, upset and hurt by this cruel and nasty remark."],
}


def write_generations(path, responses=RESPONSES, extra_rows=()):
    """A generations dataset as `alignpipe generate` writes it (kind, manifest, schema)."""
    from datasets import Dataset

    from alignpipe.data.output import StageOutput

    rows = [{"prompt_id": pid, "prompt": f"Question {pid}?", "messages": [], "reference": None,
             "sample_index": j, "response": r, "num_tokens": len(r.split()), "finish_reason": "eos",
             "behaviour_logp": -1.5 * (j + 1), "policy": "tiny-policy", "policy_fingerprint": "fp-tiny", "response_token_ids": None, "response_token_logps": None,
             "iteration": 2} for pid, rs in responses.items() for j, r in enumerate(rs)] + list(extra_rows)
    with StageOutput(path, stage="generate", kind="generations", config={}, inputs=[]) as so:
        so.finish(Dataset.from_list(rows, features=schemas.features("generations")))
    return path


@pytest.fixture(scope="module")
def gens(tmp_path_factory):
    return write_generations(tmp_path_factory.mktemp("gen") / "generations")


def run(*args):
    result = runner.invoke(app, ["annotate", *map(str, args)])
    return result.exit_code, result.output  # stdout and stderr


def annotate_ok(*args):
    code, output = run(*args)
    assert code == 0, output
    out = args[args.index("--out") + 1]
    return read_input(out, "annotations", stage="test")[0], output


# -- reward model -----------------------------------------------------------------------------------------
def test_reward_model_scores_equal_direct_forward(tmp_path, gens, tiny_rm_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "ann"
    ds, _ = annotate_ok(gens, "--annotator", f"reward-model:{tiny_rm_dir}", "--out", out, "--batch-size", "5",
                        "--device", "cpu")
    assert len(ds) == 12 and set(ds["pairing"]) == {"pointwise"} and ds["response2"] == [None] * 12
    tok = AutoTokenizer.from_pretrained(tiny_rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir).eval()
    for row in ds:
        text = tok.apply_chat_template([{"role": "user", "content": row["prompt"]},
                                        {"role": "assistant", "content": row["response1"]}], tokenize=False)
        with torch.no_grad():
            direct = model(**tok(text, add_special_tokens=False, return_tensors="pt")).logits[0, 0].item()
        assert row["response1_reward"] == pytest.approx(direct, abs=1e-5)
        assert row["raw"][0]["score1"] == row["response1_reward"] and row["raw"][0]["abstained"] is False
    m = read_manifest(out)
    assert m["schema"]["kind"] == "annotations" and m["num_rows"] == 12
    assert m["report"]["annotators"][0]["model"] == str(tiny_rm_dir)
    assert m["config"]["annotator"] == [f"reward-model:{tiny_rm_dir}"]
    assert (ds[0]["policy"], ds[0]["iteration"], ds[0]["response1_behaviour_logp"]) == ("fp-tiny", 2, -1.5)
    before = (out / "manifest.json").read_text()
    code, output = run(gens, "--annotator", f"reward-model:{tiny_rm_dir}", "--out", out, "--batch-size", "5",
                       "--device", "cpu")
    assert code == 0 and "up to date" in output and (out / "manifest.json").read_text() == before


# -- local LM judges --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def judge(tiny_lm_dir):
    return build(parse_spec(f"pairwise-judge:{tiny_lm_dir},template=conciseness"), Runtime(batch_size=3))


def _direct_p_first(judge, text):
    """P(first label) from a plain single-sequence forward of the rendered judge prompt."""
    ids = torch.tensor([judge.encode(text)])
    with torch.no_grad():
        logits = judge.model(input_ids=ids).logits[0, -1, judge.label_ids]
    return torch.softmax(logits.float(), -1)[0].item()


def test_pairwise_judge_reads_answer_tokens_and_swap_is_exact(judge):
    pairs = [(a, b) for rs in RESPONSES.values() for a, b in [(rs[0], rs[1]), (rs[1], rs[2]), (rs[2], rs[0])]]
    ab = judge.compare([Query("Say something.", [], a, b) for a, b in pairs])
    ba = judge.compare([Query("Say something.", [], b, a) for a, b in pairs])
    for (a, b), v, w in zip(pairs, ab, ba):
        assert v.preference == 1.0 - w.preference  # exactly, bit for bit
        assert v.p12 == w.p21 and v.p21 == w.p12
        assert v.preference == 0.5 * (v.p12 + 1.0 - v.p21)
        q = Query("Say something.", [], a, b)
        assert v.p12 == pytest.approx(_direct_p_first(judge, judge.render(q, a, b)), abs=1e-5)
        assert v.p21 == pytest.approx(_direct_p_first(judge, judge.render(q, b, a)), abs=1e-5)
    assert len({round(v.p12, 6) for v in ab}) > 1  # really reads the model, not a constant


def test_swap_average_is_antisymmetric_bit_for_bit():
    import random

    rng = random.Random(0)
    for _ in range(10000):
        x, y = rng.random() ** 3, rng.random() ** 0.2
        assert swap_average(x, y) == 1.0 - swap_average(y, x)


def test_pointwise_judge_is_expected_score(tiny_lm_dir):
    j = build(parse_spec(f"pointwise-judge:{tiny_lm_dir},template=helpfulness,scale=7"), Runtime())
    (v,) = j.score([Query("Hi?", [], "Hello there.")])
    ids = torch.tensor([j.encode(j.template.replace("{prompt}", "Hi?").replace("{response}", "Hello there.")
                                 .replace("{scale}", "7"))])
    with torch.no_grad():
        p = torch.softmax(j.model(input_ids=ids).logits[0, -1, j.label_ids].float(), -1)
    assert v.score == pytest.approx(sum((s + 1) * p[s].item() for s in range(7)), abs=1e-5)
    assert 1 <= v.score <= 7
    assert j.label_ids == [j.tokenizer.convert_tokens_to_ids(str(s)) for s in range(1, 8)]


def test_pairwise_judge_through_the_command(tmp_path, gens, tiny_lm_dir):
    out = tmp_path / "judged"
    ds, _ = annotate_ok(gens, "-a", f"pairwise-judge:{tiny_lm_dir},template=conciseness", "--out", out,
                        "--device", "cpu")
    assert len(ds) == 4 * 3 and set(ds["pairing"]) == {"all"}  # 3 pairs per prompt
    pairs = [(r["response1_sample_index"], r["response2_sample_index"]) for r in ds]
    assert pairs[:3] == [(0, 1), (0, 2), (1, 2)]
    for row in ds:
        (raw,) = row["raw"]
        assert row["preference"] == raw["preference"]
        assert raw["preference"] == 0.5 * (raw["preference_12"] + 1 - raw["preference_21"])
        assert row["response1_reward"] is None
    report = read_manifest(out)["report"]
    assert "is more concise (answers the request in fewer words" in report["annotators"][0]["template"]
    assert report["annotators"][0]["answers"] == ["1", "2"]
    assert report["abstentions"] == {ds[0]["annotator"][2:]: 0}


def test_shorter_answer_preferred_by_scripted_length_judge(tmp_path, gens):
    """Length decides these fixtures; the judge is the `length` rule with a negative weight (scripted)."""
    out = tmp_path / "o"
    ds, _ = annotate_ok(gens, "-a", "length,unit=words,weight=-1", "--pairing", "all", "--out", out)
    for row in ds:
        shorter_first = len(row["response1"].split()) < len(row["response2"].split())
        assert (row["preference"] > 0.5) == shorter_first
        assert row["preference"] == pytest.approx(
            1 / (1 + math.exp(-(row["response1_reward"] - row["response2_reward"]))))


def test_judge_trained_to_prefer_the_shorter_answer_prefers_it(tmp_path, tiny_lm_dir):
    """The tiny LM, trained for 40 steps on random pairs to answer the shorter one, judges held-out pairs."""
    import random

    template = tmp_path / "shorter.txt"
    template.write_text("Which answer is shorter?\n{label_a}: {response_a}\n{label_b}: {response_b}")
    j = build(parse_spec(f"pairwise-judge:{tiny_lm_dir},template={template}"), Runtime(batch_size=16))
    words = ["the", "cat", "dog", "sun", "tree", "blue", "red", "fast", "slow", "big", "small", "house",
             "river", "stone", "cloud", "green"]

    def pair(rng):  # (first, second, index of the shorter): length decides
        short, long = (" ".join(rng.choice(words) for _ in range(rng.randint(*n))) for n in ((1, 3), (6, 10)))
        return (short, long, 0) if rng.random() < 0.5 else (long, short, 1)

    torch.manual_seed(0)
    rng, opt = random.Random(0), torch.optim.AdamW(j.model.parameters(), lr=1e-2)
    j.model.train()
    for _ in range(40):
        batch = [pair(rng) for _ in range(16)]
        logits = j._last_logits([j.encode(j.render(Query("", [], a, b), a, b)) for a, b, _ in batch])
        target = torch.tensor([j.label_ids[y] for *_, y in batch])
        loss = torch.nn.functional.cross_entropy(logits.float(), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    j.model.eval()
    held_out = [pair(random.Random(1000 + i)) for i in range(50)]
    verdicts = j.compare([Query("", [], a, b) for a, b, _ in held_out])
    correct = sum((v.preference > 0.5) == (y == 0) for v, (_, _, y) in zip(verdicts, held_out))
    print(f"trained tiny judge prefers the shorter answer on {correct}/50 held-out pairs")
    assert correct >= 45, correct


# -- rules, functions, combining --------------------------------------------------------------------------
def test_vader_ranks_positive_above_negative():
    vader = build(parse_spec("vader"), Runtime())
    pos, neg = vader.score([Query("", [], "What a wonderful, happy, excellent day! I love it."),
                            Query("", [], "This is a horrible, sad, terrible day. I hate it.")])
    assert pos.score > 0.5 > -0.5 > neg.score


def test_weights_combine_rewards_and_raw_columns(tmp_path, gens):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    ds, _ = annotate_ok(gens, "-a", "length", "-a", "vader", "--weights", "1,0.5", "--out", tmp_path / "c")
    analyzer = SentimentIntensityAnalyzer()
    for row in ds:
        compound = analyzer.polarity_scores(row["response1"])["compound"]
        assert row["response1_reward"] == len(row["response1"]) + 0.5 * compound
        assert [r["name"] for r in row["raw"]] == ["length", "vader"]
        assert row["raw"][1]["score1"] == compound and row["preference"] is None
    assert ds[0]["annotator"] == "1*length + 0.5*vader"


def test_combined_preference_rules():
    v = [Verdict(preference=0.9), Verdict(preference=0.3), Verdict(abstained=True, reason="x")]
    assert combined_preference(v, [1.0, 3.0, 5.0], 0.0, 1.0) == pytest.approx((0.9 + 0.9) / 4)
    assert combined_preference(v[2:], [5.0], 2.0, 1.0) == pytest.approx(1 / (1 + math.exp(-1)))
    assert combined_preference([], [], 1.0, 1.0) == 0.5 and combined_preference([], [], None, 1.0) is None


def test_pairings(tmp_path, gens):
    bw, _ = annotate_ok(gens, "-a", "length", "--pairing", "best-worst", "--out", tmp_path / "bw")
    assert len(bw) == 4 and set(bw["pairing"]) == {"best-worst"}
    for row in bw:
        lengths = [len(r) for r in RESPONSES[row["prompt_id"]]]
        assert (row["response1_reward"], row["response2_reward"]) == (max(lengths), min(lengths))
    r0, _ = annotate_ok(gens, "-a", "vader", "--pairing", "random", "--seed", "0", "--out", tmp_path / "r0")
    r0b, _ = annotate_ok(gens, "-a", "vader", "--pairing", "random", "--seed", "0", "--out", tmp_path / "r0b")
    r1, _ = annotate_ok(gens, "-a", "vader", "--pairing", "random", "--seed", "1", "--out", tmp_path / "r1")
    idx = lambda ds: [(r["response1_sample_index"], r["response2_sample_index"]) for r in ds]
    assert len(r0) == 4 and idx(r0) == idx(r0b) and idx(r0) != idx(r1)
    assert all(a < b for a, b in idx(r0)) and set(r0["pairing"]) == {"random"}
    g = [{"prompt_id": "x", "sample_index": i, "response": str(i)} for i in range(4)]
    assert make_pairs(g[:1], "all", {}, 0) == [] and len(make_pairs(g, "all", {}, 0)) == 6


def test_user_function_and_regex(tmp_path, gens, monkeypatch):
    (tmp_path / "myscores.py").write_text("def score(prompt, response):\n"
                                          "    return response.count('!') * 2.0\n")
    monkeypatch.chdir(tmp_path)
    ds, _ = annotate_ok(gens, "-a", "function:myscores:score", "-a", r"regex:^[A-Z]\w{1,3}\.$",
                        "--out", tmp_path / "f")
    for row in ds:
        assert row["raw"][0]["score1"] == row["response1"].count("!") * 2.0
        assert row["raw"][1]["score1"] == (1.0 if row["response1"] in ("Yes.", "No.") else 0.0)
    assert str(tmp_path / "myscores.py") in [i["path"] for i in read_manifest(tmp_path / "f")["inputs"]]


def test_annotations_input_is_rejudged(tmp_path):
    src = tmp_path / "pairs.jsonl"
    row = {"chosen": "short", "rejected": "a much longer answer"}
    src.write_text("".join(json.dumps({"prompt": f"Q{i}", **row}) + "\n" for i in range(3)))
    assert runner.invoke(app, ["import", str(src), "--out", str(tmp_path / "imp")]).exit_code == 0
    ds, _ = annotate_ok(tmp_path / "imp", "-a", "length,weight=-1", "--out", tmp_path / "re")
    assert len(ds) == 3 and set(ds["pairing"]) == {"imported"}
    assert ds[0]["response1_reward"] == -5 and ds[0]["preference"] > 0.5


# -- shards -----------------------------------------------------------------------------------------------
def test_two_process_shards_equal_one(tmp_path, gens, tiny_rm_dir):
    args = ["-a", "length", "-a", "vader", "-a", f"reward-model:{tiny_rm_dir}", "--pairing", "all",
            "--device", "cpu"]
    one, _ = annotate_ok(gens, *args, "--out", tmp_path / "one")
    for i in range(2):
        code, output = run(gens, *args, "--out", tmp_path / "two", "--num-shards", 2, "--shard-index", i)
        assert code == 0, output
    two, _ = read_input(tmp_path / "two", "annotations", stage="test")
    assert len(two) == len(one) == 12
    for a, b in zip(one, two):
        assert a.pop("response1_reward") == pytest.approx(b.pop("response1_reward"), abs=1e-5)
        assert a.pop("response2_reward") == pytest.approx(b.pop("response2_reward"), abs=1e-5)
        assert a.pop("preference") == pytest.approx(b.pop("preference"), abs=1e-5)
        for r in a["raw"] + b["raw"]:
            r["score1"], r["score2"] = round(r["score1"], 4), round(r["score2"], 4)
        assert a == b


def test_resume_after_a_crash_keeps_finished_shards(tmp_path, gens, monkeypatch):
    (tmp_path / "flaky.py").write_text(
        "import os\ndef score(prompt, response):\n"
        "    if os.environ.get('CRASH') and prompt == 'Question p3?':\n        raise RuntimeError('boom')\n"
        "    return float(len(response))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CRASH", "1")
    out = tmp_path / "res"
    code, output = run(gens, "-a", "function:flaky:score", "--shard-size", "1", "--out", out)
    assert code == 2 and "row 6 (prompt_id p3, sample 0)" in output and "boom" in output and not out.exists()
    monkeypatch.delenv("CRASH")
    ds, _ = annotate_ok(gens, "-a", "function:flaky:score", "--shard-size", "1", "--out", out)
    assert len(ds) == 12 and read_manifest(out)["report"]["resumed_shards"] == 2


# -- registry and bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ANNOTATORS))
def test_every_registered_annotator_parses_and_is_documented(name):
    info = ANNOTATORS[name]
    spec_text = name + (":ARG" if info.arg else "") + (",model=m" if "model" in info.params else "")
    spec_text += "".join(f",{k}=1" for k, p in info.params.items()  # other required ones (overlong's max_tokens)
                         if p.default is REQUIRED and k not in (info.arg, "model"))
    spec = parse_spec(spec_text)
    assert parse_spec(spec.identity()).identity() == spec.identity()
    assert name in runner.invoke(app, ["annotate", "--help"]).output


def test_spec_parsing():
    s = parse_spec("http:http://127.0.0.1:8/v1,model=gpt,concurrency=2,swap=false,weight=2")
    assert (s.arg, s.options["concurrency"], s.options["swap"]) == ("http://127.0.0.1:8/v1", 2, False)
    assert s.values["weight"] == 2.0 and "weight" not in s.identity()
    assert parse_spec(r"regex:a{1,3}=b,count=true").arg == "a{1,3}=b"
    assert parse_spec("function:pkg.mod:fn").arg == "pkg.mod:fn"
    with pytest.raises(UserError, match="annotator 'pairwise-judge' has no parameter 'templat' .known: model_dir, "
                                        "template, labels, swap, weight."):
        parse_spec("pairwise-judge:m,templat=x")


NAN_FN = "def score(prompt, response):\n    return float('nan') if response == 'Great!' else 1.0\n"


@pytest.mark.parametrize("args,message", [
    (["-a", "foo"], "unknown annotator 'foo' (known: reward-model, pairwise-judge"),
    (["-a", "length,unit=lines"], "annotator 'length': unit=lines is outside its range: must be one of chars, words"),
    (["-a", "pairwise-judge:{lm},template=/no/such.txt"], "/no/such.txt: no such file"),
    (["-a", "pairwise-judge:{lm},template=rudeness"],
     "no built-in pairwise template of that name (known: conciseness"),
    (["-a", "pointwise-judge:{lm},scale=10"], "annotator 'pointwise-judge': scale=10 is outside its range: must be in the range [2,9]"),
    (["-a", "pairwise-judge:{lm}", "--pairing", "pointwise"], "needs pairs"),
    (["-a", "pairwise-judge:{lm},labels=1/1"], "labels must be two different answers"),
    (["-a", "pairwise-judge:{lm}", "--pairing", "best-worst"], "needs a pointwise annotator"),
    (["-a", "pairwise-judge:{lm},weight=-1"], "must be finite and > 0"),
    (["-a", "length", "-a", "vader", "--weights", "1"], "1 weights for 2 annotators"),
    (["-a", "length,weight=2", "--weights", "1"], "both given"),
    (["-a", "length", "--pairing", "triangles"], "unknown (known: pointwise, all, random, best-worst, margin)"),
    (["-a", "reward-model:/no/such/rm"], "/no/such/rm: no such folder"),
    (["-a", "regex:([a-z"], "invalid regular expression"),
    (["-a", "function:no_such_module_xyz:f"], "cannot import module 'no_such_module_xyz'"),
    (["-a", "function:nanfn:score"],
     "row 3 (prompt_id p2, sample 0): annotator function:nanfn:score returned a non-finite reward (nan)"),
    (["-a", "http:http://127.0.0.1:9/v1,model=m,key_env=ALIGNPIPE_NO_SUCH_KEY"],
     "ALIGNPIPE_NO_SUCH_KEY (key_env) is not set"),
])
def test_bad_input(tmp_path, gens, tiny_lm_dir, monkeypatch, args, message):
    (tmp_path / "nanfn.py").write_text(NAN_FN)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    args = [a.replace("{lm}", str(tiny_lm_dir)) for a in args]
    code, output = run(gens, *args, "--out", out, "--device", "cpu")
    assert code == 2, output
    assert message in output and len(output.strip().splitlines()) == 1, output
    assert not out.exists()


def test_bad_input_datasets(tmp_path, gens):
    prompts = tmp_path / "prompts"
    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "hi"}\n')
    assert runner.invoke(app, ["import", str(src), "--out", str(prompts)]).exit_code == 0
    code, output = run(prompts, "-a", "length", "--out", tmp_path / "o")
    assert code == 2
    assert "is a 'prompts' dataset; `annotate` needs generations from `alignpipe generate`" in output
    dup = write_generations(tmp_path / "dup", extra_rows=[{**read_input(gens, "generations", "t")[0][0]}])
    code, output = run(dup, "-a", "length", "--out", tmp_path / "o")
    assert code == 2 and "rows 0 and 12 are both prompt_id p1 sample 0" in output
    code, output = run(gens, "--out", tmp_path / "o")
    assert code == 2 and not (tmp_path / "o").exists()
    single = write_generations(tmp_path / "single", {"p1": ["Only one."], "p2": ["Also one."]})
    code, output = run(single, "-a", "length", "--pairing", "all", "--out", tmp_path / "o")
    assert code == 2 and "every prompt has fewer than two generations" in output
    code, output = run(single, "-a", "length", "--num-shards", 3, "--shard-index", 0, "--out", tmp_path / "o")
    assert code == 2 and "more processes than the 2 prompts" in output and not (tmp_path / "o").exists()


def test_a_shard_without_pairs(tmp_path):
    mixed = write_generations(tmp_path / "mixed", {"p1": ["a", "bb"], "p2": ["only one"], "p3": ["c", "dd"]})
    ds, _ = annotate_ok(mixed, "-a", "length", "--pairing", "all", "--shard-size", 1, "--out", tmp_path / "o")
    assert [r["prompt_id"] for r in ds] == ["p1", "p3"]
