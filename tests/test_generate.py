"""generate: rows, schema, manifest, determinism, finish reasons, behaviour log-probs, resume after SIGKILL,
process shards, PEFT adapters, chat templates, long/empty prompts and the other bad inputs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from alignpipe.stages.generate import prepare_prompts, shard_range
from typer.testing import CliRunner

from alignpipe import schemas
from alignpipe.cli import app
from alignpipe.data.io import read_input
from alignpipe.data.manifest import read_manifest
from alignpipe.models.loading import load_causal_lm, load_tokenizer, model_fingerprint
from alignpipe.models.logprobs import score_responses
from alignpipe.sampling.engine import Sampler, SamplingParams, cut_at_stop, eos_token_ids

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

QUESTIONS = ["Hi", "What is a list comprehension in Python and how is it used in practice by programmers?",
             "Explain the for statement.", "x", "Tell me about classes and their instances", "Why?",
             "How do I open a file for reading?", "What does the with statement do when an exception occurs?"]


def write_prompts(path: Path, rows: list[dict]) -> Path:
    """A prompts dataset as `alignpipe import` writes it."""
    from datasets import Dataset

    from alignpipe.data.output import StageOutput

    full = [{"prompt_id": f"p{i}", "messages": [], "reference": None, "split": "train", **r}
            for i, r in enumerate(rows)]
    with StageOutput(path, stage="import", kind="prompts", config={}, inputs=[]) as so:
        so.finish(Dataset.from_list(full, features=schemas.features("prompts")))
    return path


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    rows = [{"prompt": q} for q in QUESTIONS[:5]]
    rows[2] = {"prompt": "Explain the for statement.", "split": "test",
               "messages": [{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "Explain the for statement."}]}
    return write_prompts(tmp_path_factory.mktemp("prompts") / "prompts", rows)


@pytest.fixture(scope="module")
def many_prompts(tmp_path_factory) -> Path:
    return write_prompts(tmp_path_factory.mktemp("many") / "prompts", [{"prompt": q} for q in QUESTIONS])


def run(*args, env=None):
    result = runner.invoke(app, ["generate", *map(str, args)], env=env)
    return result.exit_code, result.output


def generate_ok(*args, env=None):
    code, output = run(*args, env=env)
    assert code == 0, output
    return output


def rows_of(path: Path) -> list[dict]:
    ds, kind = read_input(path, "generations", stage="test")
    assert kind == "generations"
    return ds.to_list()


# -- the dataset it writes -------------------------------------------------------------------------------
def test_rows_schema_manifest_and_up_to_date(tmp_path, prompts, tiny_lm_dir):
    out = tmp_path / "gen"
    args = [prompts, "--policy", tiny_lm_dir, "--out", out, "--num-samples", 3, "--max-new-tokens", 6,
            "--batch-size", 2, "--seed", 1, "--iteration", 4]
    said = generate_ok(*args)
    assert "generate: 15 rows (5 prompts x 3)" in said and "tok/s" in said
    m = read_manifest(out)
    assert m["schema"]["kind"] == "generations" and m["num_rows"] == 15 and m["seed"] == 1
    rep = m["report"]
    assert rep["rows"] == 15 and rep["prompts"] == 5 and rep["batch_size"] == 2 and rep["shards"] == [0, 1]
    assert sum(rep["finish_reasons"].values()) == 15 and rep["long_prompts"] == {"truncated": 0}
    assert [i["path"] for i in m["inputs"]] == [str(prompts), str(tiny_lm_dir)]
    rows = rows_of(out)
    assert list(rows[0]) == [c.name for c in schemas.columns("generations")]
    assert [r["sample_index"] for r in rows] == [0, 1, 2] * 5
    assert sorted({r["prompt_id"] for r in rows}) == ["p0", "p1", "p2", "p3", "p4"]
    assert all(r["policy"] == str(tiny_lm_dir) and r["policy_fingerprint"] == model_fingerprint(tiny_lm_dir)
               and r["iteration"] == 4 and 1 <= r["num_tokens"] <= 6 and r["behaviour_logp"] < 0 for r in rows)
    assert sum(r["num_tokens"] for r in rows) == rep["num_tokens"]
    conversation = next(r for r in rows if r["prompt_id"] == "p2")
    assert conversation["messages"][0] == {"role": "system", "content": "Be brief."}
    # batch order: prompts sorted by rendered token length (stable)
    tok = load_tokenizer(tiny_lm_dir)
    order = [r["prompt_id"] for r in rows[::3]]
    ds, _ = read_input(prompts, "prompts", stage="test")
    lengths = {r["prompt_id"]: len(tok.apply_chat_template(r["messages"] or [{"role": "user", "content": r["prompt"]}],
                                                           add_generation_prompt=True, tokenize=True)["input_ids"])
               for r in ds}
    assert [lengths[p] for p in order] == sorted(lengths.values())
    # idempotent rerun: up to date, nothing rewritten
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert "up to date" in generate_ok(*args)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp


def test_same_seed_same_output_other_seed_differs(tmp_path, prompts, tiny_lm_dir):
    common = [prompts, "--policy", tiny_lm_dir, "--max-new-tokens", 8, "--batch-size", 2]
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        generate_ok(*common, "--out", tmp_path / name, "--seed", seed)
    a, b, c = (rows_of(tmp_path / n) for n in "abc")
    assert a == b
    assert [r["response"] for r in a] != [r["response"] for r in c]


def test_finish_reasons_length_and_stop(tmp_path, prompts, tiny_lm_dir):
    generate_ok(prompts, "--policy", tiny_lm_dir, "--out", tmp_path / "one", "--max-new-tokens", 1)
    rows = rows_of(tmp_path / "one")
    assert {r["finish_reason"] for r in rows} == {"length"} and {r["num_tokens"] for r in rows} == {1}
    said = generate_ok(prompts, "--policy", tiny_lm_dir, "--out", tmp_path / "stop", "--max-new-tokens", 24,
                       "--stop", "e", "--stop", "zz")
    rows = rows_of(tmp_path / "stop")
    stopped = [r for r in rows if r["finish_reason"] == "stop"]
    assert len(stopped) >= 5 and all("e" not in r["response"] for r in stopped)
    assert "stop " in said


def test_split_and_batch_options(tmp_path, prompts, tiny_lm_dir):
    generate_ok(prompts, "--policy", tiny_lm_dir, "--out", tmp_path / "t", "--max-new-tokens", 2, "--split", "test")
    assert {r["prompt_id"] for r in rows_of(tmp_path / "t")} == {"p2"}
    assert read_manifest(tmp_path / "t")["report"]["batch_size"] == 32  # auto on CPU


# -- the sampler core: log-probs, eos, stop --------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_lm_dir):
    tok = load_tokenizer(tiny_lm_dir)
    model = load_causal_lm(tiny_lm_dir)
    ids = [tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                       add_generation_prompt=True), add_special_tokens=False)["input_ids"]
           for q in QUESTIONS[:4]]
    return model, tok, ids


@pytest.mark.parametrize("params,eos", [
    (SamplingParams(num_samples=2, max_new_tokens=12), None),
    (SamplingParams(num_samples=3, max_new_tokens=12, temperature=0.7, top_k=50, top_p=0.9, stop=("e",)), None),
    (SamplingParams(num_samples=2, max_new_tokens=12, temperature=0), None),
    (SamplingParams(num_samples=2, max_new_tokens=30), list(range(0, 1024, 3))),  # every third token ends it
])
def test_behaviour_logps_equal_a_separate_forward(tiny, params, eos):
    model, tok, ids = tiny
    samples = Sampler(model, tok, params, eos_ids=eos).sample(ids, seed=3)
    assert len(samples) == len(ids) * params.num_samples
    prompts = [p for p in ids for _ in range(params.num_samples)]
    ref = score_responses(model, prompts, [s.token_ids for s in samples], tok.pad_token_id)
    assert max(abs(s.logp - r) for s, r in zip(samples, ref)) < 1e-4
    eos_set = set(eos or eos_token_ids(tok, model.generation_config))
    for s in samples:
        assert (s.finish_reason == "eos") == (s.token_ids[-1] in eos_set)
        assert s.finish_reason != "length" or len(s.token_ids) == params.max_new_tokens
        assert not any(t in eos_set for t in s.token_ids[:-1])
    if eos:
        assert sum(s.finish_reason == "eos" for s in samples) >= 6
    if params.stop:
        assert any(s.finish_reason == "stop" for s in samples)
    if params.temperature == 0:  # greedy: both samples of a prompt agree
        assert all(samples[i].token_ids == samples[i + 1].token_ids for i in range(0, len(samples), 2))


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_continuous_batching_matches_one_batch(tiny, batch_size):
    """Refilling freed slots (prompts joining a running KV cache) changes neither the samples nor their
    log-probs: each prompt's draws come from its own seed, and the log-probs equal a separate forward."""
    model, tok, ids = tiny
    eos = list(range(0, 1024, 5))  # rows end at scattered steps, so slots free up and prompts join mid-batch
    params = SamplingParams(num_samples=2, max_new_tokens=24)
    prompts = ids + ids[::-1] + ids[:2]  # 10 prompts of different lengths
    sampler = Sampler(model, tok, params, eos_ids=eos)
    whole = sampler.sample(prompts, seed=7)
    parts = sampler.sample(prompts, seed=7, batch_size=batch_size)
    assert [s.token_ids for s in parts] == [s.token_ids for s in whole]
    assert len({len(s.token_ids) for s in whole}) > 5 and sampler.joinable
    ref = score_responses(model, [p for p in prompts for _ in range(2)], [s.token_ids for s in parts], tok.pad_token_id)
    assert max(abs(s.logp - r) for s, r in zip(parts, ref)) < 1e-4
    assert max(abs(a.logp - b.logp) for a, b in zip(parts, whole)) < 1e-4


