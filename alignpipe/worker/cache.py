"""The worker's model cache: models loaded once in the fork server, shared copy-on-write by its children.

A key is (model class, folder, fingerprint, dtype): a newly trained policy folder is a new key, and a folder
whose fingerprint changed (rewritten in place) is a new key whose old entry is dropped. Models live on the
CPU in the server (CUDA cannot cross a fork); a child moves its copy to its device as a fresh load would. A
PEFT adapter is never cached itself: its base is, and the child attaches the adapter (reads only the adapter
files). Above `max_bytes` (parameters and buffers) the least recently used models are evicted. Loads that
ask for remote code or pickle weights are never cached (they run in the child only).
"""
from __future__ import annotations

import copy
import gc
import re
from collections import OrderedDict
from pathlib import Path

from alignpipe.core.errors import UserError

CLASSES = ("AutoModelForCausalLM", "AutoModelForSequenceClassification")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes of a size such as 800M, 2G, 1.5GiB or 123456 (binary units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not m:
        raise UserError(f"--max-memory '{text}': not a size (e.g. 800M, 4G, 1.5GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def model_bytes(model) -> int:
    """Bytes of a model's parameters and buffers (tied tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def cache_key(cls_name: str, folder, dtype) -> tuple:
    from alignpipe.models.loading import model_fingerprint

    p = Path(folder)
    return cls_name, str(p.resolve()), model_fingerprint(p), str(dtype).removeprefix("torch.")


class ModelCache:
    """LRU of loaded models, bounded by bytes. In the server: `preload`. In a child: `take` (the hook that
    alignpipe.models.loading consults), which records every request for the manifest and the server."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict = OrderedDict()  # key -> (model, bytes)
        self.requests: list[dict] = []  # in a child: what the stage asked for, hit or not
        self._taken: set = set()

    def total(self) -> int:
        return sum(b for _m, b in self.entries.values())

    def _drop_stale(self, key: tuple) -> None:
        """Entries of the same class, folder and dtype under another fingerprint: the folder changed."""
        for old in [k for k in self.entries if k[0] == key[0] and k[1] == key[1] and k[3] == key[3] and k != key]:
            del self.entries[old]

    def preload(self, cls_name: str, folder: Path, dtype: str) -> str:
        """Load a model into the cache unless it is there; 'hit', 'loaded', 'too-big' or 'failed: why'."""
        import torch

        from alignpipe.models import loading

        key = cache_key(cls_name, folder, dtype)
        self._drop_stale(key)
        if key in self.entries:
            self.entries.move_to_end(key)
            return "hit"
        import transformers

        try:
            model = loading._from_pretrained(getattr(transformers, cls_name), Path(folder),
                                             getattr(torch, key[3]), False, False, "model")
        except UserError as e:
            return f"failed: {e}"
        size = model_bytes(model)
        if size > self.max_bytes:
            del model
            gc.collect()
            return "too-big"
        self.make_room(size)
        self.entries[key] = (model, size)
        return "loaded"

    def make_room(self, size: int) -> None:
        while self.entries and self.total() + size > self.max_bytes:
            self.entries.popitem(last=False)
        gc.collect()

    def take(self, cls_name: str, folder: Path, dtype) -> object | None:
        """In a child: the cached model for this load, or None (the child loads it itself). The first request
        of a key gets the server's object (a copy-on-write page view); a second one in the same child (e.g. the
        policy and its reference from one folder) gets a deep copy, as two fresh loads give two models."""
        if cls_name not in CLASSES:
            return None
        key = cache_key(cls_name, folder, dtype)
        hit = key in self.entries
        self.requests.append({"class": cls_name, "folder": key[1], "fingerprint": key[2], "dtype": key[3],
                              "hit": hit})
        if not hit:
            return None
        model = self.entries[key][0]
        if key in self._taken:
            return copy.deepcopy(model)
        self._taken.add(key)
        return model

    def status(self) -> list[dict]:
        return [{"class": k[0], "folder": k[1], "fingerprint": k[2], "dtype": k[3], "bytes": b}
                for k, (_m, b) in self.entries.items()]
