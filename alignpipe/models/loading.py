"""Loading policies, reward models and tokenizers with secure defaults.

- safetensors only, unless `allow_pickle=True` (a `--allow-pickle` flag) is given;
- `trust_remote_code` off unless asked;
- a policy is a Hugging Face model folder, or a PEFT adapter folder (adapter_config.json) on its base model;
- a model is named by a local path or a Hub id `org/name[@revision]` (huggingface_hub's cache, see
  alignpipe/data/hub.py); `local_folder` is the one place a name becomes a folder, a local path that exists wins,
  and every loader here goes through it; a Hub model's fingerprint is its resolved commit;
- every problem with a folder is a one-line UserError naming the folder and what is missing.
"""
from __future__ import annotations

import json
from pathlib import Path

from alignpipe.core.errors import UserError, first_line

DTYPES = ("float32", "bfloat16", "float16")
# Inside a child of the resident worker (alignpipe.worker): its model cache, whose `take(class name, folder,
# dtype)` and `take_adapter(folder, dtype, trainable)` return a model already loaded with these arguments (a PEFT
# model with that adapter), or None. Empty everywhere else.
RESIDENT: list = []


def quiet_transformers() -> None:
    """No per-file progress bars or advisory warnings from transformers inside stages (they log their own)."""
    import warnings

    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def resolve_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise UserError(f"--dtype '{name}': unknown (known: {', '.join(DTYPES)})")
    return getattr(torch, name)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here (use --device cpu)")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"--device '{name}': unknown (known: cpu, cuda, auto)")
    return name


def local_folder(name: Path | str, what: str = "model", *, allow_pickle: bool = False,
                 trust_remote_code: bool = False) -> Path:
    """The folder a model name stands for: a local path that exists, else the Hub id's snapshot folder in
    huggingface_hub's cache (fetched first when the network is on); a one-line UserError when neither."""
    from alignpipe.data import hub

    p = Path(name)
    if p.exists():
        return p
    if hub.split_id(str(name)) is None:
        raise UserError(f"{what} {name}: no such folder")
    try:
        return hub.snapshot(str(name), allow_pickle=allow_pickle, remote_code=trust_remote_code)
    except hub.HubMiss as e:
        raise UserError(f"{what} {name}: no such folder, and {e}")


def _folder_or_name(path: Path | str) -> Path:
    try:
        return local_folder(path)
    except UserError:
        return Path(path)


def with_revision(name: Path | str, revision: str | None) -> str:
    """`name@revision` for a Hub id and a `--revision` flag; the name alone without one."""
    from alignpipe.data import hub

    if not revision:
        return str(name)
    if Path(name).exists():
        raise UserError(f"--revision {revision}: {name} is a local folder, not a Hub id")
    if hub.split_id(str(name)) is None or "@" in str(name):
        raise UserError(f"--revision {revision}: {name} is not a Hub id without a revision (org/name)")
    return f"{name}@{revision}"


def is_adapter(path: Path | str) -> bool:
    return (_folder_or_name(path) / "adapter_config.json").is_file()


def adapter_base(path: Path | str) -> str:
    cfg = json.loads((_folder_or_name(path) / "adapter_config.json").read_text())
    return cfg.get("base_model_name_or_path") or ""


def check_model_folder(path: Path | str, what: str, allow_pickle: bool = False) -> Path:
    """Fail with one line unless `path` names a usable model (or adapter) folder; returns that folder."""
    p = local_folder(path, what, allow_pickle=allow_pickle)
    if not p.is_dir():
        raise UserError(f"{what} {p}: not a folder (expected a Hugging Face model or PEFT adapter folder)")
    if is_adapter(p):
        if not list(p.glob("adapter_model.safetensors")) and not (allow_pickle and list(p.glob("adapter_model.bin"))):
            raise UserError(f"{what} {p}: adapter folder has no adapter_model.safetensors")
        return p
    if not (p / "config.json").is_file():
        raise UserError(f"{what} {p}: missing config.json (not a Hugging Face model folder)")
    if not list(p.glob("*.safetensors")):
        if list(p.glob("*.bin")) or list(p.glob("*.pt")):
            if not allow_pickle:
                raise UserError(f"{what} {p}: only pickle weights (*.bin); convert to safetensors or pass "
                                f"--allow-pickle if you trust the source")
        else:
            raise UserError(f"{what} {p}: no weight files (*.safetensors)")
    return p


