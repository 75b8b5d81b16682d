"""Tiny offline models for the tests and the tiny demo; everything builds in seconds on a CPU.

* a byte-level BPE tokenizer (1024 tokens) trained on the help texts that ship with Python
  (``pydoc_data``), ChatML chat template, special tokens ``<|endoftext|>`` (id 0, eos and bos),
  ``<|im_start|>`` (1), ``<|im_end|>`` (2), ``<|pad|>`` (3, pad); every byte is a token, so the digits
  ``1``..``9`` and ``A``/``B`` are single tokens; no special token is added when encoding;
* a randomly initialised 2-layer Llama causal LM and a Llama sequence-classification reward model
  (one score), each saved as a complete folder (safetensors weights + tokenizer + generation config);
* tokenizer variants without a pad token or without a chat template, for bad-input tests;
* device pinning for tests (`cpu_env`) and the tolerances of comparing a computation across devices and
  dtypes (`logp_tolerance`).

    python -m alignpipe.testing OUT_DIR [--seed N]   # builds tokenizer/, policy/, reward/ under OUT_DIR
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END, PAD]  # ids 0..3, in this order
VOCAB_SIZE = 1024
MAX_LENGTH = 512

# ChatML, no default system prompt. Each turn ends with "<|im_end|>\n".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TOKENIZER_JSON: str | None = None  # the trained tokenizers.Tokenizer, cached per process


def _training_text() -> list[str]:
    from pydoc_data.topics import topics

    # repeated so that " 1".." 9", " A", " B" and the role names also become single tokens
    extra = ["Answer: A Answer: B Score: 1 2 3 4 5 6 7 8 9\n", "user\nassistant\nsystem\n"] * 200
    return [topics[k] for k in sorted(topics)] + extra


def _trained_tokenizer_json() -> str:
    global _TOKENIZER_JSON
    if _TOKENIZER_JSON is None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB_SIZE,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_training_text(), trainer=trainer)
        _TOKENIZER_JSON = tok.to_str()
    return _TOKENIZER_JSON


def _make_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()),
        bos_token=EOS,
        eos_token=EOS,
        unk_token=None,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tokenizer(out_dir: str | Path):
    """Train (once per process) and save the tiny tokenizer to ``out_dir``; returns the tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _make_tokenizer()
    tok.save_pretrained(out)
    return tok


