"""Rendering prompts for a model: plain text as is, conversations through the tokenizer's chat template.
Shared by generate, annotate (judges), reweight (importance) and build-batches, so a prompt is rendered
the same way everywhere."""
from __future__ import annotations

from alignpipe.core.errors import UserError, first_line


def render_prompt(tokenizer, prompt: str, messages: list | None, where: str = "prompt",
                  use_chat_template: bool = True) -> str:
    """The text the model sees before its answer.

    Conversations (non-empty `messages`) need the tokenizer's chat template and end with the generation
    prompt. Plain prompts use the chat template too when the tokenizer has one and `use_chat_template`
    (instruction-tuned models expect it); otherwise the raw text.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if messages:
        if not has_template:
            raise UserError(f"{where}: conversational prompt but the tokenizer has no chat template; "
                            f"pass --chat-template FILE (a Jinja template)")
        return _apply(tokenizer, list(messages), where)
    if has_template and use_chat_template:
        return _apply(tokenizer, [{"role": "user", "content": prompt}], where)
    return prompt


def _apply(tokenizer, messages: list, where: str) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except (TemplateError, TypeError, KeyError) as e:  # e.g. the template's own raise_exception
        raise UserError(f"{where}: the chat template failed to render ({first_line(e)})")


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of already-rendered text (templates carry their own special tokens)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


_SPECIAL = r"<\|[^<>|]*\|>|</?s>|<(?:start|end)_of_turn>|<bos>|<eos>|\[/?INST\]|<</?SYS>>"
_ROLES = ("system", "user", "assistant", "model")


def last_user_turn(rendered: str) -> str:
    """The question of a prompt rendered through a chat template (ChatML, Llama 3, Gemma, Mistral, Phi, ...): the
    last stretch of text between the template's special tokens, less a leading role name; the generation prompt
    and a system prompt before the question are left out. Plain text comes back as it is."""
    import re

    parts = [p.strip() for p in re.split(_SPECIAL, rendered)]
    for part in reversed(parts):
        role, _, rest = part.partition("\n")
        text = rest.strip() if role.strip() in _ROLES else part
        if text and text not in _ROLES:
            return text
    return rendered