def load_tokenizer(path: Path | str, chat_template: Path | None = None, padding_side: str = "left",
                   trust_remote_code: bool = False):
    """The tokenizer of a model/adapter folder, with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    quiet_transformers()
    p = local_folder(path, "tokenizer", trust_remote_code=trust_remote_code)
    if not p.is_dir():
        raise UserError(f"tokenizer {p}: no such folder")
    if is_adapter(p) and not (p / "tokenizer_config.json").exists():
        p = local_folder(adapter_base(p), f"tokenizer (base of {p})", trust_remote_code=trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(str(p), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UserError(f"tokenizer {p}: cannot load ({first_line(e, 150)})")
    if chat_template is not None:
        if not Path(chat_template).is_file():
            raise UserError(f"--chat-template {chat_template}: no such file")
        tok.chat_template = Path(chat_template).read_text()
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise UserError(f"tokenizer {p}: has neither a pad nor an EOS token; add one to its tokenizer_config.json")
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_errors() -> tuple:
    """What loading a bad model folder raises: missing or mistyped files, truncated or corrupted safetensors,
    pickle weights that the weights-only unpickler refuses."""
    import pickle

    from safetensors import SafetensorError

    return OSError, ValueError, RuntimeError, KeyError, SafetensorError, pickle.UnpicklingError


def _from_pretrained(cls, path: Path, dtype, trust_remote_code: bool, allow_pickle: bool, what: str,
                     private: bool = False):
    """`private`: the caller changes the model in place (an adapter attached to it), so a resident model is
    handed over as a copy, and a later load of the same folder (a reference) still gets the unchanged one."""
    quiet_transformers()
    if RESIDENT and not (trust_remote_code or allow_pickle):
        cached = RESIDENT[0].take(cls.__name__, path, dtype, private=private)
        if cached is not None:
            return cached
    try:
        return cls.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code,
                                   use_safetensors=None if allow_pickle else True)
    except load_errors() as e:
        raise UserError(f"{what} {path}: cannot load ({first_line(e, 160)})")


def load_causal_lm(path: Path | str, *, dtype: str = "float32", device: str = "cpu", trust_remote_code=False,
                   allow_pickle=False, trainable_adapter=False, what: str = "policy"):
    """A causal LM from a model folder, or a base model with a PEFT adapter folder on it."""
    from transformers import AutoModelForCausalLM

    p = check_model_folder(path, what, allow_pickle)
    torch_dtype, dev = resolve_dtype(dtype), resolve_device(device)
    if not is_adapter(p):
        return _from_pretrained(AutoModelForCausalLM, p, torch_dtype, trust_remote_code, allow_pickle, what).to(dev)
    base = check_model_folder(adapter_base(p), f"{what} base (from {p}/adapter_config.json)", allow_pickle)
    if RESIDENT and not (trust_remote_code or allow_pickle):
        resident = RESIDENT[0].take_adapter(p, torch_dtype, trainable_adapter)
        if resident is not None:
            return resident.to(dev)
    model = _from_pretrained(AutoModelForCausalLM, base, torch_dtype, trust_remote_code, allow_pickle, what,
                             private=True)
    return attach_adapter(model, p, trainable_adapter, what).to(dev)


def attach_adapter(model, adapter: Path, trainable: bool, what: str = "policy"):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as e:  # the shapes or names of another base model
        msg = str(e).splitlines()[0][:160]
        raise UserError(f"{what} {adapter}: adapter does not fit its base model "
                        f"{adapter_base(adapter)} ({type(e).__name__}: {msg})")
    except load_errors() as e:  # unreadable files: truncated safetensors, refused pickle, ...
        raise UserError(f"{what} {adapter}: cannot load the adapter ({first_line(e, 160)})")


def load_reward_model(path: Path | str, *, dtype="float32", device="cpu", trust_remote_code=False,
                      allow_pickle=False):
    from transformers import AutoModelForSequenceClassification

    p = check_model_folder(path, "reward model", allow_pickle)
    model = _from_pretrained(AutoModelForSequenceClassification, p, resolve_dtype(dtype), trust_remote_code,
                             allow_pickle, "reward model")
    if getattr(model.config, "num_labels", 1) != 1:
        raise UserError(f"reward model {p}: has {model.config.num_labels} labels; a reward model has 1")
    return model.to(resolve_device(device)).eval()


def model_fingerprint(path: Path | str) -> str:
    """A Hub model's resolved commit; else the content hash of a model/adapter folder's weights and config
    (the manifest's when alignpipe wrote it)."""
    from alignpipe.data import hub
    from alignpipe.data.manifest import fingerprint_files, read_manifest

    p = _folder_or_name(path)
    commit = hub.hub_commit(p)
    if commit:
        return commit
    m = read_manifest(p)
    if m and m.get("fingerprint"):
        return m["fingerprint"]
    return fingerprint_files(p, patterns=("*.safetensors", "config.json", "adapter_config.json"))
