"""Sampling with a static KV cache: every decode step has the same shapes, so on CUDA it can be captured once
(a CUDA graph through `torch.compile(mode="reduce-overhead")`) and replayed, making a step cost one launch
instead of one per kernel. On the CPU the dynamic path (`alignpipe.sampling.engine.Sampler`) stays the default.

`StaticSampler` is a `Sampler` whose decode loop (`_decode`) differs; prompts, prefill, sampling rule,
behaviour log-probs, stop strings and finish reasons are the Sampler's own, so for the same prompts, seeds
and batch its tokens and log-probs are the dynamic path's (tests/test_static_decode.py, on the CPU).

Layout. One buffer set for the whole call: `rows` = batch_size x num_samples decode slots, `width` = the
longest prompt + max_new_tokens key/value positions per layer (transformers' `StaticCache`, preallocated),
an attention mask (rows, width) and positions (rows, 1). Prompts are prefilled in groups of `batch_size`
(the prefill is the Sampler's: one forward per group, its cache repeated num_samples times), their keys
and values copied right-aligned to column `prompt_width`, and the group decodes until every row has
finished (rows that finished keep computing, their outputs ignored: fixed shapes, no cache compaction). A
group smaller than the slots is padded with idle rows. Decode step t writes column prompt_width + t.
No refilling of finished slots (the dynamic path's continuous batching): on CUDA the step is cheap enough
that more rows in flight pay for the idle ones; on the CPU, where idle rows cost their full arithmetic, the
dynamic path is faster.

The CUDA-graph capture itself is not here yet: no CUDA-only code path lands before it has run on a GPU. The
fixed-shape step (`_step`) is what it will wrap; `make bench-gpu` measures this path against the dynamic one
and transformers' generate, and tests/test_static_decode.py has a `gpu` test of it on CUDA.
"""
from __future__ import annotations

from alignpipe.sampling.engine import Sampler


