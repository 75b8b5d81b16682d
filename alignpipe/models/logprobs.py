"""Summed log-probabilities of responses given prompts: the one computation shared by generate's checks,
reweight's importance correction, build-batches' reference pass and train.

Sequences are prompt + response, right-padded, so one forward scores any number of (prompt, response)
pairs; in pairwise training chosen and rejected go through the model in one concatenated forward.
The output head runs only where the next token is a response token: a pre-hook on the model's output
embeddings gathers those M hidden states (prompt and padding positions never reach the head), so the
logits are (M, V) instead of (N, T, V). The hook sits on the head itself, so it works through PEFT, DDP and
FSDP wrappers; a model whose forward bypasses its output embeddings falls back to full logits.
Log-probs are gathered as logit[target] - logsumexp(logits), never materialising a log-softmax copy.

Pairs sharing a prompt (`collate_shared` + `shared_prompt_logps`): the prompt goes through the model once,
its key/value cache is repeated for the two answers, and the answers continue from it (right-padded
prompts, explicit position ids, so no row is ever fully masked). Same sums as the concatenated forward up to
float rounding, with the prompt's layers computed once instead of twice; gradients flow through the cache.

The numerics of training (`autocast`, `use_shared_prompt`, `summed_logps`, `batch_logps`): train computes a
policy's log-probs under bfloat16 autocast over float32 weights for --dtype bfloat16, batch by stored batch,
pairs concatenated (or prompt-shared for wide models). A reference cached by build-batches goes through the
very same calls on the very same collated batches, so with policy = reference every difference is exactly 0
and the first DPO step's loss is log 2. `reference_numerics` names those settings; train compares its own with
the ones a stored reference was made with.
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


def _padded(seqs: list[list[int]], pad_id: int):
    import torch

    T = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, x in enumerate(seqs):
        ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return ids, mask


def collate_shared(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device="cpu") -> dict:
    """B prompts and k*B responses (response i continues prompt i % B), each block right-padded on its own:
    prompt_ids / prompt_mask (B, Lp), prompt_lengths (B,), response_ids / response_mask (kB, Lr)."""
    import torch

    p_ids, p_mask = _padded(prompts, pad_id)
    r_ids, r_mask = _padded(responses, pad_id)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    out = {"prompt_ids": p_ids, "prompt_mask": p_mask, "prompt_lengths": lengths, "response_ids": r_ids,
           "response_mask": r_mask}
    return {k: v.to(device) for k, v in out.items()}


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
    picked = _picked(logits, ids[rows, cols + 1])
    sums = torch.zeros(ids.shape[0], dtype=picked.dtype, device=picked.device).index_add(0, rows, picked)
    return sums, mask.sum(-1)


def _bare(model):
    """The transformers model under DDP / PEFT wrappers (to read its forward's signature)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _cache_kw(model) -> str:
    import inspect

    params = inspect.signature(type(_bare(model)).forward).parameters
    return "cache" if "cache" in params else "past_key_values"  # transformers >= 5.x renamed it


def _picked(logits, targets):
    logits = logits.float()
    return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - logits.logsumexp(-1)


def shared_prompt_logps(model, shared: dict):
    """Summed log-probs (kB,) and lengths (kB,) of the responses of `collate_shared`, the prompt run once."""
    import torch

    p_ids, p_mask, p_len = shared["prompt_ids"], shared["prompt_mask"], shared["prompt_lengths"]
    r_ids, r_mask = shared["response_ids"], shared["response_mask"]
    B, Lp = p_ids.shape
    n, Lr = r_ids.shape
    last = torch.arange(B, device=p_ids.device) * Lp + p_len - 1
    with head_at(model, last):  # the last prompt position predicts every answer's first token
        out = model(input_ids=p_ids, attention_mask=p_mask, use_cache=True)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    which = torch.arange(n, device=p_ids.device) % B
    cache.batch_select_indices(which)
    first = _picked(out.logits[which], r_ids[:, 0])
    rows, cols = r_mask[:, 1:].nonzero(as_tuple=True)
    positions = p_len[which].unsqueeze(1) + torch.arange(Lr, device=r_ids.device)
    with head_at(model, rows * Lr + cols):
        out = model(input_ids=r_ids, attention_mask=torch.cat([p_mask[which], r_mask], 1), position_ids=positions,
                    use_cache=True, **{_cache_kw(model): cache})
    rest = _picked(out.logits, r_ids[rows, cols + 1])
    return first.index_add(0, rows, rest), r_mask.sum(-1)


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


def response_logps(ds, model, tokenizer, *, batch_size: int = 16, device="cpu", which=(1, 2)) -> tuple[list, list]:
    """Summed log-probs of each row's responses (of an annotations table) under `model`: two lists, for
    response 1 and response 2 (None for response 2 of pointwise rows, and for responses not in `which`).

    The prompt is rendered as generate renders it (`alignpipe.models.prompting`). The response's tokens are
    response{k}_token_ids, exactly as generate sampled them; when null (imported data, schema < 1.2) the
    text is re-encoded, plus EOS when response{k}_finish_reason is 'eos' (without finish reasons: when
    response{k}_num_tokens is one more than the re-encoded length), exact only when the text round-trips
    through the tokenizer."""
    from alignpipe.models.prompting import encode, render_prompt

    prompts, responses, slots = [], [], []
    eos = tokenizer.eos_token_id
    for i, row in enumerate(ds):
        prompt = encode(tokenizer, render_prompt(tokenizer, row["prompt"], row["messages"],
                                                 where=f"prompt {row['prompt_id']!r}"))
        for k in which:
            if row[f"response{k}"] is None:
                continue
            ids = row.get(f"response{k}_token_ids")
            if ids is None:
                ids = encode(tokenizer, row[f"response{k}"])
                reason = row.get(f"response{k}_finish_reason")
                if eos is not None and (reason == "eos" if reason else row[f"response{k}_num_tokens"] == len(ids) + 1):
                    ids = ids + [eos]
            prompts.append(prompt)
            responses.append(list(ids))
            slots.append((i, k))
    scores = score_responses(model, prompts, responses, tokenizer.pad_token_id, batch_size, device)
    out: dict[int, list] = {1: [None] * len(ds), 2: [None] * len(ds)}
    for (i, k), s in zip(slots, scores):
        out[k][i] = s
    return out[1], out[2]


# ------------------------------------------------------------------------------- the numerics of training
SHARED_PROMPT_MIN_WIDTH = 512  # narrower models: the second forward call costs more than the prompt it saves


def autocast(device, dtype: str):
    """Training's autocast for --dtype: bfloat16 autocast over float32 weights, or none (float32)."""
    import torch

    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def use_shared_prompt(module, world: int = 1) -> bool:
    """Whether train scores pairs with the prompt computed once (`shared_prompt_logps`): only when the model is
    not wrapped for several processes (DDP wants one forward per backward), does not recompute activations
    (gradient checkpointing drops the cache) and is wide enough to gain (measured: SmolLM2-135M, width 576,
    4-7% less CPU per step; the 64-wide test model 20% more); else one concatenated forward."""
    bare = _bare(module)
    wide = getattr(getattr(bare, "config", None), "hidden_size", 0) >= SHARED_PROMPT_MIN_WIDTH
    return wide and world == 1 and not getattr(bare, "is_gradient_checkpointing", False)


def summed_logps(model, batch: dict, shared: dict | None = None, use_shared: bool = False):
    """Summed response log-probs (N,) and lengths (N,) of a collated batch (`collate`; pairs: chosen rows then
    rejected rows) as train computes them: through `shared` (`collate_shared`) when `use_shared`."""
    if shared is not None and use_shared:
        return shared_prompt_logps(model, shared)
    return sequence_logps(model, batch)


def batch_logps(model, batch, *, dtype: str, device, world: int = 1):
    """Summed log-probs (N,) of a `train_data.Batch` exactly as train computes the policy's for --dtype, without
    gradients: build-batches' reference pass calls this on the batches train will read."""
    import torch

    tensors = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
               "response_mask": batch.response_mask}
    with torch.inference_mode(), autocast(device, dtype):
        logps, _ = summed_logps(model, tensors, batch.shared, use_shared_prompt(model, world))
    return logps


