"""Local causal-LM judges, read from next-token log-probabilities (never from sampled text).

The filled template is sent as one user message through the judge tokenizer's chat template (when it has
one) with the generation prompt, and one forward gives the logits of the token the answer starts with.

Pairwise (the OAIF annotator): P(first better) = softmax over the logits of the two answer tokens
(`labels`, default "1"/"2"). With `swap=true` (default) the pair is judged in both orders and
    P(response1 > response2) = 1/2 [P_12 + (1 - P_21)]
(P_12: response1 shown first; P_21: response2 shown first), which cancels position bias; the
`preference_12` / `preference_21` raw columns keep both orders. Swapping a pair gives exactly 1 - P
(see `alignpipe.feedback.annotators.swap_average`).

Pointwise: p(s) = softmax over the logits of the score tokens "1".."scale"; score = sum_s s * p(s).

Batches are formed by content (distinct texts sorted by length, then text), never by the order of the
queries, so judging (b, a) runs the very same forwards as (a, b) and gives exactly 1 - P. They are
left-padded with explicit position ids, and only the last position's logits are computed.
A rendered prompt longer than the judge's context is an abstention, not a crash.
"""
from __future__ import annotations

from pathlib import Path

from alignpipe.core.errors import UserError
from alignpipe.feedback.annotators import (
    Query,
    Verdict,
    fill,
    load_template,
    parse_labels,
    prompt_text,
    quantise,
    swap_average,
)


class LMJudge:
    """Shared machinery: model, tokenizer, template, answer tokens, batched next-token logits."""

    def __init__(self, spec, runtime, mode: str, labels: list[str]):
        from alignpipe.models.loading import load_causal_lm, load_tokenizer, model_fingerprint

        self.name, self.path, self.mode = spec.identity(), Path(spec.arg), mode
        self.template, self.template_file = load_template(spec.options["template"], mode)
        self.model = load_causal_lm(self.path, dtype=runtime.dtype, device=runtime.device, what="judge")
        self.model.eval()
        self.tokenizer = load_tokenizer(self.path, padding_side="left")
        self.device = next(self.model.parameters()).device
        self.batch_size, self.labels = runtime.batch_size, labels
        self.label_ids = [self._single_token(label, spec.text) for label in labels]
        self.max_length = getattr(self.model.config, "max_position_embeddings", None) or 10**9
        self.fingerprint = model_fingerprint(self.path)
        self.inputs = [self.path, self.template_file]

    def _single_token(self, label: str, spec_text: str) -> int:
        ids = self.tokenizer(label, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise UserError(f"--annotator '{spec_text}': answer '{label}' is {len(ids)} tokens for the judge "
                            f"tokenizer {self.path}; answers must be single tokens")
        return ids[0]

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.mode, "model": str(self.path),
                "fingerprint": self.fingerprint, "template_file": str(self.template_file),
                "template": self.template, "answers": self.labels}

    def encode(self, text: str) -> list[int]:
        from alignpipe.models.prompting import encode, render_prompt

        return encode(self.tokenizer, render_prompt(self.tokenizer, text, None, where=str(self.path)))

    def answer_logps(self, texts: list[str]) -> list[list[float] | None]:
        """Per text: log-softmax over the answer tokens' next-token logits, or None when it is too long."""
        import torch

        seqs = {t: self.encode(t) for t in texts}  # each distinct text once
        fits = [t for t, s in seqs.items() if len(s) <= self.max_length]
        order = sorted(fits, key=lambda t: (len(seqs[t]), t))
        found = {}
        with torch.inference_mode():
            for s in range(0, len(order), self.batch_size):
                batch = order[s: s + self.batch_size]
                logits = self._last_logits([seqs[t] for t in batch])[:, self.label_ids].float()
                found.update(zip(batch, torch.log_softmax(logits, dim=-1).tolist()))
        return [found.get(t) for t in texts]

    def _last_logits(self, seqs: list[list[int]]):
        import torch

        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, T - len(s):] = torch.tensor(s)
            mask[i, T - len(s):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        kw = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
              "position_ids": pos.to(self.device), "use_cache": False}
        try:
            return self.model(**kw, logits_to_keep=1).logits[:, -1]
        except TypeError:  # architectures without logits_to_keep
            return self.model(**kw).logits[:, -1]

    def too_long(self) -> Verdict:
        return Verdict(abstained=True, reason=f"judge prompt longer than its {self.max_length} tokens")


class PairwiseJudge(LMJudge):
    pairwise = True

    def __init__(self, spec, runtime):
        labels = list(parse_labels(spec.options["labels"], f"--annotator '{spec.text}'"))
        super().__init__(spec, runtime, "pairwise", labels)
        self.swap = spec.options["swap"]

    def describe(self) -> dict:
        return {**super().describe(), "swap": self.swap}

    def render(self, q: Query, first: str, second: str) -> str:
        return fill(self.template, prompt=prompt_text(q.prompt, q.messages), response_a=first,
                    response_b=second, label_a=self.labels[0], label_b=self.labels[1])

    def compare(self, queries: list[Query]) -> list[Verdict]:
        import math

        texts = [self.render(q, q.response, q.response2) for q in queries]
        if self.swap:
            texts += [self.render(q, q.response2, q.response) for q in queries]
        logps = self.answer_logps(texts)
        n, out = len(queries), []
        for i in range(n):
            ab, ba = logps[i], (logps[n + i] if self.swap else None)
            if ab is None or (self.swap and ba is None):
                out.append(self.too_long())
                continue
            p12 = quantise(math.exp(ab[0]))
            p21 = quantise(math.exp(ba[0])) if self.swap else None
            pref = swap_average(p12, p21) if self.swap else p12
            out.append(Verdict(preference=pref, p12=p12, p21=p21))
        return out


class PointwiseJudge(LMJudge):
    pairwise = False

    def __init__(self, spec, runtime):
        scale = spec.options["scale"]
        if not 2 <= scale <= 9:
            raise UserError(f"--annotator '{spec.text}': scale must be in 2..9 (score tokens 1..scale are "
                            f"single digits), found {scale}")
        super().__init__(spec, runtime, "pointwise", [str(s) for s in range(1, scale + 1)])
        self.scale = scale

    def score(self, queries: list[Query]) -> list[Verdict]:
        import math

        texts = [fill(self.template, prompt=prompt_text(q.prompt, q.messages), response=q.response,
                      scale=self.scale) for q in queries]
        out = []
        for row in self.answer_logps(texts):
            if row is None:
                out.append(self.too_long())
            else:
                out.append(Verdict(score=sum((s + 1) * math.exp(lp) for s, lp in enumerate(row))))
        return out


def build_pairwise(spec, runtime) -> PairwiseJudge:
    return PairwiseJudge(spec, runtime)


def build_pointwise(spec, runtime) -> PointwiseJudge:
    return PointwiseJudge(spec, runtime)