def test_eos_ids_include_the_chat_end_token(tiny):
    model, tok, _ = tiny
    assert eos_token_ids(tok, model.generation_config) == [0, 2]  # <|endoftext|>, <|im_end|>
    assert cut_at_stop("abc###def\n\nx", ["\n\n", "###"]) == "abc" and cut_at_stop("abc", ["z"]) == "abc"


def test_prepare_prompts_sorts_stably_and_truncates_from_the_left(tmp_path, tiny):
    _, tok, _ = tiny
    path = write_prompts(tmp_path / "p", [{"prompt": q} for q in ["aa bb cc dd", "x", "y", "aa bb cc dd ee ff"]])
    ds, _ = read_input(path, "prompts", stage="test")
    prepared, rep = prepare_prompts(ds, tok, max_prompt_length=18)  # rendered lengths 16, 9, 9, 20
    assert list(prepared["prompt_id"]) == ["p1", "p2", "p0", "p3"] and rep == {"truncated": 1}
    full = tok(tok.apply_chat_template([{"role": "user", "content": "aa bb cc dd ee ff"}], tokenize=False,
                                       add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    assert list(prepared["_ids"][-1]) == full[-18:] and len(full) == 20
    assert shard_range(10, 3, 2, 0) == (0, 2) and shard_range(10, 3, 2, 1) == (2, 4)


# -- restartable and sharded -----------------------------------------------------------------------------
SHARDED = ["--max-new-tokens", 16, "--batch-size", 1, "--shard-batches", 1, "--seed", 5]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, many_prompts, tiny_lm_dir) -> Path:
    out = tmp_path_factory.mktemp("ref") / "gen"
    generate_ok(many_prompts, "--policy", tiny_lm_dir, "--out", out, *SHARDED)
    return out


def test_resume_after_sigkill_equals_uninterrupted(tmp_path, many_prompts, tiny_lm_dir, reference):
    out = tmp_path / "gen"
    cmd = [sys.executable, "-m", "alignpipe", "generate", str(many_prompts), "--policy", str(tiny_lm_dir),
           "--out", str(out), *map(str, SHARDED)]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = tmp_path / ".gen.partial" / "shard-00000" / "done"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = sorted((tmp_path / ".gen.partial").glob("shard-*/done"))
    assert not out.exists() and 1 <= len(done) < len(QUESTIONS)
    generate_ok(many_prompts, "--policy", tiny_lm_dir, "--out", out, *SHARDED)
    assert read_manifest(out)["report"]["resumed_shards"] == len(done)
    assert rows_of(out) == rows_of(reference)


def test_two_process_shards_equal_one(tmp_path, many_prompts, tiny_lm_dir, reference):
    out = tmp_path / "gen"
    generate_ok(many_prompts, "--policy", tiny_lm_dir, "--out", out, *SHARDED, "--num-shards", 2, "--shard-index", 0)
    with pytest.raises(Exception, match="parts \\[1\\] of 2 are missing"):
        read_input(out, "generations", stage="test")
    generate_ok(many_prompts, "--policy", tiny_lm_dir, "--out", out, *SHARDED, env={"RANK": "1", "WORLD_SIZE": "2"})
    part = read_manifest(out / "part-00001-of-00002")
    assert part["report"]["process_shard"] == [1, 2] and part["report"]["shards"] == [4, 8]
    assert rows_of(out) == rows_of(reference)
    # more processes than batches: the extra ones write empty, complete parts
    wide = tmp_path / "wide"
    for i in range(3):
        generate_ok(many_prompts, "--policy", tiny_lm_dir, "--out", wide, "--max-new-tokens", 2, "--batch-size", 4,
                    "--num-shards", 3, "--shard-index", i)
    assert read_manifest(wide / "part-00000-of-00003")["num_rows"] == 0 and len(rows_of(wide)) == 16


# -- policies and templates ------------------------------------------------------------------------------
def test_peft_adapter_policy(tmp_path, prompts, tiny_lm_dir, tiny):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_lm_dir))
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    adapter = tmp_path / "adapter"
    lora.save_pretrained(str(adapter))
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_lm_dir)
    common = [prompts, "--max-new-tokens", 8, "--seed", 2]
    generate_ok(*common, "--policy", adapter, "--out", tmp_path / "ad")
    generate_ok(*common, "--policy", tiny_lm_dir, "--out", tmp_path / "base")
    rows = rows_of(tmp_path / "ad")
    assert len(rows) == 10 and {r["policy"] for r in rows} == {str(adapter)}
    assert {r["policy_fingerprint"] for r in rows} == {model_fingerprint(adapter)}
    assert [r["behaviour_logp"] for r in rows] != [r["behaviour_logp"] for r in rows_of(tmp_path / "base")]
    assert str(tiny_lm_dir) in [i["path"] for i in read_manifest(tmp_path / "ad")["inputs"]]
    # log-probs of the merged adapter (what generate samples with) equal the unmerged PeftModel's forward
    _, tok, ids = tiny
    merged = load_causal_lm(adapter).merge_and_unload()
    samples = Sampler(merged, tok, SamplingParams(num_samples=2, max_new_tokens=10)).sample(ids, seed=1)
    ref = score_responses(load_causal_lm(adapter), [p for p in ids for _ in range(2)],
                          [s.token_ids for s in samples], tok.pad_token_id)
    assert max(abs(s.logp - r) for s, r in zip(samples, ref)) < 1e-4