def reference_numerics(dtype: str, device, shared_prompt: bool, world: int = 1) -> dict:
    """How log-probs are computed, batch by stored batch: what must agree between a stored reference and train
    for policy = reference to give exact zeros (dtype and autocast, device type, forward layout, processes:
    several slice each stored batch, which changes its padding)."""
    return {"dtype": dtype, "autocast": dtype == "bfloat16",
            "device_type": "cuda" if str(device).startswith("cuda") else "cpu",
            "layout": "shared prompt" if shared_prompt else "concatenated", "processes": world}


def numerics_mismatch(stored: dict | None, used: dict) -> str | None:
    """One line saying how a stored reference's numerics differ from this run's (None when they agree)."""
    if stored is None:
        return ("the stored reference log-probs carry no record of how they were computed (built before "
                "alignpipe 0.3): with policy = reference the first loss may differ from its exact value by rounding")
    diff = [f"{k} {stored.get(k)} (this run: {v})" for k, v in used.items() if stored.get(k) != v]
    if not diff:
        return None
    return ("the stored reference log-probs were computed with " + ", ".join(diff) + "; with policy = reference "
            "the first loss differs from its exact value by rounding (rebuild the batches with build-batches "
            "--reference --dtype/--device of this run to match)")


# --- per token: the inputs of token-level policy-gradient losses and of the stored per-token reference -------
def to_padded(values, rows, slots, shape, dtype=None):
    """Scatter per-position `values` (K,) into a zero (B, R) tensor at (rows, slots)."""
    import torch

    out = torch.zeros(shape, dtype=dtype or values.dtype, device=values.device)
    return out.index_put((rows, slots), values.to(out.dtype))


def response_token_logps(model, batch: dict, with_entropy: bool = False):
    """(logp (B, R) float32 with grad, mask (B, R) float32, entropy (B, R) or None) for `collate`'s batch."""
    import torch

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


def per_token_over(score, model, prompts: list, responses: list, pad_id: int, batch_size: int = 16,
                   device="cpu") -> list[list[float]]:
    """`score(model, batch)[0]`, a (B, R) per-token tensor, for many (prompt ids, response ids) pairs: no grad,
    length-sorted batches of `collate`, each row cut to its response's length, in the input order."""
    import torch

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    result: list = [None] * len(prompts)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s: s + batch_size]
            per_token = score(model, collate([prompts[i] for i in idx], [responses[i] for i in idx], pad_id,
                                             device))[0]
            for row, i in enumerate(idx):
                result[i] = per_token[row, : len(responses[i])].tolist()
    return result


def reference_token_logps(model, prompts: list, responses: list, pad_id: int, batch_size: int = 16,
                          device="cpu") -> list[list[float]]:
    """Per-token log-probs of many (prompt ids, response ids) under `model` (no grad), length-sorted batches."""
    return per_token_over(response_token_logps, model, prompts, responses, pad_id, batch_size, device)
