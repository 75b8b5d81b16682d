"""The value model (critic) of PPO: per-token values V(x, y_<t) from a sequence-classification model.

A critic is a `*ForSequenceClassification` model with one output (a reward model's architecture): its score
head, a linear map of the last hidden state, is applied at EVERY position, as TRL's PPOTrainer and
OpenRLHF's critic do; the value of answer token y_t is the head's output at the position that predicts it
(the last token of x, y_<t), aligned with the per-token log-probs of `alignpipe.models.logprobs`. So the value
of the first answer token is the head's output on the prompt alone, and V(x, y_<t) equals the model's own
(pooled) score of the prefix x, y_<t.

A critic folder is either
  * a sequence-classification folder (a reward model, or a critic trained by `train --loss value`), used as
    it is, or
  * a causal LM folder (the policy's base model): its backbone with a NEW value head initialised to zero
    (every value starts at 0, so the same folder gives the same values to build-batches and to train).
"""
from __future__ import annotations

import json
from pathlib import Path

from alignpipe.core.errors import UserError


def _architectures(path: Path) -> list[str]:
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return []


def value_head(model):
    """The score head (a Linear to one output) of a sequence-classification model, through PEFT wrappers."""
    bare = getattr(model, "module", model)  # DistributedDataParallel
    bare = bare.get_base_model() if hasattr(bare, "get_base_model") else bare
    head = getattr(bare, "score", None)
    if head is None:
        raise UserError(f"critic: {type(bare).__name__} has no `score` head; a critic is a *ForSequenceClassification "
                        "model of the Llama family (Llama, Qwen2, Mistral, ...)")
    return head


def load_value_model(path: Path | str, *, dtype: str = "float32", device: str = "cpu", pad_token_id=None,
                     what: str = "critic"):
    """(model, init): a one-output sequence classifier from a critic folder (module doc); init says what was
    loaded: 'sequence-classification' or 'causal LM + zero value head'."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    from alignpipe.core.errors import first_line
    from alignpipe.models.loading import (
        check_model_folder,
        is_adapter,
        load_errors,
        quiet_transformers,
        resolve_device,
        resolve_dtype,
    )

    p = check_model_folder(path, what)
    if is_adapter(p):
        raise UserError(f"{what} {p}: is an adapter; a critic is a full model folder (train it with --merge)")
    fresh = not any(a.endswith("ForSequenceClassification") for a in _architectures(p))
    quiet_transformers()
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # "some weights newly initialised": the new head, zeroed below
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(p), use_safetensors=True, dtype=resolve_dtype(dtype), **({"num_labels": 1} if fresh else {}))
    except load_errors() as e:
        raise UserError(f"{what} {p}: cannot load as a value model ({first_line(e, 160)})")
    finally:
        logging.set_verbosity(verbosity)
    if getattr(model.config, "num_labels", 1) != 1:
        raise UserError(f"{what} {p}: has {model.config.num_labels} labels; a critic has 1")
    head = value_head(model)
    if fresh:
        import torch

        with torch.no_grad():
            for param in head.parameters():
                param.zero_()
    if pad_token_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    return model.to(resolve_device(device)), ("causal LM + zero value head" if fresh else "sequence-classification")


def token_values(model, batch: dict):
    """(values (B, R) float32, mask (B, R) float32) for `alignpipe.models.logprobs.collate`'s batch: the head's
    output at the position before each answer token (module doc); with grad when the model has it."""
    from alignpipe.models.logprobs import to_padded

    ids = batch["input_ids"]
    mask = batch["response_mask"][:, 1:]  # position t predicts (and values) token t + 1
    rows, cols = mask.nonzero(as_tuple=True)
    slots = (mask.long().cumsum(-1) - 1)[rows, cols]
    width = int(mask.sum(-1).max()) if rows.numel() else 1
    captured = []
    handle = value_head(model).register_forward_hook(lambda _m, _a, out: captured.append(out))
    try:
        model(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        handle.remove()
    per_position = captured[-1][..., 0][:, :-1][rows, cols].float()
    shape = (ids.shape[0], width)
    return to_padded(per_position, rows, slots, shape), to_padded(per_position.new_ones(per_position.shape),
                                                                  rows, slots, shape)


def critic_values(model, prompts: list, responses: list, pad_id: int, batch_size: int = 16,
                  device="cpu") -> list[list[float]]:
    """Per-token values of many (prompt ids, response ids) under the critic (no grad), length-sorted batches."""
    from alignpipe.models.logprobs import per_token_over

    return per_token_over(token_values, model, prompts, responses, pad_id, batch_size, device)
