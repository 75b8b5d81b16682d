"""The worker's model cache: models loaded once in the fork server, shared copy-on-write by its children.

A key is (model class, folder, fingerprint, dtype): a newly trained policy folder is a new key, and a folder
whose fingerprint changed (rewritten in place) is a new key whose old entry is dropped. Models live on the
CPU in the server (CUDA cannot cross a fork); a child moves its copy to its device as a fresh load would. A
PEFT adapter is kept as a resident PEFT model over its own copy of the cached base, one per adapter config
(base, rank, targets), dtype and trainability: the next adapter of that config is swapped into it in place
(only the adapter's weights are read; the model is not rebuilt), so the sampler of `generate` stays alive
across calls while each call gets the new policy. A new full model folder is loaded fresh, not copied into a
resident model of its architecture: that model is usually policy 0, which the next stage needs again as its
reference. Above `max_bytes` (parameters and buffers) the least recently used models are evicted. Loads that
ask for remote code or pickle weights are never cached (they run in the child only).
"""
from __future__ import annotations

import copy
import gc
import json
import re
from collections import OrderedDict
from pathlib import Path

from alignpipe.core.errors import UserError

CLASSES = ("AutoModelForCausalLM", "AutoModelForSequenceClassification")
ADAPTER = "PeftModel"  # the class name of a resident adapter entry: a PEFT model over its own base copy
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


def adapter_key(folder, dtype, trainable: bool) -> tuple:
    return (*cache_key(ADAPTER, folder, dtype), bool(trainable))


def adapter_group(folder: Path, key: tuple) -> tuple:
    """Adapters one resident PEFT model takes in turn: the same adapter_config.json (its base, rank, alpha,
    targets, ...), dtype and trainability."""
    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    return json.dumps(config, sort_keys=True), key[3], key[4]


