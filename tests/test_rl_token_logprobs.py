"""Per-token response log-probs: they sum to the summed log-probs train uses for the other losses, land in
order at their response positions, and their entropies match a direct computation from full logits."""
from __future__ import annotations

import pytest
import torch

from alignpipe.models.logprobs import collate, response_token_logps, sequence_logps
from alignpipe.training.micro_batches import pad_lists


@pytest.fixture(scope="module")
def tiny(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()


def test_token_logps_sum_to_sequence_logps_and_entropy_is_exact(tiny):
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    responses = [[20, 21], [22, 23, 24, 25], [26]]
    batch = collate(prompts, responses, pad_id=0)
    with torch.no_grad():
        logp, mask, entropy = response_token_logps(tiny, batch, with_entropy=True)
        sums, _ = sequence_logps(tiny, batch)
        full = tiny(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    assert logp.shape == (3, 4) and mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert torch.allclose((logp * mask).sum(-1), sums, atol=1e-5)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        for t, token in enumerate(r):
            lp = full[i, len(p) + t - 1].log_softmax(-1)
            assert float(logp[i, t]) == pytest.approx(float(lp[token]), abs=1e-5)
            assert float(entropy[i, t]) == pytest.approx(float(-(lp.exp() * lp).sum()), abs=1e-5)


def test_token_logps_carry_gradient(tiny):
    batch = collate([[5, 6]], [[7, 8, 9]], pad_id=0)
    logp, mask, _ = response_token_logps(tiny, batch)
    (logp * mask).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny.parameters())
    tiny.zero_grad(set_to_none=True)


def test_pad_lists():
    assert pad_lists([[1.0, 2.0], [3.0]], 3, "cpu").tolist() == [[1, 2, 0], [3, 0, 0]]


def test_reference_token_logps_match_the_training_forward(tiny):
    from alignpipe.models.logprobs import reference_token_logps

    prompts, responses = [[5, 6, 7], [8, 9]], [[20, 21], [22, 23, 24]]
    got = reference_token_logps(tiny, prompts, responses, pad_id=0, batch_size=1)
    with torch.no_grad():
        logp, _, _ = response_token_logps(tiny, collate(prompts, responses, pad_id=0))
    assert [len(g) for g in got] == [2, 3]
    assert got[0] == pytest.approx(logp[0, :2].tolist(), abs=1e-5) and got[1] == pytest.approx(logp[1].tolist(), abs=1e-5)