def test_messages_need_a_chat_template(tmp_path, prompts, tiny_lm_notemplate_dir):
    code, said = run(prompts, "--policy", tiny_lm_notemplate_dir, "--out", tmp_path / "g")
    assert code == 2 and "--chat-template" in said and "prompt_id p2" in said
    assert not (tmp_path / "g").exists()
    from alignpipe.testing import CHAT_TEMPLATE

    (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE)
    generate_ok(prompts, "--policy", tiny_lm_notemplate_dir, "--out", tmp_path / "g", "--max-new-tokens", 2,
                "--chat-template", tmp_path / "chat.jinja")
    assert len(rows_of(tmp_path / "g")) == 10


def test_chat_template_that_fails_to_render(tmp_path, prompts, tiny_lm_notemplate_dir):
    (tmp_path / "bad.jinja").write_text("{{ raise_exception('no system messages') }}")
    code, said = run(prompts, "--policy", tiny_lm_notemplate_dir, "--out", tmp_path / "g",
                     "--chat-template", tmp_path / "bad.jinja")
    assert code == 2 and "row 0 (prompt_id p0): the chat template failed to render" in said


def test_tokenizer_without_pad_token(tmp_path, prompts, tiny_lm_nopad_dir):
    generate_ok(prompts, "--policy", tiny_lm_nopad_dir, "--out", tmp_path / "g", "--max-new-tokens", 3)
    assert len(rows_of(tmp_path / "g")) == 10


