"""Secrets: which names and values are secret, and their scrubbing from everything alignpipe writes or prints
(manifests, logs, tracker configs, recorded command lines). API keys come from the environment only."""
from __future__ import annotations

import os
import re

_SECRET_KEYS = re.compile(r"(api[_-]?key|secret|passw(or)?d|credential|(^|[_-])token$)", re.IGNORECASE)
_NOT_SECRET = re.compile(r"(^|[_-])(pad|eos|bos|unk|sep|cls|mask|end|start|stop)[_-]token$", re.IGNORECASE)


def secret_name(name: str) -> bool:
    """A variable, key or option name that holds a secret: OPENAI_API_KEY, HF_TOKEN, --api-key, password, ...
    Not `tokenizer`, `max_new_tokens` or `pad_token`."""
    name = str(name).lstrip("-")
    return bool(_SECRET_KEYS.search(name)) and not _NOT_SECRET.search(name)
_REGISTERED: set[str] = set()  # secrets read from variables with other names (an annotator's key_env)


def register_secret(value: str | None) -> None:
    """Scrub `value` too from everything written or printed (e.g. the API key named by key_env=)."""
    if value and len(value) >= 6:
        _REGISTERED.add(value)


def secret_values() -> list[str]:
    """Values of environment variables that look like secrets, and registered ones, longest first."""
    found = {v for k, v in os.environ.items() if secret_name(k) and len(v) >= 6} | _REGISTERED
    return sorted(found, key=len, reverse=True)


def redact(obj):
    """Replace secret values (and values under secret-looking keys) by '***' throughout a JSON-able object."""
    secrets = secret_values()
    if isinstance(obj, dict):
        return {k: ("***" if secret_name(k) and isinstance(v, str) and v and not str(k).endswith("_env")
                    else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        for s in secrets:
            obj = obj.replace(s, "***")
    return obj


_KEY_LIKE = re.compile(r"\b(sk-[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{16,}|gh[pousr]_[A-Za-z0-9]{20,}|xox[abp]-[A-Za-z0-9-]{10,}"
                       r"|AKIA[0-9A-Z]{16}|eyJ[A-Za-z0-9_-]{20,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,})")
_OPTION = re.compile(r"^(--?[A-Za-z][\w-]*)(=.*)?$")
_PAIR = re.compile(r"(?<![\w-])([A-Za-z][\w-]*)=([^,\s]+)")


def scrub_argv(argv: list[str]) -> list[str]:
    """argv with secrets replaced by '***': known secret values (environment, registered), strings shaped like
    API keys or tokens, the value after a secret-named option (`--api-key X`, `--token=X`) and secret-named
    `key=value` pairs inside specs (`http:URL,api_key=X`). Names ending in `_env` (the variable holding a key)
    stay."""
    out, hide_next = [], False
    for arg in map(str, argv):
        if hide_next:
            out.append("***")
            hide_next = False
            continue
        opt = _OPTION.match(arg)
        if opt and secret_name(opt.group(1)):
            if opt.group(2) is None:
                hide_next = True
                out.append(arg)
            else:
                out.append(opt.group(1) + "=***")
            continue
        arg = _PAIR.sub(lambda m: f"{m.group(1)}=***" if secret_name(m.group(1)) else m.group(0), arg)
        out.append(_KEY_LIKE.sub("***", redact(arg)))
    return out
