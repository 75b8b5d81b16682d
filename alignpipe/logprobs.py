"""Summed log-probabilities of responses given prompts: the one computation shared by generate's checks,
reweight's importance correction, build-batches' reference pass and train.

Sequences are prompt + response, right-padded, so one forward scores any number of (prompt, response)
pairs; in pairwise training chosen and rejected go through the model in one concatenated forward.
Log-probs are gathered as logit[target] - logsumexp(logits), never materialising a log-softmax copy.
"""
from __future__ import annotations


def collate(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device="cpu") -> dict:
    """Right-padded prompt+response sequences.

    Returns input_ids (N, T) long, attention_mask (N, T) long, and response_mask (N, T) bool that is True
    at positions whose *token* belongs to the response (the targets whose log-probs are summed).
    """
    import torch

    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    T = max(lengths)
    n = len(prompts)
    ids = torch.full((n, T), pad_id, dtype=torch.long)
    attn = torch.zeros((n, T), dtype=torch.long)
    resp = torch.zeros((n, T), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = list(p) + list(r)
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attn[i, : len(seq)] = 1
        resp[i, len(p): len(seq)] = True
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "response_mask": resp.to(device)}


def token_logps(logits, targets):
    """log p(target) per position, (N, T-1) float32: gather minus logsumexp, in float32 for stability."""
    import torch

    logits = logits.float()
    picked = torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logps(model, batch: dict):
    """Summed response log-probs (N,) and response lengths (N,) for a batch from `collate`."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits[:, :-1]
    targets = batch["input_ids"][:, 1:]
    mask = batch["response_mask"][:, 1:]
    per_token = token_logps(logits, targets) * mask
    return per_token.sum(-1), mask.sum(-1)


def score_responses(model, prompts, responses, pad_id: int, batch_size: int = 16, device="cpu") -> list[float]:
    """Summed log-probs of many (prompt ids, response ids) pairs, in length-sorted batches, no grad."""
    import torch

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    result = [0.0] * len(prompts)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s: s + batch_size]
            batch = collate([prompts[i] for i in idx], [responses[i] for i in idx], pad_id, device)
            logps, _ = sequence_logps(model, batch)
            for i, v in zip(idx, logps.tolist()):
                result[i] = float(v)
    return result