def _load_tokenizer(tokenizer_dir: str | Path | None):
    if tokenizer_dir is None:
        return _make_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def _llama_config(tok, **overrides):
    from transformers import LlamaConfig

    kw = {
        "vocab_size": len(tok),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": MAX_LENGTH,
        "tie_word_embeddings": True,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    kw.update(overrides)
    return LlamaConfig(**kw)


def _save_model(model_cls, config, tok, out_dir, seed: int) -> Path:
    import torch
    from transformers import GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
        torch.manual_seed(seed)
        model = model_cls(config)
    model.eval()
    # generation stops at the end of a chat turn as well as at <|endoftext|>
    eos_ids = [tok.eos_token_id] + [i for i in [tok.convert_tokens_to_ids(IM_END)] if i != tok.eos_token_id]
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=eos_ids, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_causal_lm(out_dir: str | Path, tokenizer_dir: str | Path | None = None, seed: int = 0) -> Path:
    """A random 2-layer Llama causal LM (+ tokenizer, generation config) saved in ``out_dir``."""
    from transformers import LlamaForCausalLM

    tok = _load_tokenizer(tokenizer_dir)
    return _save_model(LlamaForCausalLM, _llama_config(tok), tok, out_dir, seed)


def build_reward_model(
    out_dir: str | Path, seed: int = 0, *, tokenizer_dir: str | Path | None = None
) -> Path:
    """A random 2-layer Llama sequence classifier with one output (a scalar reward) saved in ``out_dir``."""
    from transformers import LlamaForSequenceClassification

    tok = _load_tokenizer(tokenizer_dir)
    config = _llama_config(tok, num_labels=1, tie_word_embeddings=False)
    return _save_model(LlamaForSequenceClassification, config, tok, out_dir, seed)


def build_random_lm(out_dir: str | Path, tokenizer_dir: str | Path, seed: int = 0, **config) -> Path:
    """A randomly initialised Llama causal LM of any shape (`config`: LlamaConfig fields, e.g. SmolLM2-360M's)
    with the tokenizer of `tokenizer_dir`, saved in float32 in `out_dir` (bench/bench_gpu.py)."""
    from transformers import LlamaForCausalLM

    tok = _load_tokenizer(tokenizer_dir)
    return _save_model(LlamaForCausalLM, _llama_config(tok, **config), tok, out_dir, seed)


def _copy_model_files(model_dir: str | Path | None, out: Path) -> None:
    if model_dir is None:
        return
    for path in Path(model_dir).iterdir():
        weights_or_config = path.suffix == ".safetensors" or path.name.endswith("config.json")
        if path.is_file() and weights_or_config and path.name != "tokenizer_config.json":
            shutil.copy2(path, out / path.name)


def build_tokenizer_without_pad(out_dir: str | Path, model_dir: str | Path | None = None) -> Path:
    """The tiny tokenizer with no pad token (``pad_token is None``) saved in ``out_dir``.

    With ``model_dir``, its weights and configs are copied too, giving a model folder with a bad tokenizer.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _make_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(out)
    _copy_model_files(model_dir, out)
    return out


def build_tokenizer_without_chat_template(out_dir: str | Path, model_dir: str | Path | None = None) -> Path:
    """The tiny tokenizer with no chat template saved in ``out_dir`` (``model_dir``: as above)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _make_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(out)
    for stale in ("chat_template.jinja", "chat_template.json"):
        (out / stale).unlink(missing_ok=True)
    _copy_model_files(model_dir, out)
    return out


def build_tiny_models(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Tokenizer, policy and reward model under ``out_dir`` (``tokenizer/``, ``policy/``, ``reward/``)."""
    out = Path(out_dir)
    build_tokenizer(out / "tokenizer")
    return {
        "tokenizer": out / "tokenizer",
        "policy": build_causal_lm(out / "policy", out / "tokenizer", seed=seed),
        "reward": build_reward_model(out / "reward", seed=seed + 1, tokenizer_dir=out / "tokenizer"),
    }


# ------------------------------------------------------------------------------------ devices in tests
def cpu_env(env: dict | None = None, **extra) -> dict:
    """A child process's environment that sees no CUDA device (`CUDA_VISIBLE_DEVICES=""`), so that its
    `--device auto`, auto batch sizes and default process groups are those of a CPU machine anywhere."""
    import os

    base = dict(os.environ if env is None else env)
    return {**base, "CUDA_VISIBLE_DEVICES": "", **{k: str(v) for k, v in extra.items()}}


# Per-token bound on |a - b| between two computations of a log-prob (or a score) of the same token by
# different kernels: float32 differs only in summation order (a few ulp of logits of magnitude ~10); TF32
# matmuls keep 10 mantissa bits and bfloat16 autocast rounds every matmul output to 8 bits (2**-8 = 0.4%
# relative), so their bound is that of the rounded logits. A summed log-prob of n tokens gets n times it:
# loose against float rounding, tight against a wrong token, position or mask (errors of order 1 per token).
PER_TOKEN_TOLERANCE = {"float32": 2e-5, "tf32": 5e-3, "bfloat16": 3e-2, "float16": 1e-2}


def tf32_enabled() -> bool:
    """Whether float32 matmuls on CUDA may run in TF32 here (torch's flags or float32 matmul precision)."""
    import torch

    return bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"


def logp_tolerance(dtype: str, devices: tuple[str, ...] = ("cpu",), num_tokens: int = 1) -> float:
    """Absolute bound on the difference of a summed log-prob of `num_tokens` tokens computed with `dtype`
    (float32 | bfloat16 | float16) on `devices`; float32 on CUDA counts as TF32 when TF32 is enabled."""
    key = dtype
    if dtype == "float32" and any(d.startswith("cuda") for d in devices) and tf32_enabled():
        key = "tf32"
    return PER_TOKEN_TOLERANCE[key] * max(1, num_tokens)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignpipe.testing", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in build_tiny_models(args.out_dir, seed=args.seed).items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
