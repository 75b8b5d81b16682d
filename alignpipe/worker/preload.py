"""Which models a command will load, read from its argv, so that the fork server loads them before it forks
(the child then shares them copy-on-write, and they stay for the next command).

A slot is an option of a stage whose value names a model folder, directly (`--policy DIR`) or inside a
component spec (`-a reward-model:DIR`, `-s importance:policy=DIR`); a PEFT adapter folder is a slot of its own
(a resident PEFT model over its base, see cache.py). The first time a stage runs, every slot is preloaded as
its config's architecture (an adapter: trainable as train's --policy only) at the command's --dtype
(float32 when none): a guess. Each child reports what the stage really asked for (class, folder, dtype,
trainable), and from then on the server preloads exactly those slots with those classes and dtypes. A wrong guess costs a
load, never a wrong model: the cache key holds class, folder, fingerprint and dtype.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from alignpipe.core.errors import UserError
from alignpipe.worker.cache import ADAPTER

UNSAFE = ("--trust-remote-code", "--allow-pickle")  # never loaded in the server
OUTPUTS = ("--out", "-o", "--continue-from")  # folders a stage writes or reads state from, not models it loads


def stage_of(argv: list[str]) -> str | None:
    return next((a for a in argv[1:] if not a.startswith("-")), None)


def model_folder(piece: str) -> Path | None:
    """The model or adapter folder `piece` names (an adapter whose base is a model folder), or None."""
    from alignpipe.data import hub
    from alignpipe.models.loading import adapter_base, is_adapter, local_folder

    if not piece or (not Path(piece).exists() and hub.split_id(piece) is None):
        return None
    try:
        folder = local_folder(piece)
        model = local_folder(adapter_base(folder)) if is_adapter(folder) else folder
    except (UserError, OSError, ValueError):
        return None
    return folder.resolve() if (model / "config.json").is_file() else None


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
    if (folder / "adapter_config.json").is_file():
        return ADAPTER
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
    """What each stage's slots really loaded: stage -> option -> {(class, dtype, trainable)}."""

    def __init__(self):
        self.by_stage: dict[str, dict[str, set]] = {}

    def plan(self, argv: list[str]) -> list[tuple[str, Path, str, bool]]:
        """(class, folder, dtype, trainable) to preload before running argv."""
        stage = stage_of(argv)
        if stage is None or any(u in argv for u in UNSAFE):
            return []
        learned = self.by_stage.get(stage)
        plan = []
        for option, folder in slots(argv):
            cls = architecture_class(folder)
            # what this slot loaded before (nothing: a tokenizer), if it named the same kind of folder; a guess
            # when it is new, or named a model before and an adapter now (or the reverse)
            before = None if learned is None else learned.get(option)
            wanted = {w for w in before or () if (w[0] == ADAPTER) == (cls == ADAPTER)}
            if before is None or (before and not wanted):
                trainable = cls == ADAPTER and stage == "train" and option == "--policy"  # train's own adapter
                wanted = {(cls, option_value(argv, "--dtype") or "float32", trainable)} if cls else set()
            plan += [(cls, folder, dtype, trainable) for cls, dtype, trainable in sorted(wanted)
                     if (cls, folder, dtype, trainable) not in plan]
        return plan

    def learn(self, argv: list[str], requests: list[dict]) -> None:
        stage = stage_of(argv)
        if stage is None or any(u in argv for u in UNSAFE):
            return
        learned = self.by_stage.setdefault(stage, {})
        for option, folder in slots(argv):
            loaded = learned.setdefault(option, set())
            for r in requests:
                if Path(r["folder"]) == folder:
                    loaded.add((r["class"], r["dtype"], bool(r.get("trainable"))))
