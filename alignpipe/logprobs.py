"""Summed log-probabilities of responses given prompts: the one computation shared by generate's checks,
reweight's importance correction, build-batches' reference pass and train.

Sequences are prompt + response, right-padded, so one forward scores any number of (prompt, response)
pairs; in pairwise training chosen and rejected go through the model in one concatenated forward.
The output head runs only where the next token is a response token: a pre-hook on the model's output
embeddings gathers those M hidden states (prompt and padding positions never reach the head), so the
logits are (M, V) instead of (N, T, V). The hook sits on the head itself, so it works through PEFT, DDP and
FSDP wrappers; a model whose forward bypasses its output embeddings falls back to full logits.
Log-probs are gathered as logit[target] - logsumexp(logits), never materialising a log-softmax copy.
"""
from __future__ import annotations

import contextlib


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


def _output_head(model):
    """The module that turns hidden states into logits (through DDP's .module and PEFT's passthrough)."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    get = getattr(inner, "get_output_embeddings", None)
    return get() if get is not None else None


@contextlib.contextmanager
def head_at(model, flat_positions):
    """While active, the output head sees only the hidden states at `flat_positions` of (N*T) positions."""
    head = _output_head(model)
    if head is None:
        yield
        return

    def gather(_module, args):
        hidden = args[0]
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat_positions), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def sequence_logps(model, batch: dict):
    """Summed response log-probs (N,) and response lengths (N,) for a batch from `collate`."""
    import torch

    ids = batch["input_ids"]
    mask = batch["response_mask"][:, 1:]  # position t predicts token t+1
    rows, cols = mask.nonzero(as_tuple=True)
    with head_at(model, rows * ids.shape[1] + cols):
        out = model(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits
    if logits.dim() == 3:  # the head was not reached through get_output_embeddings(): full logits
        per_token = token_logps(logits[:, :-1], ids[:, 1:]) * mask
        return per_token.sum(-1), mask.sum(-1)
    logits = logits.float()
    targets = ids[rows, cols + 1]
    picked = logits.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)
    sums = torch.zeros(ids.shape[0], dtype=picked.dtype, device=picked.device).index_add(0, rows, picked)
    return sums, mask.sum(-1)


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
