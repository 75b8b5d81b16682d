"""Reward-model annotator: a local `AutoModelForSequenceClassification` folder (one label) scores each
(prompt, response); the score is its logit.

Rendering: with a chat template, the conversation (the prompt's messages, or [user: prompt]) plus
[assistant: response], rendered by the template (its special tokens included, none added); without one,
`prompt + "\\n" + response` tokenised with the tokenizer's own special tokens. Inputs longer than the model's
maximum keep their end (the response). Batches are length-sorted and right-padded, so each row's logit is
exactly what a lone forward of that row gives (up to float rounding).
"""
from __future__ import annotations

from pathlib import Path

from alignpipe.feedback.annotators import Query, Verdict


def render(tokenizer, prompt: str, messages: list, response: str) -> tuple[str, bool]:
    """(text, add_special_tokens) the reward model sees for one response."""
    if getattr(tokenizer, "chat_template", None):
        chat = list(messages) if messages else [{"role": "user", "content": prompt}]
        chat = chat + [{"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(chat, tokenize=False), False
    return prompt + "\n" + response, True


class RewardModel:
    pairwise = False

    def __init__(self, path: Path, name: str, runtime, max_length: int = 0):
        from alignpipe.models.loading import load_reward_model, load_tokenizer, model_fingerprint

        self.name, self.path, self.batch_size = name, Path(path), runtime.batch_size
        self.model = load_reward_model(path, dtype=runtime.dtype, device=runtime.device)
        self.tokenizer = load_tokenizer(path, padding_side="right")
        if self.model.config.pad_token_id is None:  # needed to find each row's last token in a batch
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        limit = getattr(self.model.config, "max_position_embeddings", None) or 10**9
        self.max_length = min(max_length or limit, limit)
        self.device = next(self.model.parameters()).device
        self.fingerprint = model_fingerprint(path)
        self.inputs = [self.path]

    def describe(self) -> dict:
        return {"name": self.name, "kind": "pointwise", "model": str(self.path),
                "fingerprint": self.fingerprint, "max_length": self.max_length,
                "chat_template": bool(getattr(self.tokenizer, "chat_template", None))}

    def encode(self, q: Query) -> list[int]:
        text, special = render(self.tokenizer, q.prompt, q.messages, q.response)
        ids = self.tokenizer(text, add_special_tokens=special)["input_ids"]
        return ids[-self.max_length:]

    def score(self, queries: list[Query]) -> list[Verdict]:
        import torch

        seqs = [self.encode(q) for q in queries]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        scores = [0.0] * len(seqs)
        with torch.inference_mode():
            for s in range(0, len(order), self.batch_size):
                idx = order[s: s + self.batch_size]
                for i, v in zip(idx, self._forward([seqs[i] for i in idx])):
                    scores[i] = v
        return [Verdict(score=v) for v in scores]

    def _forward(self, seqs: list[list[int]]) -> list[float]:
        import torch

        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.model.config.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        return [float(v) for v in out.logits[:, 0].float().tolist()]


def build(spec, runtime) -> RewardModel:
    return RewardModel(Path(spec.arg), spec.identity(), runtime, spec.options["max_length"])