# -- long, empty and other bad input ---------------------------------------------------------------------
def test_long_prompts_truncate_or_skip(tmp_path, prompts, tiny_lm_dir):
    said = generate_ok(prompts, "--policy", tiny_lm_dir, "--out", tmp_path / "t", "--max-new-tokens", 2,
                       "--max-prompt-length", 12)
    rep = read_manifest(tmp_path / "t")["report"]
    assert rep["long_prompts"] == {"truncated": 3} and rep["rows"] == 10 and "3 long prompt(s) truncated" in said
    generate_ok(prompts, "--policy", tiny_lm_dir, "--out", tmp_path / "s", "--max-new-tokens", 2,
                "--max-prompt-length", 12, "--long-prompts", "skip")
    rep = read_manifest(tmp_path / "s")["report"]
    assert rep["long_prompts"] == {"skipped": 3} and rep["rows"] == 4
    code, said = run(prompts, "--policy", tiny_lm_dir, "--out", tmp_path / "x", "--max-new-tokens", 600)
    assert code == 2 and "context of 512 tokens" in said
    code, said = run(prompts, "--policy", tiny_lm_dir, "--out", tmp_path / "x", "--max-prompt-length", 2,
                     "--long-prompts", "skip")
    assert code == 2 and "every prompt is longer than --max-prompt-length 2" in said
    assert not list(tmp_path.glob(".x*")) and not (tmp_path / "x").exists()


