"""The shared test models and data behave as the rest of the suite assumes."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from alignpipe import testing


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_tokenizer_round_trips_text(tok):
    text = "Hello, world! 2 + 2 = 4; naïve café \u2603\n\ttabs and  spaces"
    ids = tok(text, add_special_tokens=True)["input_ids"]
    assert tok.decode(ids) == text  # no bos/eos added, byte-level: lossless
    assert len(tok) == testing.VOCAB_SIZE


def test_special_tokens(tok):
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "right"
    for special in ("<|im_start|>", "<|im_end|>"):
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1


@pytest.mark.parametrize("text", list("123456789AB"))
def test_digits_and_choices_are_single_tokens(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1 and tok.decode(ids) == text
    assert len(tok(" " + text, add_special_tokens=False)["input_ids"]) == 1


def test_chat_template_renders(tok):
    messages = [{"role": "user", "content": "Hi there"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    full = tok.apply_chat_template(messages + [{"role": "assistant", "content": "Hello!"}], tokenize=False)
    assert full == text + "Hello!<|im_end|>\n"


def test_tokenizer_variants(tiny_lm_nopad_dir, tiny_lm_notemplate_dir):
    nopad = AutoTokenizer.from_pretrained(tiny_lm_nopad_dir)
    assert nopad.pad_token is None and nopad.chat_template
    notemplate = AutoTokenizer.from_pretrained(tiny_lm_notemplate_dir)
    assert notemplate.chat_template is None and notemplate.pad_token == "<|pad|>"
    # both folders still hold the model itself
    assert AutoModelForCausalLM.from_pretrained(tiny_lm_nopad_dir).config.vocab_size == len(nopad)


def test_tiny_lm_forward_and_generate(tiny_lm_dir):
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    assert model.dtype == torch.float32 and model.config.vocab_size == len(tok)
    batch = tok(["Hello there, how are you?", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()

    tok.padding_side = "left"
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in ("Tell me a joke.", "Why?")
    ]
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    out = model.generate(**batch, max_new_tokens=6, do_sample=True, top_k=0, top_p=1.0)
    assert out.shape[0] == 2 and batch["input_ids"].shape[1] < out.shape[1] <= batch["input_ids"].shape[1] + 6
    greedy = [model.generate(**batch, max_new_tokens=6, do_sample=False) for _ in range(2)]
    assert torch.equal(greedy[0], greedy[1])


def test_same_seed_same_weights(tmp_path, tiny_lm_dir, tiny_tokenizer_dir):
    again = testing.build_causal_lm(tmp_path / "again", tiny_tokenizer_dir, seed=0)
    other = testing.build_causal_lm(tmp_path / "other", tiny_tokenizer_dir, seed=1)
    ref = load_file(tiny_lm_dir / "model.safetensors")
    same = load_file(again / "model.safetensors")
    diff = load_file(other / "model.safetensors")
    assert ref.keys() == same.keys()
    assert all(torch.equal(ref[k], same[k]) for k in ref)
    assert any(not torch.equal(ref[k], diff[k]) for k in ref)


def test_building_leaves_global_rng_alone(tmp_path, tiny_tokenizer_dir):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    testing.build_causal_lm(tmp_path / "lm", tiny_tokenizer_dir, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_reward_model_scores_each_sequence(tiny_rm_dir):
    tok = AutoTokenizer.from_pretrained(tiny_rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    texts = ["A short answer.", "A much longer answer that goes on for a while.", "Ok"]
    for side in ("right", "left"):
        tok.padding_side = side
        batch = tok(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            scores = model(**batch).logits
        assert scores.shape == (3, 1) and torch.isfinite(scores).all()
        if side == "right":
            first = scores
    # the score is read at the last real token, whatever the padding side
    assert torch.allclose(first, scores, atol=1e-5)


def test_prompt_set(prompts_path):
    rows = [json.loads(line) for line in prompts_path.read_text().splitlines()]
    assert len(rows) >= 250
    assert len({r["prompt_id"] for r in rows}) == len(rows)
    assert len({r["prompt"] for r in rows}) == len(rows)
    splits = Counter(r["split"] for r in rows)
    assert set(splits) == {"train", "test"} and splits["test"] >= 40
    assert all(r["prompt"].strip() and len(r["prompt"]) < 400 for r in rows)


def test_smollm2_answers(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.chat_template and tok.pad_token is not None and tok.eos_token == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    assert getattr(model.config, "quantization_config", None) is None
    for question, expected in [("What is 2+2?", "4"), ("What is the capital of France?", "Paris")]:
        batch = tok.apply_chat_template(
            [{"role": "user", "content": question}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=30, do_sample=False)
        answer = tok.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        assert expected in answer, answer
