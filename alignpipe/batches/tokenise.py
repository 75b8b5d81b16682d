"""Tokenisation with the truncation policy, mixing of several inputs, and length-grouped batch composition.

Token layout (what `train` and `alignpipe.models.logprobs.collate` read): prompt ids and response ids are stored
separately and unpadded, so the loss mask is structural: `collate` marks only response tokens as targets.

- The prompt is rendered with `alignpipe.models.prompting.render_prompt` (chat template for conversations, and for
  plain prompts when the tokenizer has one unless `use_chat_template=False`) and encoded without adding
  special tokens (the template carries its own).
- A response is its token ids exactly as sampled when the task keeps them (`_ids1`: the group task of online
  RL, whose per-token behaviour log-probs belong to those tokens), else `encode(text) + [end]`. `end` is the token that closes an assistant turn in the chat
  template (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3) when the prompt went through the template,
  else the EOS token. One token only: it is where generation stops (chat models list it among their EOS ids),
  so the stored response matches what `generate` sampled; text the template puts after it ("\n") is
  never generated and is not trained on. A generation cut at max_new_tokens (`finish_reason` 'length',
  known for `generations` inputs) did not end, and gets no end token.
- Truncation: first the prompt from the left to `max_prompt_length`; then, if prompt + response exceeds
  `max_length`, the response from the right (each response of a pair on its own, against the same
  prompt). A truncated response loses its end token. `max_prompt_length < max_length`, so every response
  keeps at least one token.

Batching: shuffle with the seed; cut the shuffled order into chunks of `group_size` batches; sort each chunk
by length and cut it into batches (a fixed number of examples, or as many as fit a token budget on the
padded size); shuffle the batch order and put the batch with the most padded tokens first, so an
out-of-memory shows at step 0. Padded size of a batch = (sequences in it) x (longest sequence), with
2 sequences per pair example (chosen and rejected go through the model in one forward).
"""
from __future__ import annotations

import json
import random
from collections import Counter

from alignpipe.core.errors import UserError
from alignpipe.models.prompting import encode, render_prompt

_SENTINEL = "ALIGNPIPE-RESPONSE-SENTINEL"