def supports_static(model) -> bool:
    """Whether `model` can decode from a static cache here: SDPA attention (a 4D boolean mask is passed as is)
    and a plain decoder config (transformers builds the StaticCache from it)."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == "sdpa" and hasattr(config, "num_hidden_layers")


class StaticSampler(Sampler):
    """A Sampler decoding with a preallocated KV cache of fixed shape and a fixed-shape decode step."""

    def __init__(self, model, tokenizer, params, eos_ids=None):
        super().__init__(model, tokenizer, params, eos_ids)
        if not supports_static(model):
            raise ValueError("the static KV cache needs a model with SDPA attention")
        self.cache = self._mask = None
        self._step_fn = self._step

    # -- the fixed-shape buffers -------------------------------------------------------------------------
    def _allocate(self, rows: int, prompt_width: int, dtype):
        """The static cache (rows, kv heads, prompt_width + max_new_tokens, head dim) and the mask buffer."""
        import torch
        from transformers import StaticCache

        config = self.model.config.get_text_config(decoder=True)
        width = prompt_width + self.params.max_new_tokens
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.cache = StaticCache(config=config, max_cache_len=width)
        self.cache.early_initialization(rows, heads, head_dim, dtype, self.device)
        self._mask = torch.zeros((rows, width), dtype=torch.long, device=self.device)

    def _load(self, cache, mask, prompt_width: int) -> None:
        """Copy a prefilled group (r rows, P columns) right-aligned to column `prompt_width`; idle rows beyond r
        attend to one stale position (finite outputs, ignored)."""
        r, p = mask.shape
        self._mask.zero_()
        self._mask[:r, prompt_width - p: prompt_width] = mask
        self._mask[r:, prompt_width - 1] = 1
        for static, layer in zip(self.cache.layers, cache.layers):
            static.keys[:r, :, prompt_width - p: prompt_width] = layer.keys
            static.values[:r, :, prompt_width - p: prompt_width] = layer.values
            static.cumulative_length.fill_(prompt_width)

    def _step(self, ids, mask, pos):
        """One decode step of fixed shapes: ids (rows, 1), mask (rows, width), pos (rows, 1) -> logits (rows, V)."""
        kwargs = {"input_ids": ids, "attention_mask": mask[:, None, None, :].bool(), "position_ids": pos,
                  "use_cache": True, self.cache_arg: self.cache}
        return self.model(**kwargs).logits[:, -1].float()

    # -- the decode loop ---------------------------------------------------------------------------------
    def _decode(self, prompts: list[list[int]], uniforms, slots: int):
        """As `Sampler._decode`: token ids, per-token log-probs, lengths and stopped-by-string flags, rows
        prompt-major; groups of slots // num_samples prompts decode in turn through the static buffers."""
        import torch

        n, T, dev = self.params.num_samples, self.params.max_new_tokens, self.device
        total, group = len(prompts) * n, max(1, slots // n)
        rows_per_step = min(group, len(prompts)) * n
        tokens = torch.full((total, T), self.pad_id, dtype=torch.long, device=dev)
        logps = torch.zeros((total, T), dtype=torch.float32, device=dev)
        lengths = torch.full((total,), T, dtype=torch.long, device=dev)
        by_stop = torch.zeros(total, dtype=torch.bool, device=dev)
        prompt_width = max(len(p) for p in prompts)
        for start in range(0, len(prompts), group):
            logits, cache, mask, pos = self._prefill(prompts[start: start + group])
            if self.cache is None or self._mask.shape != (rows_per_step, prompt_width + T):
                self._allocate(rows_per_step, prompt_width, cache.layers[0].keys.dtype)
            self._load(cache, mask, prompt_width)
            r = logits.shape[0]
            rows = torch.arange(start * n, start * n + r, device=dev)
            pad = rows_per_step - r
            logits = torch.cat([logits, logits[:1].expand(pad, -1)]) if pad else logits
            pos = torch.cat([pos, pos[:1].expand(pad, -1)]) if pad else pos
            self._group(rows, logits, pos, prompt_width, uniforms, tokens, logps, lengths, by_stop)
        return tokens, logps, lengths, by_stop

    def _group(self, rows, logits, pos, prompt_width, uniforms, tokens, logps, lengths, by_stop) -> None:
        """Decode one loaded group until all its real rows have finished (or max_new_tokens)."""
        import torch

        T, r = self.params.max_new_tokens, rows.numel()
        done = torch.zeros(r, dtype=torch.bool, device=self.device)
        for t in range(T):
            nxt = self._pick(logits, torch.cat([uniforms[rows, t], uniforms.new_zeros(logits.shape[0] - r)]))
            live = (~done).nonzero().squeeze(1)
            mine = nxt[:r]
            tokens[rows[live], t] = mine[live]
            logps[rows[live], t] = (logits[:r].gather(1, mine[:, None]).squeeze(1)
                                    - torch.logsumexp(logits[:r], -1))[live]
            finished = torch.isin(mine, self.eos)
            if self.stop is not None:
                stopped = self._stopped(tokens, rows, torch.full_like(rows, t)) & ~finished
                by_stop[rows[live]] = stopped[live]
                finished |= stopped
            ending = finished & ~done
            lengths[rows[ending]] = t + 1
            done |= finished
            if t == T - 1 or bool(done.all()):
                return
            self._mask[:, prompt_width + t] = 1
            logits = self._step_fn(nxt[:, None], self._mask, pos)
            pos = pos + 1


def static_sampler_or_none(model, tokenizer, params, eos_ids=None, *, kv_cache: str = "auto"):
    """The sampler for `--kv-cache static|dynamic|auto` (auto: static on CUDA for SDPA models, else dynamic):
    a StaticSampler, or None for the dynamic `Sampler`."""
    device = next(model.parameters()).device
    if kv_cache not in ("auto", "static", "dynamic"):
        raise ValueError(f"--kv-cache '{kv_cache}': unknown (known: auto, static, dynamic)")
    if kv_cache == "dynamic" or (kv_cache == "auto" and (device.type != "cuda" or not supports_static(model))):
        return None
    return StaticSampler(model, tokenizer, params, eos_ids)
