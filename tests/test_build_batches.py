"""build-batches: tasks, tokenisation and truncation at the token level, batching, mixing, reference log-probs,
and the command end to end (schema, manifest, idempotent rerun, resume, bad input)."""
from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest
import torch
from datasets import Dataset
from typer.testing import CliRunner

from alignpipe import schemas
from alignpipe.batches import tasks, tokenise
from alignpipe.cli import app
from alignpipe.data.io import read_input
from alignpipe.data.manifest import read_manifest
from alignpipe.data.output import StageOutput
from alignpipe.models.loading import load_tokenizer
from alignpipe.models.logprobs import collate
from alignpipe.models.prompting import encode
from alignpipe.testing import logp_tolerance

runner = CliRunner()
IM_END, EOS = 2, 0  # ids in the tiny tokenizer

PREFERENCE = [
    {"prompt": "What is 2+2?", "chosen": "It is 4.", "rejected": "5"},
    {"prompt": "Name a colour.", "chosen": "Blue is a colour that many people like.", "rejected": "Dog"},
    {"prompt": "Say hi", "chosen": "Hi!", "rejected": "Go away, I do not want to talk to you at all."},
]
SCORED = [
    {"prompt": "Write a word.", "completions": ["apple", "banana split", "cherry", "d"], "scores": [1.0, 3.0, 2.0, 3.0]},
    {"prompt": "Count to three.", "completions": ["1 2 3", "one two three"], "scores": [0.5, 0.5]},
    {"prompt": "Lonely prompt", "completions": ["only one"], "scores": [1.0]},
]
LABELLED = [
    {"prompt": "Be nice.", "completion": "You are great.", "label": True},
    {"prompt": "Be nice.", "completion": "Whatever.", "label": False},
    {"prompt": "Help me.", "completion": "Sure, what do you need?", "label": True},
]
PROMPTS = [
    {"prompt": "Capital of France?", "reference": "Paris.", "split": "train"},
    {"prompt": "Capital of Italy?", "reference": "Rome.", "split": "test"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                  {"role": "assistant", "content": "Hi."}]},
]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def build(inputs, out, tokenizer, *extra):
    return invoke("build-batches", *inputs, "--out", out, "--tokenizer", tokenizer, *extra)


def write_kind(path, kind, rows):
    """A dataset of `kind` written through the foundation (for kinds no finished stage writes yet)."""
    with StageOutput(path, stage="test", kind=kind, config={}, inputs=[]) as so:
        so.finish(Dataset.from_list(rows, features=schemas.features(kind)))
    return path


def ann(pid, r1, r2=None, *, s1=0, s2=1, reward1=None, reward2=None, label=None, preference=None, prompt=None,
        w1=None, w2=None):
    """An annotations row (with weights when w1 is given)."""
    pair = r2 is not None
    row = {"prompt_id": pid, "prompt": prompt if prompt is not None else f"prompt {pid}", "messages": [],
           "iteration": 0, "response1": r1, "response1_sample_index": s1, "response1_num_tokens": 0,
           "response1_behaviour_logp": None, "response1_reward": reward1, "response1_label": label,
           "response1_finish_reason": None, "response1_token_ids": None, "response1_token_logps": None, "response2": r2, "response2_sample_index": s2 if pair else None, "response2_num_tokens": 0 if pair else None,
           "response2_behaviour_logp": None, "response2_reward": reward2, "response2_label": None,
           "response2_finish_reason": None, "response2_token_ids": None, "response2_token_logps": None, "reference": None, "preference": preference, "annotator": "test", "raw": [], "pairing": "imported", "policy": ""}
    if w1 is not None:
        row.update(response1_weight=w1, response2_weight=w2)
    return row


