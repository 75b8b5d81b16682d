"""Which models a command will load, read from its argv, so that the fork server loads them before it forks
(the child then shares them copy-on-write, and they stay for the next command).

A slot is an option of a stage whose value names a model folder, directly (`--policy DIR`) or inside a
component spec (`-a reward-model:DIR`, `-s importance:policy=DIR`); a PEFT adapter stands for its base. The
first time a stage runs, every slot is preloaded as its config's architecture at the command's --dtype
(float32 when none): a guess. Each child reports what the stage really asked for (class, folder, dtype), and
from then on the server preloads exactly those slots with those classes and dtypes. A wrong guess costs a
load, never a wrong model: the cache key holds class, folder, fingerprint and dtype.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from alignpipe.core.errors import UserError

UNSAFE = ("--trust-remote-code", "--allow-pickle")  # never loaded in the server
OUTPUTS = ("--out", "-o", "--continue-from")  # folders a stage writes or reads state from, not models it loads


def stage_of(argv: list[str]) -> str | None:
    return next((a for a in argv[1:] if not a.startswith("-")), None)


def model_folder(piece: str) -> Path | None:
    """The folder whose weights loading `piece` reads (an adapter's base), or None when it names no model."""
    from alignpipe.data import hub
    from alignpipe.models.loading import adapter_base, is_adapter, local_folder

    if not piece or (not Path(piece).exists() and hub.split_id(piece) is None):
        return None
    try:
        folder = local_folder(piece)
        if is_adapter(folder):
            folder = local_folder(adapter_base(folder))
    except (UserError, OSError, ValueError):
        return None
    return folder.resolve() if (folder / "config.json").is_file() else None


def slots(argv: list[str]) -> list[tuple[str, Path]]:
    """(option, model folder) for every option value of argv that names a model."""
    found, option = [], None
    for token in argv[1:]:
        if token.startswith("-"):
            option, _, value = token.partition("=")
            if not value:
                continue
        else:
            value = token
        if option is None or option in OUTPUTS:
            option = None
            continue
        for piece in dict.fromkeys([value, *re.split(r"[,:=]", value)]):
            folder = model_folder(piece)
            if folder is not None and (option, folder) not in found:
                found.append((option, folder))
        option = None
    return found


def architecture_class(folder: Path) -> str | None:
    try:
        arch = (json.loads((folder / "config.json").read_text()).get("architectures") or [""])[0]
    except (OSError, ValueError):
        return None
    if arch.endswith("ForCausalLM"):
        return "AutoModelForCausalLM"
    if arch.endswith("ForSequenceClassification"):
        return "AutoModelForSequenceClassification"
    return None


def option_value(argv: list[str], name: str) -> str | None:
    for i, token in enumerate(argv):
        if token == name and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith(name + "="):
            return token.split("=", 1)[1]
    return None


class Profiles:
    """What each stage's slots really loaded: stage -> option -> {(class, dtype)}."""

    def __init__(self):
        self.by_stage: dict[str, dict[str, set]] = {}

    def plan(self, argv: list[str]) -> list[tuple[str, Path, str]]:
        """(class, folder, dtype) to preload before running argv."""
        stage = stage_of(argv)
        if stage is None or any(u in argv for u in UNSAFE):
            return []
        learned = self.by_stage.get(stage)
        plan = []
        for option, folder in slots(argv):
            if learned is None:
                cls = architecture_class(folder)
                wanted = {(cls, option_value(argv, "--dtype") or "float32")} if cls else set()
            else:
                wanted = learned.get(option, set())
            plan += [(cls, folder, dtype) for cls, dtype in sorted(wanted) if (cls, folder, dtype) not in plan]
        return plan

    def learn(self, argv: list[str], requests: list[dict]) -> None:
        stage = stage_of(argv)
        if stage is None or any(u in argv for u in UNSAFE):
            return
        learned = self.by_stage.setdefault(stage, {})
        for option, folder in slots(argv):
            for r in requests:
                if Path(r["folder"]) == folder:
                    learned.setdefault(option, set()).add((r["class"], r["dtype"]))