def test_bad_inputs(tmp_path, prompts, tiny_lm_dir):
    empty = write_prompts(tmp_path / "empty", [{"prompt": "fine"}, {"prompt": "  ", "prompt_id": "blank"}])
    code, said = run(empty, "--policy", tiny_lm_dir, "--out", tmp_path / "o")
    assert code == 2 and "row 1 (prompt_id blank): empty prompt" in said
    generate_ok(prompts, "--policy", tiny_lm_dir, "--out", tmp_path / "gen", "--max-new-tokens", 1)
    cases = [
        ([tmp_path / "gen", "--policy", tiny_lm_dir], "is a 'generations' dataset"),
        ([prompts, "--policy", tmp_path / "nope"], "no such folder"),
        ([prompts, "--policy", tiny_lm_dir, "--long-prompts", "drop"], "--long-prompts 'drop'"),
        ([prompts, "--policy", tiny_lm_dir, "--batch-size", "many"], "--batch-size 'many'"),
        ([prompts, "--policy", tiny_lm_dir, "--split", "dev"], "--split 'dev'"),
        ([prompts, "--policy", tiny_lm_dir, "--top-p", 0], "--top-p"),
        ([prompts, "--policy", tiny_lm_dir, "--num-shards", 2, "--shard-index", 2], "--shard-index 2"),
        ([prompts, "--policy", tiny_lm_dir, "--engine", "vllm"], "--engine vllm"),
    ]
    for args, message in cases:
        code, said = run(*args, "--out", tmp_path / "bad")
        assert code == 2 and message in said, (args, said)
        assert not (tmp_path / "bad").exists()
