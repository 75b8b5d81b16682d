"""Modules imported on first use, so that tables (losses, CLI choices, docs) load without torch."""
from __future__ import annotations

import importlib


class LazyModule:
    """A module imported on first attribute access."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)


torch = LazyModule("torch")
F = LazyModule("torch.nn.functional")
