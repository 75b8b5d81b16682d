"""Per-token log-probs (and entropies) of response tokens, the inputs of token-level policy-gradient losses.

`response_token_logps(model, batch)` runs one forward over a batch from `alignpipe.logprobs.collate`
(right-padded prompt + response rows, `response_mask` True at response tokens) and returns (B, R) tensors,
R the longest response: log pi(y_t | x, y_<t) of each response token in order, a float mask, and, when asked,
the policy's entropy at each of those positions (no gradient). The output head sees only the positions that
predict response tokens (`alignpipe.logprobs.head_at`), so the (positions, vocab) logits are all it builds.
"""
from __future__ import annotations


def to_padded(values, rows, slots, shape, dtype=None):
    """Scatter per-position `values` (K,) into a zero (B, R) tensor at (rows, slots)."""
    import torch

    out = torch.zeros(shape, dtype=dtype or values.dtype, device=values.device)
    return out.index_put((rows, slots), values.to(out.dtype))


def response_token_logps(model, batch: dict, with_entropy: bool = False):
    """(logp (B, R) float32 with grad, mask (B, R) float32, entropy (B, R) or None) for `collate`'s batch."""
    import torch

    from alignpipe.logprobs import head_at

    ids = batch["input_ids"]
    mask = batch["response_mask"][:, 1:]  # position t predicts token t + 1
    rows, cols = mask.nonzero(as_tuple=True)
    slots = (mask.long().cumsum(-1) - 1)[rows, cols]  # index of the token within its response
    width = int(mask.sum(-1).max()) if rows.numel() else 1
    shape = (ids.shape[0], width)
    with head_at(model, rows * ids.shape[1] + cols):
        out = model(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits
    if logits.dim() == 3:  # the head was not reached through get_output_embeddings(): full logits
        logits = logits[:, :-1][rows, cols]
    logits = logits.float()
    logz = logits.logsumexp(-1)
    picked = logits.gather(1, ids[rows, cols + 1].unsqueeze(1)).squeeze(1) - logz
    entropy = None
    if with_entropy:
        with torch.no_grad():
            p = (logits - logz[:, None]).exp()
            entropy = to_padded(logz - (p * logits).sum(-1), rows, slots, shape)
    resp_mask = to_padded(torch.ones_like(picked), rows, slots, shape)
    return to_padded(picked, rows, slots, shape), resp_mask, entropy


def pad_lists(lists, width: int, device, dtype=None):
    """A (B, width) float tensor from ragged lists of floats, zero padded (or cut to width)."""
    import torch

    out = torch.zeros((len(lists), width), dtype=dtype or torch.float32)
    for i, values in enumerate(lists):
        values = list(values)[:width]
        if values:
            out[i, : len(values)] = torch.tensor(values, dtype=out.dtype)
    return out.to(device)


def group_batch_fields(group: dict, widths: int, device) -> dict:
    """The group task's per-answer tensors of a micro-batch (train_data.collate_group): advantage (B,),
    behaviour per-token log-probs (B, R) and, when stored, reference per-token log-probs (B, R)."""
    import torch

    out = {"advantage": torch.tensor(group["response1_advantage"], dtype=torch.float32, device=device),
           "behaviour": pad_lists(group["response1_behaviour_logps"], widths, device)}
    if group.get("response1_ref_logps") is not None:
        out["ref_tokens"] = pad_lists(group["response1_ref_logps"], widths, device)
    return out


def token_inputs(model, tensors: dict, fields: dict, weight):
    """TokenInputs of one micro-batch: the policy's per-token log-probs and entropies (one forward), with the
    stored behaviour / reference log-probs and advantages of `group_batch_fields`."""
    from alignpipe.policy_gradient import TokenInputs

    logp, mask, entropy = response_token_logps(model, tensors, with_entropy=True)
    return TokenInputs(logp=logp, behaviour_logp=fields["behaviour"], mask=mask, advantage=fields["advantage"],
                       weight=weight, ref_logp=fields.get("ref_tokens"), entropy=entropy)


def reference_token_logps(model, prompts: list, responses: list, pad_id: int, batch_size: int = 16,
                          device="cpu") -> list[list[float]]:
    """Per-token log-probs of many (prompt ids, response ids) under `model` (no grad), length-sorted batches."""
    import torch

    from alignpipe.logprobs import collate

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    result: list = [None] * len(prompts)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s: s + batch_size]
            batch = collate([prompts[i] for i in idx], [responses[i] for i in idx], pad_id, device)
            logp, _, _ = response_token_logps(model, batch)
            for row, i in enumerate(idx):
                result[i] = logp[row, : len(responses[i])].tolist()
    return result
