"""The static-cache decode path (alignpipe.sampling.static_decode) against the dynamic one (alignpipe.sampling.engine.Sampler):
same tokens, texts and finish reasons, log-probs within float rounding, every decode step of the same shapes
on the same buffers (what a CUDA graph needs)."""
from __future__ import annotations

import pytest
import torch

from alignpipe.models.loading import load_causal_lm, load_tokenizer
from alignpipe.sampling.engine import Sampler, SamplingParams
from alignpipe.sampling.static_decode import StaticSampler, static_sampler_or_none
from alignpipe.testing import logp_tolerance

QUESTIONS = ["Explain the for statement.", "What is a list?", "Hi",
             "Tell me about the with statement in some detail, please.", "x"]


@pytest.fixture(scope="module")
def tok(tiny_lm_dir):
    return load_tokenizer(tiny_lm_dir)


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True),
                add_special_tokens=False)["input_ids"] for q in QUESTIONS]


def _frequent_tokens(tok, k=12) -> list[int]:
    """Ids of common short tokens (letters and spaces): used as EOS ids so rows end at different steps."""
    return sorted({tok.convert_tokens_to_ids(t) for t in ["e", "t", "a", "Ġ", "o", "n", "s", "i"]
                   if tok.convert_tokens_to_ids(t) is not None})[:k]


def _compare(a, b, dtype):
    assert [x.token_ids for x in a] == [y.token_ids for y in b]
    assert [(x.text, x.finish_reason) for x in a] == [(y.text, y.finish_reason) for y in b]
    for x, y in zip(a, b):
        assert abs(x.logp - y.logp) <= logp_tolerance(dtype, ("cpu",), len(x.token_ids)), (x, y)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("batch_size", [None, 2])
@pytest.mark.parametrize("stop, early_eos", [((), False), (("e",), False), ((), True)])
def test_static_decode_equals_the_dynamic_path(dtype, batch_size, stop, early_eos, tok, prompts, tiny_lm_dir):
    model = load_causal_lm(tiny_lm_dir, dtype=dtype)
    eos = _frequent_tokens(tok) if early_eos else None
    params = SamplingParams(num_samples=2, max_new_tokens=20, stop=stop)
    dynamic = Sampler(model, tok, params, eos).sample(prompts, seed=3, batch_size=batch_size)
    static = StaticSampler(model, tok, params, eos).sample(prompts, seed=3, batch_size=batch_size)
    _compare(dynamic, static, dtype)
    reasons = {s.finish_reason for s in static}
    assert ("stop" in reasons) == bool(stop) and ("eos" in reasons) == early_eos
    if early_eos:
        assert len({len(s.token_ids) for s in static}) > 2 and "eos" in reasons  # rows end at different steps


def test_greedy_static_equals_dynamic(tok, prompts, tiny_lm_dir):
    model = load_causal_lm(tiny_lm_dir)
    params = SamplingParams(num_samples=1, max_new_tokens=12, temperature=0)
    _compare(Sampler(model, tok, params).sample(prompts, seed=0), StaticSampler(model, tok, params).sample(prompts, seed=0),
             "float32")


def test_every_decode_step_has_the_same_shapes_on_the_same_buffers(tok, prompts, tiny_lm_dir):
    """Groups of 2 prompts x 2 samples, the last group with one prompt (idle rows): one shape, one buffer set."""
    sampler = StaticSampler(load_causal_lm(tiny_lm_dir), tok, SamplingParams(num_samples=2, max_new_tokens=6))
    seen, real = [], sampler._step_fn

    def record(ids, mask, pos):
        seen.append((tuple(ids.shape), tuple(mask.shape), tuple(pos.shape), mask.data_ptr(),
                     tuple(layer.keys.data_ptr() for layer in sampler.cache.layers)))
        return real(ids, mask, pos)

    sampler._step_fn = record
    out = sampler.sample(prompts, seed=1, batch_size=2)
    assert len(out) == 10 and len(seen) == 3 * 5  # 3 groups x (6 tokens - 1 steps after the prefill)
    assert len(set(seen)) == 1
    width = max(map(len, prompts)) + 6
    assert seen[0][:3] == ((4, 1), (4, width), (4, 1))


def test_choice_of_sampler(tok, tiny_lm_dir):
    model = load_causal_lm(tiny_lm_dir)
    params = SamplingParams(num_samples=1, max_new_tokens=2)
    assert static_sampler_or_none(model, tok, params) is None  # auto on the CPU: the dynamic path
    assert static_sampler_or_none(model, tok, params, kv_cache="dynamic") is None
    forced = static_sampler_or_none(model, tok, params, kv_cache="static")
    assert isinstance(forced, StaticSampler)
    with pytest.raises(ValueError, match="--kv-cache 'paged': unknown"):
        static_sampler_or_none(model, tok, params, kv_cache="paged")
    model.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="SDPA"):
        StaticSampler(model, tok, params)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_static_decode_on_cuda_equals_the_dynamic_path(dtype, tok, prompts, tiny_lm_dir):
    """On CUDA: the static-cache path against the dynamic one."""
    model = load_causal_lm(tiny_lm_dir, dtype=dtype, device="cuda")
    params = SamplingParams(num_samples=2, max_new_tokens=16)
    dynamic = Sampler(model, tok, params).sample(prompts, seed=5, batch_size=2)
    sampler = StaticSampler(model, tok, params)
    static = sampler.sample(prompts, seed=5, batch_size=2)
    # other kernels for other widths: a token may flip where two probabilities nearly tie; compare log-probs
    same = sum(x.token_ids == y.token_ids for x, y in zip(dynamic, static))
    assert same >= len(dynamic) - 2
    for x, y in zip(dynamic, static):
        if x.token_ids == y.token_ids:
            assert abs(x.logp - y.logp) <= logp_tolerance(dtype, ("cuda",), len(x.token_ids))
    assert torch.cuda.is_available()
