"""Batched sampling with the transformers engine: the decode loop behind `alignpipe generate`.

One call of `Sampler.sample` takes tokenised prompts and returns `num_samples` generations per prompt
(prompt-major), each with its token ids, text, finish reason, behaviour log-prob and the per-token
behaviour log-probs (what policy-gradient losses take the importance ratio against, token by token).

How it works, and why it is faster than `model.generate` / the `text-generation` pipeline:
- left padding, explicit position ids (padding-aware), the model's KV cache;
- the prompt is prefilled once and its cache repeated `num_samples` times (generate prefills every copy);
- continuous batching: at most `batch_size x num_samples` rows decode together; a finished row leaves
  the batch (its cache row is dropped) and freed slots are refilled with the next prompts, prefilled in
  groups and joined to the running cache (left padded; cache columns nobody attends to are trimmed).
  A decode step on CPU costs about the same for 4 or 16 rows (the weights are read once per step), so
  keeping the batch full is where the time goes, not the rows saved;
- the behaviour log-prob is gathered at each step from a log-softmax of the raw logits (temperature 1,
  before top-k/top-p): one (rows, vocab) tensor per step, no per-step logits kept;
- sampling uses transformers' own temperature/top-k/top-p warpers and `StopStringCriteria`, so its
  semantics are those of `generate`. Randomness: each prompt has its own seed, from which its rows'
  uniform draws (num_samples, max_new_tokens) are made up front, so a prompt's samples do not depend on
  which prompts share its batch or when it joined (resume, process shards, batch size), up to the float
  rounding of batched matrix products.

Finish reasons: `eos` (an EOS id, e.g. <|endoftext|> or the chat template's <|im_end|>, was sampled; it
counts in num_tokens and the log-prob), `stop` (a stop string completed: the text is cut before it, while
num_tokens and the log-prob cover every sampled token, as vLLM reports them), `length` (max_new_tokens).
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    num_samples: int = 2
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop: tuple[str, ...] = field(default_factory=tuple)


@dataclass
class Sample:
    token_ids: list[int]
    text: str
    finish_reason: str  # eos | stop | length
    logp: float
    token_logps: list[float] = field(default_factory=list)  # per sampled token, sum = logp (behaviour policy)


def derive_seed(seed: int, index: int) -> int:
    """A 60-bit seed for item `index` of a run seeded with `seed` (batches in generate, prompts in vLLM)."""
    import hashlib

    return int(hashlib.sha256(f"alignpipe:{seed}:{index}".encode()).hexdigest()[:15], 16)


def eos_token_ids(tokenizer, generation_config=None) -> list[int]:
    """EOS ids: the generation config's, the tokenizer's, and the chat end token when the template uses it."""
    ids: list[int] = []
    for value in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        ids += value if isinstance(value, (list, tuple)) else ([value] if value is not None else [])
    template = getattr(tokenizer, "chat_template", None) or ""
    for end in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"):
        if end in template and end in tokenizer.get_vocab():
            ids.append(tokenizer.convert_tokens_to_ids(end))
    return sorted({int(i) for i in ids})


def left_pad(prompts: list[list[int]], pad_id: int, device):
    """(input_ids, attention_mask, position_ids), each (B, P), left padded; positions start at 0 per row."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def _forward_kwargs(model) -> tuple[str, bool]:
    """(name of the cache argument, whether `logits_to_keep` is accepted) for this model's forward."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


class Sampler:
    """Samples batches of prompts from a causal LM (a plain model, or a PeftModel)."""

    def __init__(self, model, tokenizer, params: SamplingParams, eos_ids: list[int] | None = None):
        import torch
        from transformers.generation.logits_process import (
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.model, self.tokenizer, self.params = model.eval(), tokenizer, params
        self.device = next(model.parameters()).device
        if eos_ids is None:
            eos_ids = eos_token_ids(tokenizer, getattr(model, "generation_config", None))
        self.eos = torch.tensor(eos_ids, dtype=torch.long, device=self.device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(self.eos[0])
        self.warpers = []
        if params.temperature not in (0, 1):
            self.warpers.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            self.warpers.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(params.top_p))
        self.stop = None
        if params.stop:
            from transformers.generation.stopping_criteria import StopStringCriteria

            self.stop = StopStringCriteria(tokenizer, list(params.stop))
        self.cache_arg, self.keep_arg = _forward_kwargs(model)
        self.sdpa = getattr(getattr(model, "config", None), "_attn_implementation", None) == "sdpa"
        self.joinable = None  # whether the model's KV cache can take new rows mid-batch (DynamicLayer only)

    # -- the decode loop ---------------------------------------------------------------------------------
    def _forward(self, ids, mask, pos, cache, last_only: bool):
        if cache is not None and ids.shape[1] == 1 and self.sdpa:  # one query per row: the padding mask is all
            mask = mask[:, None, None, :].bool()  # of it; passed as SDPA's 4D mask, transformers builds none
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "use_cache": True}
        if cache is not None:
            kwargs[self.cache_arg] = cache
        if last_only and self.keep_arg:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        new_cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return out.logits[:, -1].float(), new_cache

    def _pick(self, logits, u):
        """Next token per row from its uniform draw `u` (R,) in [0, 1): inverse-CDF sampling of the warped
        distribution (the categorical of torch.multinomial, ~20x cheaper on CPU); argmax when greedy."""
        import torch

        if self.params.temperature == 0:
            return logits.argmax(-1)
        scores = logits
        for warp in self.warpers:
            scores = warp(None, scores)
        cdf = scores.softmax(-1).double().cumsum(-1)
        return torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)

    def _prefill(self, prompts: list[list[int]]):
        """Prefill prompts once, repeat each `num_samples` times: (logits, cache, mask, next positions)."""
        n = self.params.num_samples
        ids, mask, pos = left_pad(prompts, self.pad_id, self.device)
        logits, cache = self._forward(ids, mask, pos, None, last_only=True)
        if self.joinable is None:
            from transformers.cache_utils import DynamicLayer

            self.joinable = all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))
        if self.joinable:
            cache.layers = [_growing(layer) for layer in cache.layers]
        cache.batch_repeat_interleave(n)
        return logits.repeat_interleave(n, 0), cache, mask.repeat_interleave(n, 0), pos[:, -1:].repeat_interleave(n, 0) + 1

    def _stopped(self, tokens, rows, steps):
        """Rows whose text now ends in a stop string (checks each row's last few sampled tokens)."""
        import torch

        k = self.stop.maximum_token_len
        cols = steps[:, None] - k + torch.arange(1, k + 1, device=steps.device)
        window = tokens[rows].gather(1, cols.clamp(min=0))
        return self.stop(window.masked_fill(cols < 0, self.pad_id), None)

    def _decode(self, prompts: list[list[int]], uniforms, slots: int):
        """Continuous batching over `prompts`: at most `slots` rows decode together, and the slots of finished
        rows are refilled with the next prompts (prefilled in groups, their KV cache joined to the batch's).
        `uniforms` (rows, max_new_tokens) are each row's draws. Returns token ids (rows, T), per-token
        log-probs (rows, T), lengths (rows,) and stopped-by-string flags (rows,), rows prompt-major."""
        import torch

        n, T, dev = self.params.num_samples, self.params.max_new_tokens, self.device
        total = len(prompts) * n
        tokens = torch.full((total, T), self.pad_id, dtype=torch.long, device=dev)
        logps = torch.zeros((total, T), dtype=torch.float32, device=dev)
        lengths = torch.full((total,), T, dtype=torch.long, device=dev)
        by_stop = torch.zeros(total, dtype=torch.bool, device=dev)
        batch = _Batch(dev)
        queue, refill = 0, max(n, slots // 4 // n * n)  # admit prompts in groups of at least a quarter batch
        while queue < len(prompts) or batch.size:
            free = slots - batch.size
            if queue < len(prompts) and (not batch.size or (free >= refill and self.joinable)):
                k = min(max(free // n, 1), len(prompts) - queue)
                batch.join(*self._prefill(prompts[queue: queue + k]), torch.arange(queue * n, (queue + k) * n, device=dev))
                queue += k
            rows, steps = batch.rows, batch.steps
            nxt = self._pick(batch.logits, uniforms[rows, steps])
            tokens[rows, steps] = nxt
            logps[rows, steps] = batch.logits.gather(1, nxt[:, None]).squeeze(1) - torch.logsumexp(batch.logits, -1)
            done = torch.isin(nxt, self.eos)
            if self.stop is not None:
                stopped = self._stopped(tokens, rows, steps) & ~done
                by_stop[rows] = stopped
                done |= stopped
            batch.steps = steps = steps + 1
            done |= steps == T
            if bool(done.any()):
                lengths[rows[done]] = steps[done]
                keep = (~done).nonzero().squeeze(1)
                nxt = nxt[keep]
                batch.select(keep)
            if batch.size:
                batch.mask = torch.cat([batch.mask, batch.mask.new_ones((batch.size, 1))], 1)
                batch.logits, batch.cache = self._forward(nxt[:, None], batch.mask, batch.pos, batch.cache, last_only=False)
                batch.pos = batch.pos + 1
        return tokens, logps, lengths, by_stop

    # -- the public call ---------------------------------------------------------------------------------
    def sample(self, prompts: list[list[int]], seed: int | list[int], batch_size: int | None = None) -> list[Sample]:
        """`num_samples` generations of each prompt, prompt-major (prompt 0's samples first).

        `seed`: one seed per prompt, or an int from which prompt i's is derived. A prompt's samples depend
        only on its seed and its logits, not on which prompts share the batch (up to float rounding of
        batched matmuls). `batch_size`: prompts decoding together (default: all of them at once).
        """
        import torch

        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        seeds = [derive_seed(seed, i) for i in range(len(prompts))] if isinstance(seed, int) else list(seed)
        n, T = self.params.num_samples, self.params.max_new_tokens
        uniforms = torch.cat([torch.rand((n, T), generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
                              for s in seeds]).to(self.device)
        with torch.inference_mode():
            tokens, logps, lengths, by_stop = self._decode(prompts, uniforms, n * (batch_size or len(prompts)))
        tokens, lengths, by_stop = tokens.tolist(), lengths.tolist(), by_stop.tolist()
        sums = torch.cumsum(logps.double(), 1).gather(1, (torch.tensor(lengths, device=logps.device) - 1)[:, None])
        ids = [row[:k] for row, k in zip(tokens, lengths)]
        per_token = [row[:k] for row, k in zip(logps.tolist(), lengths)]
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        eos = set(self.eos.tolist())
        out = []
        for row, text, stopped, lp, tlp in zip(ids, texts, by_stop, sums.squeeze(1).tolist(), per_token):
            if row and row[-1] in eos:
                reason = "eos"
            elif stopped:
                reason, text = "stop", cut_at_stop(text, self.params.stop)
            else:
                reason = "length"
            out.append(Sample(row, text, reason, float(lp), tlp))
        return out


@functools.cache
def _growing_layer_class():
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A DynamicLayer whose keys and values live at the start of a buffer with spare room: a decode step
        writes its one position in place instead of copying the whole cache (DynamicLayer's torch.cat),
        amortised O(1) per token. Replaced tensors (batch selection, joins) are re-buffered on next update."""

        _k = _v = None

        @classmethod
        def of(cls, layer):
            new = cls()
            new.lazy_initialization(layer.keys, layer.values)
            new.keys, new.values = layer.keys, layer.values
            return new

        def update(self, key_states, value_states, *args, **kwargs):
            import torch

            n, q = self.get_seq_length(), key_states.shape[-2]
            if self._k is None or self.keys.data_ptr() != self._k.data_ptr() or n + q > self._k.shape[-2] \
                    or self.keys.shape[0] != self._k.shape[0]:
                shape = (*key_states.shape[:2], max(64, 2 * (n + q)), key_states.shape[-1])
                self._k = torch.empty(shape, dtype=key_states.dtype, device=key_states.device)
                self._v = torch.empty(shape, dtype=value_states.dtype, device=value_states.device)
                if n:
                    self._k[:, :, :n], self._v[:, :, :n] = self.keys, self.values
            self._k[:, :, n: n + q], self._v[:, :, n: n + q] = key_states, value_states
            self.keys, self.values = self._k[:, :, : n + q], self._v[:, :, : n + q]
            return self.keys, self.values

    return GrowingLayer


def _growing(layer):
    """`layer`'s keys and values in a GrowingLayer (the class is made on first use: no transformers import
    at start-up)."""
    return _growing_layer_class().of(layer)


class _Batch:
    """The rows decoding together: their output row, tokens sampled so far, pending logits, attention mask
    (left padded: zeros then ones per row), next positions and the KV cache (DynamicCache, rows aligned on
    the right)."""

    def __init__(self, device):
        import torch

        self.rows = torch.empty(0, dtype=torch.long, device=device)
        self.steps = torch.empty(0, dtype=torch.long, device=device)
        self.logits = self.mask = self.pos = self.cache = None

    @property
    def size(self) -> int:
        return int(self.rows.numel())

    def join(self, logits, cache, mask, pos, rows):
        """Add prefilled rows: both caches are left padded to the longer one and stacked."""
        import torch
        import torch.nn.functional as F

        if not self.size:
            self.logits, self.cache, self.mask, self.pos, self.rows = logits, cache, mask, pos, rows
            self.steps = torch.zeros_like(rows)
            return
        width = max(self.mask.shape[1], mask.shape[1])
        left = lambda t, dim: F.pad(t, (0, 0) * (t.dim() - 1 - dim) + (width - t.shape[dim], 0))
        for mine, new in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([left(mine.keys, 2), left(new.keys, 2)])
            mine.values = torch.cat([left(mine.values, 2), left(new.values, 2)])
        self.mask = torch.cat([left(self.mask, 1), left(mask, 1)])
        self.logits, self.pos = torch.cat([self.logits, logits]), torch.cat([self.pos, pos])
        self.rows, self.steps = torch.cat([self.rows, rows]), torch.cat([self.steps, torch.zeros_like(rows)])

    def select(self, keep):
        """Keep rows `keep`; drop cache columns that no remaining row attends to (once there are 16)."""
        self.rows, self.steps, self.mask, self.pos = self.rows[keep], self.steps[keep], self.mask[keep], self.pos[keep]
        if not self.size:
            self.cache = None
            return
        self.cache.batch_select_indices(keep)
        lead = int(self.mask.any(0).int().argmax())
        if lead >= 16:
            self.mask = self.mask[:, lead:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]


def cut_at_stop(text: str, stops) -> str:
    """`text` up to the earliest occurrence of any stop string (unchanged when none occurs)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(hits)] if hits else text