def examples(task, rows, kind="annotations", **opts):
    ds = Dataset.from_list(rows, features=schemas.features(kind))
    return tasks.make_examples(ds, kind, tasks.TASKS[task], "in", tasks.TaskOptions(**opts))


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Imported fixtures: preference pairs, scored and labelled generations, prompts with references."""
    root = tmp_path_factory.mktemp("bb-data")
    paths = {}
    for name, rows in (("pref", PREFERENCE), ("scored", SCORED), ("labelled", LABELLED), ("prompts", PROMPTS)):
        src = root / f"{name}.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
        result = invoke("import", src, "--out", root / name)
        assert result.exit_code == 0, result.output
        paths[name] = root / name
    ds, _ = read_input(paths["pref"], "annotations", stage="test")
    weighted = [{**r, "response1_weight": 0.25 * (i + 1), "response2_weight": 2.0} for i, r in enumerate(ds)]
    paths["weighted"] = write_kind(root / "weighted", "weighted", weighted)
    return paths


# ---------------------------------------------------------------------------------------- token level
@pytest.mark.parametrize("plen", [4, 5, 6])
@pytest.mark.parametrize("rlen", [1, 2, 3, 4])
def test_truncation_at_every_boundary_and_no_loss_on_prompt(plen, rlen):
    max_length, max_prompt = 8, 5
    prompt, response = list(range(10, 10 + plen)), list(range(50, 50 + rlen))
    p, (r,), cut_p, (cut_r,) = tokenise.truncate(prompt, [response], max_length, max_prompt)
    assert p == prompt[-max_prompt:] and cut_p == (plen > max_prompt)  # left cut keeps the prompt's end
    assert r == response[: max_length - len(p)] and cut_r == (len(p) + rlen > max_length)
    assert len(p) + len(r) <= max_length and len(r) >= 1
    batch = collate([p, [1]], [r, [2, 3]], pad_id=3)  # a second, different-length row adds padding
    mask, attn = batch["response_mask"][0], batch["attention_mask"][0]
    assert not mask[: len(p)].any()  # prompt positions get no loss, up to the boundary
    assert mask[len(p): len(p) + len(r)].all() and int(mask.sum()) == len(r)
    assert not mask[len(p) + len(r):].any() and int(attn.sum()) == len(p) + len(r)
    labels = torch.where(batch["response_mask"], batch["input_ids"], -100)[0]
    assert labels.tolist() == [-100] * len(p) + r + [-100] * (len(labels) - len(p) - len(r))


def test_bad_length_limits():
    with pytest.raises(Exception, match="--max-prompt-length 8 must be >= 1 and below --max-length 8"):
        tokenise.check_lengths(8, 8)


def test_chat_template_rendering_and_end_token(tok, tiny_lm_notemplate_dir):
    assert tokenise.turn_end_id(tok) == IM_END
    assert tokenise.turn_end_id(load_tokenizer(tiny_lm_notemplate_dir)) is None
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    exs = [{"prompt_id": "a", "prompt": "Hi there", "messages": [], "response1": "Hello!"},
           {"prompt_id": "b", "prompt": "Hello", "messages": conv, "response1": "Hi."}]
    out = tokenise.tokenise([dict(e) for e in exs], tok, num_responses=1, max_length=64, max_prompt_length=32,
                            use_chat_template=True, counts=Counter())
    assert out[0]["prompt"] == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert out[0]["prompt_input_ids"] == encode(tok, out[0]["prompt"])
    assert out[0]["response1_input_ids"] == encode(tok, "Hello!") + [IM_END]
    # prompt + response is the template's whole conversation up to the end-of-turn token
    full = tok.apply_chat_template([{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}],
                                   tokenize=False)
    assert tok.decode(out[0]["prompt_input_ids"] + out[0]["response1_input_ids"]) == full.rstrip("\n")
    assert out[1]["prompt"] == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n" \
                               "<|im_start|>assistant\n"
    raw = tokenise.tokenise([dict(e) for e in exs], tok, num_responses=1, max_length=64, max_prompt_length=32,
                            use_chat_template=False, counts=Counter())
    assert raw[0]["prompt"] == "Hi there" and raw[0]["prompt_input_ids"] == encode(tok, "Hi there")
    assert raw[0]["response1_input_ids"] == encode(tok, "Hello!") + [EOS]
    assert raw[1]["prompt"] == out[1]["prompt"] and raw[1]["response1_input_ids"][-1] == IM_END  # conversations


def test_truncation_end_to_end(data, tmp_path, tiny_tokenizer_dir):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert build([data["pref"]], full, tiny_tokenizer_dir, "--task", "pairwise").exit_code == 0
    # full lengths (prompt, chosen, rejected): (13, 4, 23), (15, 20, 4), (16, 6, 2): the limits below hit a
    # prompt at the limit, one a token over it, and a response that fills --max-length exactly
    result = build([data["pref"]], cut, tiny_tokenizer_dir, "--task", "pairwise", "--max-length", 19,
                   "--max-prompt-length", 15)
    assert result.exit_code == 0, result.output
    rows = {r["example_id"]: r for r in read_input(full, "batches-pairwise", stage="t")[0]}
    want_p = want_r = 0
    for r in read_input(cut, "batches-pairwise", stage="t")[0]:
        f = rows[r["example_id"]]
        assert r["prompt_input_ids"] == f["prompt_input_ids"][-15:]
        want_p += len(f["prompt_input_ids"]) > 15
        for k in (1, 2):
            ids, room = f[f"response{k}_input_ids"], 19 - len(r["prompt_input_ids"])
            assert r[f"response{k}_input_ids"] == ids[:room] and r[f"response{k}_attention_mask"] == [1] * len(ids[:room])
            assert ids[-1] == IM_END
            assert (r[f"response{k}_input_ids"][-1] == IM_END) == (len(ids) <= room)  # cut responses lose it
            want_r += len(ids) > room
    report = read_manifest(cut)["report"]
    assert (report["prompts_truncated"], report["responses_truncated"]) == (want_p, want_r) == (1, 3)


# ----------------------------------------------------------------------------------------------- tasks
def test_pairing_strategies_exact():
    rows = [ann("p", t, s1=i, reward1=r) for i, (t, r) in enumerate(zip("abcd", [1.0, 3.0, 2.0, 3.0]))]
    ids = lambda exs: sorted((e["response1"], e["response2"]) for e in exs)
    exs, counts = examples("pairwise", rows, pairs="best-worst")
    assert ids(exs) == [("b", "a")] and not counts["ties_dropped"]
    exs, counts = examples("pairwise", rows, pairs="all")
    assert ids(exs) == [("b", "a"), ("b", "c"), ("c", "a"), ("d", "a"), ("d", "c")] and counts["ties_dropped"] == 1
    exs, counts = examples("pairwise", rows, pairs="margin:1.5")
    assert ids(exs) == [("b", "a"), ("d", "a")] and counts["below_margin_dropped"] == 4
    assert exs[0]["example_id"] == "p/0.1-0.0" and exs[0]["response1_reward"] == 3.0
    picks = {tuple(map(tuple, ids(examples("pairwise", rows, pairs="random", seed=s)[0]))) for s in range(8)}
    assert len(picks) > 1 and ids(examples("pairwise", rows, pairs="random", seed=3)[0]) == \
        ids(examples("pairwise", rows, pairs="random", seed=3)[0])
    tie = [ann("q", "x", s1=0, reward1=1.0), ann("q", "y", s1=1, reward1=1.0), ann("z", "solo", reward1=0.0)]
    exs, counts = examples("pairwise", tie, pairs="best-worst")
    assert exs == [] and counts["ties_dropped"] == 1 and counts["single_generation_prompts"] == 1


def test_pair_rows_preference_weights_and_margin():
    rows = [ann("a", "x", "y", preference=0.2, w1=0.3, w2=0.7, reward1=1.0, reward2=4.0),
            ann("b", "x", "y", preference=0.5, w1=1.0, w2=1.0),
            ann("c", "u", "v", preference=0.9, w1=1.0, w2=0.5)]
    exs, counts = examples("pairwise", rows, kind="weighted")
    assert counts["ties_dropped"] == 1 and len(exs) == 2
    assert (exs[0]["response1"], exs[0]["response1_weight"], exs[0]["response2_weight"]) == ("y", 0.7, 0.3)
    assert (exs[0]["response1_reward"], exs[0]["response2_reward"]) == (4.0, 1.0)
    exs, _ = examples("reward", [ann("a", "x", "y", reward1=1.0, reward2=3.0), ann("b", "u", "v", preference=1.0)])
    assert [(e["response1"], e["margin"]) for e in exs] == [("y", 2.0), ("u", 0.0)]


def test_sft_targets():
    rows = [ann("a", "x", "y", preference=0.3), ann("b", "u", "v", preference=0.5),
            *[ann("w", t, s1=i, reward1=r) for i, (t, r) in enumerate(zip("abc", [1.0, 3.0, 3.0]))],
            ann("n", "good", label=True), ann("n", "bad", s1=1, label=False)]
    exs, counts = examples("sft", rows)
    assert [e["response1"] for e in exs] == ["y", "u", "b", "good"] and "response2" not in exs[0]
    assert counts["best_of_n_dropped"] == 2 and counts["undesirable_dropped"] == 1


@pytest.mark.parametrize("threshold, labels, ties", [("median", [False, True, False, True], 0),
                                                      ("mean", [False, True, False, True], 0),
                                                      ("2", [False, True, True], 1)])
def test_pointwise_threshold(threshold, labels, ties):
    rows = [ann("p", t, s1=i, reward1=r) for i, (t, r) in enumerate(zip("abcd", [1.0, 3.0, 2.0, 3.0]))]
    exs, counts = examples("pointwise", rows, threshold=threshold)
    assert [e["response1_label"] for e in exs] == labels and counts["ties_dropped"] == ties
    assert counts["threshold_value"] == {"median": 2.5, "mean": 2.25, "2": 2.0}[threshold]


def test_pointwise_labels_and_pairs():
    rows = [ann("a", "x", "y", preference=0.0), ann("b", "good", label=True, reward1=-5.0)]
    exs, _ = examples("pointwise", rows)
    assert [(e["example_id"], e["response1"], e["response1_label"]) for e in exs] == [
        ("a/0.1/chosen", "y", True), ("a/0.0/rejected", "x", False), ("b/0.0", "good", True)]


# -------------------------------------------------------------------------------------------- batching
def _varied_lengths(n=400, seed=0, pairs=True):
    rng = random.Random(seed)
    return [[rng.randint(5, 200) for _ in range(2 if pairs else 1)] for _ in range(n)]


def test_batches_cover_every_example_once_and_are_seeded():
    lengths = _varied_lengths(101)
    batches = tokenise.make_batches(lengths, batch_size=8, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(101))
    assert sorted(len(b) for b in batches) == [5] + [8] * 12
    assert tokenise.padded_tokens(batches[0], lengths) == max(tokenise.padded_tokens(b, lengths) for b in batches)
    assert batches == tokenise.make_batches(lengths, batch_size=8, seed=1)
    assert batches != tokenise.make_batches(lengths, batch_size=8, seed=2)


def test_token_budget():
    lengths = _varied_lengths(200) + [[900, 950]]  # one example alone exceeds the budget
    batches = tokenise.make_batches(lengths, max_tokens=1024, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(201))
    assert [200] in batches
    assert all(tokenise.padded_tokens(b, lengths) <= 1024 for b in batches if b != [200])


def test_padding_fraction_exact():
    assert tokenise.padding_fraction([[0, 1]], [[2], [4]]) == 0.25
    assert tokenise.padding_fraction([[0], [1]], [[2], [4]]) == 0.0
    assert tokenise.padding_fraction([[0]], [[3, 5]]) == pytest.approx(0.2)  # a pair pads both sequences to 5


@pytest.mark.parametrize("pairs, figures", [(False, (0.0159, 0.4298)), (True, (0.2657, 0.4692))])
def test_length_grouping_cuts_padding(pairs, figures):
    """400 examples, lengths uniform in [5, 200], batches of 8: one sequence (sft) or two (a pair, whose
    shorter sequence is always padded to the longer: ~0.24 of the tokens even when perfectly grouped)."""
    lengths = _varied_lengths(400, pairs=pairs)
    grouped = tokenise.make_batches(lengths, batch_size=8, seed=0)
    baseline = tokenise.random_batches([len(b) for b in grouped], seed=0)
    g, r = tokenise.padding_fraction(grouped, lengths), tokenise.padding_fraction(baseline, lengths)
    assert (round(g, 4), round(r, 4)) == figures and g < r
    ungrouped = tokenise.make_batches(lengths, batch_size=8, group_by_length=False)
    assert tokenise.padding_fraction(ungrouped, lengths) > 0.4


def test_mix_counts_and_ids():
    assert tokenise.mix_counts([10, 6, 4], [0.5, 0.3, 0.2], None) == [10, 6, 4]
    assert tokenise.mix_counts([10, 10, 10], [0.5, 0.3, 0.2], None) == [10, 6, 4]
    assert tokenise.mix_counts([10, 10, 10], [0.5, 0.3, 0.2], 30) == [15, 9, 6]
    assert tokenise.mix_counts([3, 3], [1 / 3, 2 / 3], 4) == [1, 3]
    parts = [[{"example_id": f"a{i}"} for i in range(2)], [{"example_id": f"b{i}"} for i in range(4)]]
    out, taken = tokenise.mix(parts, [0.5, 0.5], 6, seed=0)
    assert taken == [3, 3] and len({e["example_id"] for e in out}) == 6
    assert {e["example_id"] for e in out[:2]} == {"a0@0", "a1@0"} and out[2]["example_id"].endswith("@0#r1")
    with pytest.raises(Exception, match="--mix '0.5': expected 2 comma-separated proportions"):
        tokenise.parse_mix("0.5", 2)


# ----------------------------------------------------------------------------------------- the command
@pytest.mark.parametrize("task, inputs, rows", [
    ("sft", ["prompts", "pref", "scored", "labelled"], 2 + 3 + 3 + 2),
    ("reward", ["pref", "scored"], 3 + 1),
    ("pointwise", ["weighted", "labelled", "scored"], 6 + 3 + 5),
    ("pairwise", ["weighted", "scored"], 3 + 1),
])
def test_every_task_end_to_end(task, inputs, rows, data, tmp_path, tiny_tokenizer_dir):
    out = tmp_path / "batches"
    result = build([data[i] for i in inputs], out, tiny_tokenizer_dir, "--task", task, "--batch-size", 3)
    assert result.exit_code == 0, result.output
    assert "length-grouped vs" in result.output
    ds, kind = read_input(out, f"batches-{task}", stage="train")
    assert kind == f"batches-{task}" and len(ds) == rows
    assert ds.column_names == [c.name for c in schemas.columns(kind)]
    m = read_manifest(out)
    assert m["stage"] == "build-batches" and m["config"]["task"] == task and m["num_rows"] == rows
    assert [i["path"] for i in m["inputs"]] == [str(data[i]) for i in inputs] + [str(tiny_tokenizer_dir)]
    assert m["report"]["examples"] == rows and 0 <= m["report"]["padding_fraction"] < 1
    assert list(ds["batch_index"]) == sorted(ds["batch_index"]) and max(ds["batch_index"]) == m["report"]["batches"] - 1
    assert all(len(ds["response1_input_ids"][i]) == len(ds["response1_attention_mask"][i]) for i in range(rows))
    if kind == "batches-pointwise":
        assert set(ds["response1_ref_logp"]) == {None}
    before = (out / "manifest.json").stat().st_mtime_ns
    again = build([data[i] for i in inputs], out, tiny_tokenizer_dir, "--task", task, "--batch-size", 3)
    assert again.exit_code == 0 and "up to date" in again.output
    assert (out / "manifest.json").stat().st_mtime_ns == before


def test_weights_and_prompts_input_details(data, tmp_path, tiny_tokenizer_dir):
    out = tmp_path / "b"
    assert build([data["weighted"]], out, tiny_tokenizer_dir, "--task", "pairwise").exit_code == 0
    ds, _ = read_input(out, "batches-pairwise", stage="t")
    assert sorted(ds["weight"]) == [(0.25 + 2) / 2, (0.5 + 2) / 2, (0.75 + 2) / 2]  # a pair: the mean of both
    out = tmp_path / "sft"
    assert build([data["prompts"]], out, tiny_tokenizer_dir, "--task", "sft").exit_code == 0
    ds, _ = read_input(out, "batches-sft", stage="t")
    assert sorted(ds["response1"]) == ["Hi.", "Paris."]  # the test-split prompt is held out
    assert read_manifest(out)["report"]["inputs"][0]["held_out_skipped"] == 1


def test_sft_from_generations(tmp_path, tiny_tokenizer_dir, tok):
    gen = {"prompt_id": "p", "prompt": "Hi", "messages": [], "reference": None, "num_tokens": 3,
           "behaviour_logp": -1.0, "policy": "pol", "policy_fingerprint": "f", "iteration": 2, "response_token_ids": None,
           "response_token_logps": None}
    rows = [{**gen, "sample_index": 0, "response": "Hello there", "finish_reason": "eos"},
            {**gen, "sample_index": 1, "response": "Hello the", "finish_reason": "length"}]
    src = write_kind(tmp_path / "gens", "generations", rows)
    assert build([src], tmp_path / "b", tiny_tokenizer_dir, "--task", "sft").exit_code == 0
    ds, _ = read_input(tmp_path / "b", "batches-sft", stage="t")
    got = {r["example_id"]: r["response1_input_ids"] for r in ds}
    assert got == {"p/2.0": encode(tok, "Hello there") + [IM_END], "p/2.1": encode(tok, "Hello the")}


def test_length_grouping_end_to_end(tmp_path, tiny_tokenizer_dir):
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    text = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(1, 60)))
    rows = [{"prompt": f"Question {i}: " + text(), "completions": [text(), text()], "scores": [0.0, 1.0]}
            for i in range(64)]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert invoke("import", tmp_path / "s.jsonl", "--out", tmp_path / "s").exit_code == 0
    result = build([tmp_path / "s"], tmp_path / "b", tiny_tokenizer_dir, "--task", "pairwise", "--batch-size", 4,
                   "--group-size", 4)
    assert result.exit_code == 0, result.output
    report = read_manifest(tmp_path / "b")["report"]
    # Derived from the stored batches, not pinned (the figures move with the interpreter's text handling):
    # each example is 2 sequences (chosen, rejected); a batch pads them all to its longest.
    ds, _ = read_input(tmp_path / "b", "batches-pairwise", stage="t")
    seqs: dict[int, list[int]] = {}
    for r in ds:
        p = len(r["prompt_input_ids"])
        seqs.setdefault(r["batch_index"], []).append([p + len(r[f"response{k}_input_ids"]) for k in (1, 2)])
    examples = [ex for b in sorted(seqs) for ex in seqs[b]]

    def fraction(batches: list[list[list[int]]]) -> float:
        real = sum(sum(ex) for b in batches for ex in b)
        padded = sum(2 * len(b) * max(max(ex) for ex in b) for b in batches)
        return 1 - real / padded

    assert report["padding_fraction"] == round(fraction(list(seqs.values())), 6)
    # bounds: the best fixed-size batching (all examples sorted by their longest sequence, cut in fours)
    # <= length-grouped (sorted within chunks of 4 batches) < random batchings of the same examples
    best = sorted(examples, key=max)
    optimum = fraction([best[i: i + 4] for i in range(0, len(best), 4)])
    rng = random.Random(1)
    randoms = []
    for _ in range(100):
        order = rng.sample(examples, len(examples))
        randoms.append(fraction([order[i: i + 4] for i in range(0, len(order), 4)]))
    assert optimum - 1e-6 <= report["padding_fraction"] < min(randoms)
    assert min(randoms) - 1e-6 <= report["padding_fraction_random"] <= max(randoms) + 1e-6


def test_token_budget_end_to_end(data, tmp_path, tiny_tokenizer_dir):
    result = build([data["scored"], data["pref"]], tmp_path / "b", tiny_tokenizer_dir, "--task", "pairwise",
                   "--max-tokens-per-batch", 100)
    assert result.exit_code == 0, result.output
    ds, _ = read_input(tmp_path / "b", "batches-pairwise", stage="t")
    batches: dict[int, list[int]] = {}
    for r in ds:
        p = len(r["prompt_input_ids"])
        batches.setdefault(r["batch_index"], []).extend(p + len(r[f"response{k}_input_ids"]) for k in (1, 2))
    assert len(batches) > 1
    assert all(len(seqs) == 2 or len(seqs) * max(seqs) <= 100 for seqs in batches.values())


def test_mix_end_to_end(data, tmp_path, tiny_tokenizer_dir):
    result = build([data["scored"], data["pref"]], tmp_path / "b", tiny_tokenizer_dir, "--task", "pairwise",
                   "--pairs", "all", "--mix", "0.5,0.5")
    assert result.exit_code == 0, result.output
    m = read_manifest(tmp_path / "b")
    assert m["report"]["mix"]["taken"] == [3, 3] and m["num_rows"] == 6  # 5 pairs and 3 pairs available
    ids = read_input(tmp_path / "b", "batches-pairwise", stage="t")[0]["example_id"]
    assert sum(i.endswith("@0") for i in ids) == 3 and sum(i.endswith("@1") for i in ids) == 3


def _direct_logp(model, prompt, response):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double(), -1)[0]
    return sum(logp[len(prompt) + j - 1, t].item() for j, t in enumerate(response))


@pytest.mark.parametrize("task, inputs", [("pairwise", ["pref", "scored"]), ("pointwise", ["labelled"])])
def test_reference_logps_equal_direct_forward(task, inputs, data, tmp_path, tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "b"
    result = invoke("build-batches", *[data[i] for i in inputs], "--out", out, "--task", task, "--reference",
                    tiny_lm_dir, "--device", "cpu", "--batch-size", 3, "--shard-size", 2)
    assert result.exit_code == 0, result.output
    ds, _ = read_input(out, f"batches-{task}", stage="train")
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    ks = (1, 2) if task == "pairwise" else (1,)
    # float32 summation order differs across CPUs (AVX2 / AVX-512 kernels): a bound per token, not 1e-5 in all
    assert all(abs(r[f"response{k}_ref_logp"] - _direct_logp(model, r["prompt_input_ids"], r[f"response{k}_input_ids"]))
               <= logp_tolerance("float32", ("cpu",), len(r[f"response{k}_input_ids"])) for r in ds for k in ks)
    assert str(tiny_lm_dir) in [i["path"] for i in read_manifest(out)["inputs"]]


def test_reference_resumes_after_a_crash(data, tmp_path, tiny_lm_dir, monkeypatch):
    from alignpipe.stages import build_batches as stage

    args = ("build-batches", data["scored"], data["pref"], "--out", tmp_path / "b", "--task", "pairwise",
            "--pairs", "all", "--reference", tiny_lm_dir, "--device", "cpu", "--shard-size", 3)
    real, calls = stage.reference_logps, []

    def dies_on_second_shard(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(stage, "reference_logps", dies_on_second_shard)
    assert invoke(*args).exit_code == 130 and not (tmp_path / "b").exists()
    monkeypatch.setattr(stage, "reference_logps", real)
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    resumed = read_input(tmp_path / "b", "batches-pairwise", stage="t")[0]
    assert read_manifest(tmp_path / "b")["report"]["resumed_shards"] == 1
    fresh = invoke(*args[:4], tmp_path / "c", *args[5:])
    assert fresh.exit_code == 0
    assert resumed.to_list() == read_input(tmp_path / "c", "batches-pairwise", stage="t")[0].to_list()


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("rows, kind, task, message", [
    ([ann("a", "x", "y", preference=1.0, prompt=" ")], "annotations", "pairwise", "row 0: empty prompt"),
    ([ann("a", "x", "y", preference=1.0, w1=1.0, w2=1.0), ann("b", "x", "y", preference=1.0, w1=math.nan, w2=1.0)],
     "weighted",
     "pairwise", "row 1: column 'response1_weight' is nan"),
    ([ann("a", "x", "y", preference=1.0, w1=1.0, w2=-1.0)], "weighted", "pairwise",
     "row 0: column 'response2_weight' is -1.0; weights must be finite and >= 0"),
    ([ann("a", "x", "y", s1=2, s2=2, preference=1.0)], "annotations", "pairwise", "row 0: mismatched pair ids"),
    ([ann("a", "x", s1=0, reward1=1.0), ann("a", "y", s1=0, reward1=2.0)], "annotations", "pairwise",
     "rows 0 and 1: mismatched ids: the same generation"),
    ([ann("a", "x", label=True), ann("a", "y", s1=1, label=False)], "annotations", "pairwise",
     ("row 0: column 'response1_reward' is null; pairing generations by --pairs best-worst needs rewards "
      "(written by `alignpipe annotate`)")),
    ([ann("a", "x", "y")], "annotations", "reward", "row 0: pair row has no 'preference' and no 'response1_reward'"),
    ([ann("a", "x")], "annotations", "pointwise", "column 'response1_reward' is null; a pointwise example without"),
    ([ann("a", "x", "y", preference=1.5)], "annotations", "pairwise", "column 'preference' is 1.5"),
])
def test_bad_rows(rows, kind, task, message, tmp_path, tiny_tokenizer_dir):
    src = write_kind(tmp_path / "in", kind, rows)
    result = build([src], tmp_path / "out", tiny_tokenizer_dir, "--task", task)
    assert result.exit_code == 2 and message in result.output, result.output
    assert f"error: {src}" in result.output and not (tmp_path / "out").exists()


def test_empty_responses_are_dropped_and_counted(tmp_path, tiny_tokenizer_dir):
    src = write_kind(tmp_path / "in", "annotations", [ann("a", "x", "", preference=1.0), ann("b", "u", "v", preference=1.0)])
    assert build([src], tmp_path / "out", tiny_tokenizer_dir, "--task", "pairwise").exit_code == 0
    assert read_manifest(tmp_path / "out")["report"]["inputs"][0]["empty_response_dropped"] == 1
    only_empty = write_kind(tmp_path / "in2", "annotations", [ann("a", "x", " ", preference=1.0)])
    result = build([only_empty], tmp_path / "out2", tiny_tokenizer_dir, "--task", "pairwise")
    assert result.exit_code == 2 and "no pairwise examples left" in result.output


@pytest.mark.parametrize("extra, message", [
    (["--task", "dpo"], "--task 'dpo': unknown (known: sft, reward, pointwise, pairwise, group)"),
    (["--task", "sft", "--reference", "REF"], "--reference: batches-sft has no reference log-prob columns"),
    (["--pairs", "margin:-1"], "--pairs 'margin:-1': pairing 'margin': at_least=-1.0 is outside its range: must be in the range >=0"),
    (["--pairs", "margin:x"], "--pairs 'margin:x': at_least: expected a number, found 'x'"),
    (["--revision", "main"], "is a local folder, not a Hub id"),
    (["--pairs", "best"], "--pairs 'best': unknown pairing 'best' (known: all, random, best-worst, margin)"),
    (["--task", "pointwise", "--threshold", "high"], "--threshold 'high': expected median, mean or a finite number"),
    (["--batch-size", 4, "--max-tokens-per-batch", 100], "give --batch-size or --max-tokens-per-batch, not both"),
    (["--mix", "0.5,0.5,0.5"], "--mix '0.5,0.5,0.5': expected 1 comma-separated proportions"),
    (["--max-length", 10, "--max-prompt-length", 10], "--max-prompt-length 10 must be >= 1 and below --max-length 10"),
    (["--task", "pointwise", "--prompts"], "is a 'prompts' dataset; `build-batches` needs weighted from"),
    (["--task", "sft", "--prompts", "NOTEMPLATE"],
     "row 2: conversational prompt but the tokenizer has no chat template; pass --chat-template FILE"),
])
def test_bad_usage(extra, message, data, tmp_path, tiny_tokenizer_dir, tiny_lm_dir, tiny_lm_notemplate_dir):
    extra = [tiny_lm_dir if e == "REF" else e for e in extra]
    inputs = [data["prompts"]] if "--prompts" in extra else [data["pref"]]
    tokenizer = tiny_lm_notemplate_dir if "NOTEMPLATE" in extra else tiny_tokenizer_dir
    extra = [e for e in extra if e not in ("--prompts", "NOTEMPLATE")]
    result = build(inputs, tmp_path / "out", tokenizer, *extra)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_needs_a_tokenizer(data, tmp_path):
    result = invoke("build-batches", data["pref"], "--out", tmp_path / "out")
    assert result.exit_code == 2 and "--tokenizer MODEL is needed (or --reference MODEL" in result.output