def swap_adapter(model, folder: Path) -> None:
    """Load an adapter's weights into a PEFT model of the same config, in place (PEFT's own load path)."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    result = set_peft_model_state_dict(model, load_peft_weights(str(folder), device="cpu"))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter {folder}: {len(unexpected)} weights the resident model lacks ({unexpected[0]})")


class ModelCache:
    """LRU of loaded models, bounded by bytes. In the server: `preload`. In a child: `take` (the hook that
    alignpipe.models.loading consults), which records every request for the manifest and the server."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict = OrderedDict()  # key -> (model, bytes)
        self.groups: dict = {}  # adapter key -> adapter_group
        self.requests: list[dict] = []  # in a child: what the stage asked for, hit or not
        self._taken: set = set()

    def total(self) -> int:
        return sum(b for _m, b in self.entries.values())

    def _drop_stale(self, key: tuple) -> None:
        """Entries of the same class, folder and dtype under another fingerprint: the folder changed."""
        for old in [k for k in self.entries if k[0] == key[0] and k[1] == key[1] and k[3] == key[3] and k[2] != key[2]]:
            self._drop(old)

    def _drop(self, key: tuple) -> None:
        del self.entries[key]
        self.groups.pop(key, None)

    def load(self, cls_name: str, folder: Path, dtype: str, trainable: bool = False) -> str:
        """`preload` for a model class, `preload_adapter` for a PEFT adapter folder."""
        if cls_name == ADAPTER:
            return self.preload_adapter(folder, dtype, trainable)
        return self.preload(cls_name, folder, dtype)

    def preload(self, cls_name: str, folder: Path, dtype: str) -> str:
        """Load a model into the cache unless it is there; 'hit', 'loaded', 'too-big' or 'failed: why'."""
        import torch

        from alignpipe.models import loading

        key = cache_key(cls_name, folder, dtype)
        if self._hit(key):
            return "hit"
        import transformers

        try:
            model = loading._from_pretrained(getattr(transformers, cls_name), Path(folder),
                                             getattr(torch, key[3]), False, False, "model")
        except UserError as e:
            return f"failed: {e}"
        return self._admit(key, model)

    def preload_adapter(self, folder: Path, dtype: str, trainable: bool) -> str:
        """A resident PEFT model holding this adapter: 'hit', 'swapped' (the adapter's weights loaded in place
        into the resident model of its config), 'loaded' (attached to a copy of the cached base), 'too-big' or
        'failed: why'."""
        from alignpipe.models.loading import adapter_base, attach_adapter, local_folder

        key = adapter_key(folder, dtype, trainable)
        if self._hit(key):
            return "hit"
        try:
            base = local_folder(adapter_base(folder)).resolve()
            group = adapter_group(folder, key)
        except (UserError, OSError, ValueError) as e:
            return f"failed: {e}"
        donor = next((k for k in self.entries if self.groups.get(k) == group), None)
        if donor is not None:
            model, size = self.entries[donor]
            self._drop(donor)
            try:
                swap_adapter(model, folder)
            except (OSError, ValueError, RuntimeError, KeyError) as e:
                return f"failed: {e}"
            self.entries[key], self.groups[key] = (model, size), group
            return "swapped"
        got = self.preload("AutoModelForCausalLM", base, dtype)
        if got not in ("hit", "loaded"):
            return got
        try:
            model = attach_adapter(copy.deepcopy(self.entries[cache_key("AutoModelForCausalLM", base, dtype)][0]),
                                   Path(folder), trainable)
        except UserError as e:
            return f"failed: {e}"
        return self._admit(key, model, group)

    def _hit(self, key: tuple) -> bool:
        """The key is cached (now the most recently used); an entry of its folder under another fingerprint is
        dropped first."""
        self._drop_stale(key)
        if key in self.entries:
            self.entries.move_to_end(key)
            return True
        return False

    def _admit(self, key: tuple, model, group: tuple | None = None) -> str:
        """Cache a model just loaded: 'loaded', or 'too-big' (above the whole bound; not kept)."""
        size = model_bytes(model)
        if size > self.max_bytes:
            del model
            gc.collect()
            return "too-big"
        self.make_room(size)
        self.entries[key] = (model, size)
        if group is not None:
            self.groups[key] = group
        return "loaded"

    def make_room(self, size: int) -> None:
        while self.entries and self.total() + size > self.max_bytes:
            self._drop(next(iter(self.entries)))
        gc.collect()

    def take(self, cls_name: str, folder: Path, dtype, private: bool = False) -> object | None:
        """In a child: the cached model for this load, or None (the child loads it itself). The first request
        of a key gets the server's object (a copy-on-write page view); a second one in the same child (e.g. the
        policy and its reference from one folder) gets a deep copy, as two fresh loads give two models.
        `private` (a base an adapter is attached to in place): always a deep copy, the server's object unchanged."""
        if cls_name not in CLASSES:
            return None
        return self._take(cache_key(cls_name, folder, dtype), private)

    def take_adapter(self, folder: Path, dtype, trainable: bool) -> object | None:
        """In a child: the resident PEFT model holding this adapter, or None (the child attaches it itself)."""
        return self._take(adapter_key(folder, dtype, trainable))

    def _take(self, key: tuple, private: bool = False) -> object | None:
        hit = key in self.entries
        self.requests.append({"class": key[0], "folder": key[1], "fingerprint": key[2], "dtype": key[3],
                              **({"trainable": key[4]} if len(key) > 4 else {}), "hit": hit})
        if not hit:
            return None
        model = self.entries[key][0]
        if private or key in self._taken:
            return copy.deepcopy(model)
        self._taken.add(key)
        return model

    def status(self) -> list[dict]:
        return [{"class": k[0], "folder": k[1], "fingerprint": k[2], "dtype": k[3], "bytes": b,
                 **({"trainable": k[4]} if len(k) > 4 else {})} for k, (_m, b) in self.entries.items()]
