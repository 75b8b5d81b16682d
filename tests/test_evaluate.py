"""evaluate: win rate and mean rewards of two policies' held-out answers, and the KL estimate against a
reference model; checked against numbers computed here from the same rows."""
from __future__ import annotations

import math

import pytest
from helpers import assert_clean_failure, cli, manifest, ok, prompt, rows_of, write_dataset

from alignpipe.models.loading import load_causal_lm, load_tokenizer
from alignpipe.models.logprobs import score_responses
from alignpipe.models.prompting import encode, render_prompt


@pytest.fixture(scope="module")
def gens(tmp_path_factory, tiny_lm_dir):
    """Generations of the tiny model (temperature 1) as candidate and baseline, 6 prompts x 2 samples."""
    root = tmp_path_factory.mktemp("eval")
    prompts = write_dataset(root / "prompts", "prompts", [prompt(i) for i in range(6)])
    common = ["--policy", tiny_lm_dir, "--num-samples", 2, "--max-new-tokens", 10]
    ok("generate", prompts, *common, "--seed", 1, "--out", root / "cand")
    ok("generate", prompts, *common, "--seed", 2, "--out", root / "base")
    return root


def test_win_rate_and_mean_rewards_by_hand(gens):
    out = gens / "versus"
    ok("evaluate", gens / "cand", gens / "base", "--annotator", "length", "--out", out)
    cand = {(r["prompt_id"], r["sample_index"]): len(r["response"]) for r in rows_of(gens / "cand")}
    base = {(r["prompt_id"], r["sample_index"]): len(r["response"]) for r in rows_of(gens / "base")}
    wins = [1.0 if cand[k] > base[k] else 0.5 if cand[k] == base[k] else 0.0 for k in cand]
    r = manifest(out)["report"]
    assert r["pairs"] == r["judged"] == 12
    assert r["win_rate"] == pytest.approx(sum(wins) / 12, abs=1e-12)
    assert r["mean_reward_candidate"] == pytest.approx(sum(cand.values()) / 12)
    assert r["mean_reward_baseline"] == pytest.approx(sum(base.values()) / 12)
    assert "kl_vs_reference" not in r
    rows = rows_of(out)
    assert all(row["preference"] == pytest.approx(1 / (1 + math.exp(-(row["response1_reward"] - row["response2_reward"]))))
               for row in rows)


def test_kl_against_the_sampling_model_itself_is_zero(gens, tiny_lm_dir):
    """Answers sampled from the reference (temperature 1): log pi - log pi_ref is 0 per answer (<1e-4 each)."""
    out = gens / "kl0"
    said = ok("evaluate", gens / "cand", gens / "base", "-a", "length", "--reference", tiny_lm_dir, "--out", out)
    assert abs(manifest(out)["report"]["kl_vs_reference"]) < 1e-4 and "KL vs reference" in said.output


def test_kl_against_another_model_equals_a_direct_forward(gens, tiny_lm_dir, tmp_path):
    """KL(candidate || other) = mean(behaviour_logp - log p_other(y|x)), p_other scored here directly on the
    token ids generate recorded (the tiny model's random text does not round-trip through its tokenizer)."""
    from transformers import AutoModelForCausalLM

    other = tmp_path / "other"  # the tiny policy with perturbed weights: a different reference
    model = AutoModelForCausalLM.from_pretrained(str(tiny_lm_dir))
    for p in model.parameters():
        p.data.add_(0.05 * p.data.std())
    model.save_pretrained(str(other))
    load_tokenizer(tiny_lm_dir).save_pretrained(str(other))
    ok("evaluate", gens / "cand", gens / "base", "-a", "length", "--reference", other, "--out", tmp_path / "kl")
    tok, ref = load_tokenizer(other), load_causal_lm(other)
    rows = rows_of(gens / "cand")
    prompts = [encode(tok, render_prompt(tok, r["prompt"], r["messages"])) for r in rows]
    direct = score_responses(ref, prompts, [r["response_token_ids"] for r in rows], tok.pad_token_id)
    expected = sum(r["behaviour_logp"] - d for r, d in zip(rows, direct)) / len(rows)
    got = manifest(tmp_path / "kl")["report"]["kl_vs_reference"]
    assert got == pytest.approx(expected, abs=1e-6) and abs(got) > 1e-3


def test_missing_reference_is_a_clean_error(gens, tmp_path):
    result = cli("evaluate", gens / "cand", gens / "base", "-a", "length", "--reference", tmp_path / "nope",
                 "--out", tmp_path / "v")
    assert_clean_failure(result, tmp_path / "v", "reference", "nope")