# ---------------------------------------------------------------------------------------- tokenisation
def turn_end_id(tokenizer) -> int | None:
    """The special token the chat template closes an assistant turn with, or None (no template, or the
    template puts no special token right after the assistant's text)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False)
    except Exception:  # noqa: BLE001 -- a template may refuse a trailing assistant turn
        return None
    if _SENTINEL not in text:
        return None
    ids = encode(tokenizer, text.split(_SENTINEL, 1)[1])
    return ids[0] if ids and ids[0] in set(tokenizer.all_special_ids) else None


def truncate(prompt: list[int], responses: list[list[int]], max_length: int, max_prompt_length: int):
    """(prompt, responses, prompt_truncated, [response_truncated...]) under the truncation policy."""
    cut_prompt = len(prompt) > max_prompt_length
    if cut_prompt:
        prompt = prompt[len(prompt) - max_prompt_length:]
    budget = max_length - len(prompt)
    cut = [len(r) > budget for r in responses]
    return prompt, [r[:budget] for r in responses], cut_prompt, cut


def check_lengths(max_length: int, max_prompt_length: int) -> None:
    if max_prompt_length < 1 or max_length <= max_prompt_length:
        raise UserError(f"--max-prompt-length {max_prompt_length} must be >= 1 and below --max-length "
                        f"{max_length} (room for at least one response token)")


def tokenise(examples: list[dict], tokenizer, *, num_responses: int, max_length: int, max_prompt_length: int,
             use_chat_template: bool, counts: Counter) -> list[dict]:
    """Add the rendered `prompt`, `prompt_input_ids` and `response{k}_input_ids` to each example (in place)."""
    turn_end, eos = turn_end_id(tokenizer), tokenizer.eos_token_id
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if eos is None and turn_end is None:
        raise UserError("tokenizer: has no EOS token to end responses with; add one to its tokenizer_config.json")
    cache: dict[tuple, tuple[str, list[int], int]] = {}
    for ex in examples:
        key = (ex["prompt"], json.dumps(ex["messages"]))
        if key not in cache:
            text = render_prompt(tokenizer, ex["prompt"], ex["messages"], ex.get("_at", "prompt"), use_chat_template)
            chat = bool(ex["messages"]) or (has_template and use_chat_template)
            cache[key] = (text, encode(tokenizer, text), turn_end if chat and turn_end is not None else eos)
        text, prompt_ids, end = cache[key]
        responses = [list(ex[f"_ids{k}"]) if ex.get(f"_ids{k}") is not None  # as sampled (group task)
                     else encode(tokenizer, ex[f"response{k}"]) + ([] if ex.get(f"_open{k}") else [end])
                     for k in range(1, num_responses + 1)]
        prompt_ids, responses, cut_prompt, cut = truncate(prompt_ids, responses, max_length, max_prompt_length)
        counts["prompts_truncated"] += cut_prompt
        counts["responses_truncated"] += sum(cut)
        ex["prompt"], ex["prompt_input_ids"] = text, prompt_ids
        for k, ids in enumerate(responses, 1):
            ex[f"response{k}_input_ids"] = ids
    return examples


def sequence_lengths(ex: dict, num_responses: int) -> list[int]:
    """Length of each prompt+response sequence of an example."""
    p = len(ex["prompt_input_ids"])
    return [p + len(ex[f"response{k}_input_ids"]) for k in range(1, num_responses + 1)]


# ---------------------------------------------------------------------------------------------- mixing
def parse_mix(spec: str | None, num_inputs: int) -> list[float] | None:
    if spec is None:
        return None
    try:
        props = [float(x) for x in spec.split(",")]
    except ValueError:
        props = []
    if len(props) != num_inputs or any(not p >= 0 for p in props) or sum(props) <= 0:
        raise UserError(f"--mix '{spec}': expected {num_inputs} comma-separated proportions >= 0, one per input, "
                        f"with a positive sum (e.g. {','.join(['0.5'] + ['0.25'] * (num_inputs - 1))})")
    return [p / sum(props) for p in props]


def mix_counts(sizes: list[int], props: list[float], total: int | None) -> list[int]:
    """Examples to take from each input: `total` split by the proportions (largest remainder). The default
    total is the largest that needs no input more than once: min over inputs of size / proportion."""
    if total is None:
        total = int(min(n / p for n, p in zip(sizes, props) if p > 0) + 1e-9)
    exact = [total * p for p in props]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(props)), key=lambda k: (counts[k] - exact[k], k))
    for k in by_remainder[: total - sum(counts)]:
        counts[k] += 1
    return counts


def mix(parts: list[list[dict]], props: list[float] | None, total: int | None, seed: int):
    """One list of examples from several inputs and the number taken from each.

    Without proportions every example of every input is used once. With them, input k gives count_k
    examples: a seeded shuffle of it, repeated whole as often as needed (only when count_k exceeds its
    size: sampling without replacement where possible). Example ids get `@k` (input k) when there are
    several inputs, and `#rJ` on the J-th repeat, so they stay unique.
    """
    if props is None:
        counts = [len(p) for p in parts]
    else:
        empty = [k + 1 for k, (p, part) in enumerate(zip(props, parts)) if p > 0 and not part]
        if empty:
            raise UserError(f"--mix: input {empty[0]} has no examples for this task, so it cannot give a proportion")
        counts = mix_counts([len(p) for p in parts], props, total)
    out = []
    for k, (examples, want) in enumerate(zip(parts, counts)):
        order = list(range(len(examples)))
        random.Random(f"mix:{seed}:{k}").shuffle(order)
        for j in range(want):
            ex = dict(examples[order[j % len(order)]])
            ex["example_id"] += (f"@{k}" if len(parts) > 1 else "") + (f"#r{j // len(order)}" if j >= len(order) else "")
            out.append(ex)
    return out, counts


# -------------------------------------------------------------------------------------------- batching
def padded_tokens(batch: list[int], lengths: list[list[int]]) -> int:
    return sum(len(lengths[i]) for i in batch) * max(max(lengths[i]) for i in batch)


def padding_fraction(batches: list[list[int]], lengths: list[list[int]]) -> float:
    """Share of pad tokens over all batches when each batch is padded to its longest sequence."""
    real = sum(sum(lengths[i]) for b in batches for i in b)
    padded = sum(padded_tokens(b, lengths) for b in batches)
    return 1.0 - real / padded if padded else 0.0


def _cut(order: list[int], lengths: list[list[int]], batch_size: int | None, max_tokens: int | None):
    if batch_size:
        return [order[s: s + batch_size] for s in range(0, len(order), batch_size)]
    batches, cur = [], []
    for i in order:  # greedy: close the batch when the next example would pass the budget
        if cur and padded_tokens(cur + [i], lengths) > max_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    return batches + ([cur] if cur else [])


def make_batches(lengths: list[list[int]], *, batch_size: int | None = None, max_tokens: int | None = None,
                 group_by_length: bool = True, group_size: int = 50, seed: int = 0) -> list[list[int]]:
    """Batches (lists of example indices) covering every example once; see the module doc.

    A token-budget batch holds at least one example, so an example longer than the budget is alone.
    """
    n = len(lengths)
    order = list(range(n))
    rng = random.Random(f"batches:{seed}")
    rng.shuffle(order)
    if not group_by_length:
        return _cut(order, lengths, batch_size, max_tokens)
    if batch_size:
        per_batch = batch_size
    else:
        mean_padded = sum(len(s) * max(s) for s in lengths) / max(n, 1)
        per_batch = max(1, int(max_tokens // max(mean_padded, 1)))
    chunk = per_batch * group_size
    batches = []
    for s in range(0, n, chunk):
        part = sorted(order[s: s + chunk], key=lambda i: -max(lengths[i]))
        batches += _cut(part, lengths, batch_size, max_tokens)
    rng.shuffle(batches)
    if batches:
        first = max(range(len(batches)), key=lambda b: padded_tokens(batches[b], lengths))
        batches.insert(0, batches.pop(first))
    return batches


def random_batches(sizes: list[int], seed: int) -> list[list[int]]:
    """The baseline: batches of the same sizes over a random permutation of the examples."""
    order = list(range(sum(sizes)))
    random.Random(f"random-batches:{seed}").shuffle(order)
    out, s = [], 0
    for size in sizes:
        out.append(order[s: s + size])
        s += size
    return out
