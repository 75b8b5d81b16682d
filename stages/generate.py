"""generate: sample N responses per prompt from the current policy -> a `generations` dataset.

Determinism that survives resume and process sharding: every prompt is rendered and tokenised, prompts
are sorted by token length (stable), and the prompt at position i of that order samples with a seed derived
from (--seed, i) alone. Checkpoint shards are runs of `--shard-batches x --batch-size` prompts, decoded with
continuous batching (`--batch-size` prompts in flight, freed slots refilled) inside the shard; process
shards are contiguous ranges of whole checkpoint shards, so a resumed run, or N processes read back
together, equal one uninterrupted run row for row. The output is in this order (prompt, then sample index).
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from alignpipe.core.command import ConfigOpt, ForceOpt, OutOpt, handle_errors, resolved_config, say
from alignpipe.core.errors import UserError

ENGINES = ("transformers", "vllm")
AUTO_BATCH = {"cpu": 32, "cuda": 64, "vllm": 256}  # prompts in flight for --batch-size auto (measured: bench)


# -- pure core -------------------------------------------------------------------------------------------
def prepare_prompts(ds, tokenizer, *, max_prompt_length: int, long_prompts: str = "truncate",
                    where: str = "prompts", row_ids: list[int] | None = None):
    """Render + tokenise every prompt, handle long ones, sort by token length (stable, ties by row).

    Returns (an in-memory dataset in batch order: prompt_id, prompt, messages, reference and the prompt's
    token ids `_ids`; {"truncated": n} or {"skipped": n}). `row_ids` name the rows in errors.
    """
    from datasets import Dataset, Features, List, Value

    from alignpipe import schemas
    from alignpipe.models.prompting import render_prompt

    cols = {c: ds[c] for c in ("prompt_id", "prompt", "messages", "reference")}
    row_ids = row_ids if row_ids is not None else list(range(len(ds)))
    texts = []
    for i, (pid, prompt, messages) in enumerate(zip(cols["prompt_id"], cols["prompt"], cols["messages"])):
        at = f"{where} row {row_ids[i]} (prompt_id {pid})"
        if not messages and not (prompt or "").strip():
            raise UserError(f"{at}: empty prompt")
        texts.append(render_prompt(tokenizer, prompt, messages, where=at))
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    keep, long_count = [], 0
    for i, row in enumerate(ids):
        if not row:
            raise UserError(f"{where} row {row_ids[i]} (prompt_id {cols['prompt_id'][i]}): prompt has no tokens")
        if len(row) > max_prompt_length:
            long_count += 1
            if long_prompts == "skip":
                continue
            ids[i] = row[-max_prompt_length:]  # keep the end: the question and the generation prompt
        keep.append(i)
    order = sorted(keep, key=lambda i: len(ids[i]))
    features = schemas.features("prompts")
    features = {**{c: features[c] for c in cols}, "_ids": List(Value("int32"))}
    data = {c: [v[i] for i in order] for c, v in cols.items()} | {"_ids": [ids[i] for i in order]}
    out = Dataset.from_dict(data, features=Features(features))
    return out, {("skipped" if long_prompts == "skip" else "truncated"): long_count}


def shard_range(num_prompts: int, shard_size: int, num_shards: int, shard_index: int) -> tuple[int, int]:
    """[first, last) checkpoint-shard indices of process `shard_index`: contiguous, balanced, whole shards."""
    count = -(-num_prompts // shard_size)
    return count * shard_index // num_shards, count * (shard_index + 1) // num_shards


def sample_part(part, sampler, *, batch_size: int, seed: int, first_row: int, meta: dict):
    """Sample every prompt of `part` (prepared rows, in length order) -> generations rows, as a Dataset.

    `first_row` is the global position of the part's first prompt (prompt i's seed derives from it);
    `meta` holds policy, policy_fingerprint and iteration.
    """
    from datasets import Dataset

    from alignpipe import schemas
    from alignpipe.sampling.engine import derive_seed

    features = schemas.features("generations")
    if not len(part):  # a process shard without prompts
        return Dataset.from_dict({c: [] for c in features}, features=features)
    seeds = [derive_seed(seed, first_row + i) for i in range(len(part))]
    samples = sampler.sample(part["_ids"], seeds, batch_size=batch_size)
    n = len(samples) // len(part)
    cols = {c: part[c] for c in ("prompt_id", "prompt", "messages", "reference")}
    rows = [{**{c: v[k // n] for c, v in cols.items()}, "sample_index": k % n, "response": s.text,
             "num_tokens": len(s.token_ids), "finish_reason": s.finish_reason, "behaviour_logp": s.logp, "response_token_ids": s.token_ids,
             "response_token_logps": s.token_logps or None, **meta}
            for k, s in enumerate(samples)]
    return Dataset.from_list(rows, features=features)


def generate(ds, sampler, tokenizer, *, batch_size: int = 8, seed: int = 0, max_prompt_length: int = 10**9,
             long_prompts: str = "truncate", meta: dict | None = None):
    """The whole stage in memory: prompts dataset -> generations dataset (batch order)."""
    prepared, _ = prepare_prompts(ds, tokenizer, max_prompt_length=max_prompt_length, long_prompts=long_prompts)
    meta = meta or {"policy": "", "policy_fingerprint": "", "iteration": 0}
    return sample_part(prepared, sampler, batch_size=batch_size, seed=seed, first_row=0, meta=meta)


def summary(ds) -> dict:
    reasons = Counter(ds["finish_reason"]) if len(ds) else Counter()
    return {"rows": len(ds), "num_tokens": int(sum(ds["num_tokens"])) if len(ds) else 0,
            "finish_reasons": {r: reasons.get(r, 0) for r in ("eos", "stop", "length")}}


# -- command helpers -------------------------------------------------------------------------------------
def context_length(policy: Path, tokenizer, trust_remote_code: bool) -> int | None:
    from transformers import AutoConfig

    from alignpipe.models.loading import adapter_base, is_adapter, local_folder

    folder = local_folder(adapter_base(policy), "policy base") if is_adapter(policy) else policy
    try:
        cfg = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code).get_text_config()
    except (OSError, ValueError) as e:
        raise UserError(f"policy {folder}: cannot read config.json ({str(e).splitlines()[0][:150]})")
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 10**7 else None


def resolve_max_prompt_length(given: int | None, context: int | None, max_new_tokens: int) -> int:
    if given is not None:
        return given
    if context is None:
        raise UserError("the policy's context length is unknown; pass --max-prompt-length")
    if context <= max_new_tokens:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for the prompt in the policy's "
                        f"context of {context} tokens")
    return context - max_new_tokens


def build_sampler(engine: str, policy: Path, tokenizer, params, *, dtype, device, trust_remote_code,
                  allow_pickle, tensor_parallel_size: int = 1):
    if engine == "vllm":
        from alignpipe.sampling.vllm_engine import VllmSampler

        return VllmSampler(policy, tokenizer, params, dtype=dtype, trust_remote_code=trust_remote_code,
                           tensor_parallel_size=tensor_parallel_size)
    from alignpipe.models.loading import load_causal_lm
    from alignpipe.sampling.engine import Sampler

    model = load_causal_lm(policy, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                           allow_pickle=allow_pickle)
    if hasattr(model, "merge_and_unload"):  # a PEFT adapter: merged once, faster sampling, same policy
        model = model.merge_and_unload()
    return Sampler(model, tokenizer, params)


def parse_rows(text: str | None) -> slice:
    """`--rows START:END` (either side may be empty) as a slice over the selected prompts."""
    if not text:
        return slice(None)
    try:
        start, end = (int(x) if x.strip() else None for x in text.split(":"))
    except ValueError:
        raise UserError(f"--rows '{text}': expected START:END, e.g. 0:64")
    return slice(start, end)


def _check_options(num_samples, max_new_tokens, temperature, top_p, top_k, long_prompts, split, engine):
    if long_prompts not in ("truncate", "skip"):
        raise UserError(f"--long-prompts '{long_prompts}': unknown (known: truncate, skip)")
    if split not in ("all", "train", "test"):
        raise UserError(f"--split '{split}': unknown (known: all, train, test)")
    if engine not in ENGINES:
        raise UserError(f"--engine '{engine}': unknown (known: {', '.join(ENGINES)})")
    if num_samples < 1 or max_new_tokens < 1:
        raise UserError("--num-samples and --max-new-tokens must be >= 1")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise UserError("--temperature must be >= 0, --top-p in (0, 1], --top-k >= 0")


def resolve_batch_size(batch_size: str, engine: str, device: str) -> int:
    if batch_size == "auto":
        return AUTO_BATCH["vllm" if engine == "vllm" else ("cuda" if device.startswith("cuda") else "cpu")]
    if not batch_size.isdigit() or int(batch_size) < 1:
        raise UserError(f"--batch-size '{batch_size}': expected a positive integer or 'auto'")
    return int(batch_size)


@dataclass
class Job:
    """What `run` resolved before sampling: the policy folder, the tokenizer, this process's prompts."""
    policy: str  # as named (a Hub id keeps its @revision)
    folder: Path  # the local folder it names
    tokenizer: object
    prepared: object  # this process's prepared prompts, in length order
    first_row: int  # global position of its first prompt
    shard_size: int
    batch_size: int
    device: str
    report: dict


def run(prompts: Path, out: Path, *, config: dict, policy: str, revision: str | None = None, num_samples: int = 2,
        max_new_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, stop=(),
        seed: int = 0, batch_size: str = "auto", shard_batches: int = 4, max_prompt_length: int | None = None,
        long_prompts: str = "truncate", split: str = "all", rows: str | None = None,
        chat_template: Path | None = None, iteration: int = 0, engine: str = "transformers",
        tensor_parallel_size: int = 1, dtype: str = "float32", device: str = "auto",
        trust_remote_code: bool = False, allow_pickle: bool = False, num_shards: int | None = None,
        shard_index: int | None = None, force: bool = False) -> str:
    """The stage from disk to disk (`config`: the resolved options, for the manifest); returns its summary line."""
    from alignpipe.data.io import read_input
    from alignpipe.data.output import StageOutput, part_path, process_shard
    from alignpipe.models.loading import adapter_base, check_model_folder, is_adapter, with_revision
    from alignpipe.sampling.engine import SamplingParams

    _check_options(num_samples, max_new_tokens, temperature, top_p, top_k, long_prompts, split, engine)
    num_shards, shard_index = process_shard(num_shards, shard_index)
    if engine == "vllm":
        from alignpipe.sampling.vllm_engine import require_vllm

        require_vllm()
    ds, _ = read_input(prompts, "prompts", stage="generate")
    name = with_revision(policy, revision)
    folder = check_model_folder(name, "policy", allow_pickle)
    inputs = [prompts, folder] + ([check_model_folder(adapter_base(folder), "policy base")]
                                  if is_adapter(folder) else [])
    inputs += [chat_template] if chat_template is not None else []
    target = part_path(out, num_shards, shard_index) if num_shards > 1 else out
    so = StageOutput(target, stage="generate", kind="generations", config=config, inputs=inputs, force=force)
    if so.up_to_date():
        return f"generate: {target} is up to date (same inputs and config); nothing to do. Use --force to redo it."
    job = _prepare(ds, name, folder, prompts=prompts, split=split, rows=rows, chat_template=chat_template,
                   trust_remote_code=trust_remote_code, max_prompt_length=max_prompt_length,
                   max_new_tokens=max_new_tokens, long_prompts=long_prompts, engine=engine, device=device,
                   batch_size=batch_size, shard_batches=shard_batches, shards=(num_shards, shard_index))
    params = SamplingParams(num_samples, max_new_tokens, temperature, top_p, top_k, tuple(stop or ()))
    with so:
        sampler = build_sampler(engine, job.folder, job.tokenizer, params, dtype=dtype, device=job.device,
                                trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                                tensor_parallel_size=tensor_parallel_size)
        result, rate = _sample_shards(so, job, sampler, seed=seed, iteration=iteration)
        so.report = {**summary(result), **job.report, "engine": engine, "tokens_per_s": round(rate, 1), **so.report}
        so.finish(result)
    return summary_line(so.report, num_samples, target)


def _prepare(ds, name: str, folder: Path, *, prompts, split, rows, chat_template, trust_remote_code,
             max_prompt_length, max_new_tokens, long_prompts, engine, device, batch_size, shard_batches,
             shards) -> Job:
    """Select, render, tokenise and sort the prompts; this process's contiguous range of checkpoint shards."""
    from alignpipe.models.loading import load_tokenizer, resolve_device

    dev = "cuda" if engine == "vllm" else resolve_device(device)
    bs = resolve_batch_size(batch_size, engine, dev)
    selected = list(range(len(ds))) if split == "all" else [i for i, s in enumerate(ds["split"]) if s == split]
    selected = selected[parse_rows(rows)]
    if not selected:
        raise UserError(f"{prompts}: no prompts with split '{split}'" + (f" in rows {rows}" if rows else ""))
    tok = load_tokenizer(folder, chat_template=chat_template, trust_remote_code=trust_remote_code)
    limit = resolve_max_prompt_length(max_prompt_length, context_length(folder, tok, trust_remote_code),
                                      max_new_tokens)
    prepared, long_report = prepare_prompts(ds.select(selected), tok, max_prompt_length=limit,
                                            long_prompts=long_prompts, where=str(prompts), row_ids=selected)
    if len(prepared) == 0:
        raise UserError(f"{prompts}: every prompt is longer than --max-prompt-length {limit} tokens and "
                        f"--long-prompts skip dropped them all; nothing to generate")
    size = shard_batches * bs
    num_shards, shard_index = shards
    first, last = shard_range(len(prepared), size, num_shards, shard_index)
    mine = prepared.select(range(first * size, min(len(prepared), last * size)))
    report = {"prompts": len(mine), "long_prompts": long_report, "max_prompt_length": limit, "batch_size": bs,
              "shards": [first, last], "process_shard": [shard_index, num_shards], "device": dev}
    return Job(name, folder, tok, mine, first * size, size, bs, dev, report)


def _sample_shards(so, job: Job, sampler, *, seed: int, iteration: int):
    """Sample this process's prompts shard by shard (resumable); (generations, tokens per second)."""
    from alignpipe.data.output import map_shards
    from alignpipe.models.loading import model_fingerprint

    meta = {"policy": job.policy, "policy_fingerprint": model_fingerprint(job.folder), "iteration": iteration}
    timing = {"seconds": 0.0, "tokens": 0}

    def fn(part, index):
        t0 = time.perf_counter()
        res = sample_part(part, sampler, batch_size=job.batch_size, seed=seed,
                          first_row=job.first_row + index * job.shard_size, meta=meta)
        timing["seconds"] += time.perf_counter() - t0
        timing["tokens"] += int(sum(res["num_tokens"])) if len(res) else 0
        return res

    result = map_shards(so, job.prepared, fn, job.shard_size, desc="generate")
    return result, (timing["tokens"] / timing["seconds"] if timing["seconds"] else 0.0)


@handle_errors
def command(
    ctx: typer.Context,
    prompts: Annotated[Path, typer.Argument(help="A prompts dataset (from `alignpipe import`).")],
    out: OutOpt,
    policy: Annotated[str, typer.Option(
        help="Policy: a model folder, a PEFT adapter folder, or a Hub id org/name[@revision] (from the cache "
             "when HF_HUB_OFFLINE=1).")],
    revision: Annotated[str | None, typer.Option(
        help="Hub revision (branch, tag or commit) of a Hub id --policy.")] = None,
    num_samples: Annotated[int, typer.Option(help="Responses sampled per prompt.")] = 2,
    max_new_tokens: Annotated[int, typer.Option(help="Most new tokens per response.")] = 256,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 = greedy).")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1 = off).")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens (0 = off).")] = 0,
    stop: Annotated[list[str] | None, typer.Option(
        help="Stop string (repeatable); the response is cut before it.")] = None,
    seed: Annotated[int, typer.Option(help="Seed; prompt i (in length order) samples with a seed from (seed, i).")] = 0,
    batch_size: Annotated[str, typer.Option(
        help="Prompts decoding together, or 'auto': 32 on CPU, 64 on CUDA, 256 with --engine vllm.")] = "auto",
    shard_batches: Annotated[int, typer.Option(
        min=1, help="Checkpointed shard size, in batches (--shard-batches x --batch-size prompts).")] = 4,
    max_prompt_length: Annotated[int | None, typer.Option(
        min=1, help="Longest prompt in tokens (default: the policy's context minus --max-new-tokens).")] = None,
    long_prompts: Annotated[str, typer.Option(
        help="truncate (from the left) | skip, for prompts longer than --max-prompt-length.")] = "truncate",
    split: Annotated[str, typer.Option(help="Which prompts: all | train | test.")] = "all",
    rows: Annotated[str | None, typer.Option(
        "--rows", help="START:END slice of the selected prompts (e.g. fresh prompts per online iteration).")] = None,
    chat_template: Annotated[Path | None, typer.Option(
        help="Jinja chat template file, for tokenizers without one.")] = None,
    iteration: Annotated[int, typer.Option(help="Online iteration number, recorded in every row.")] = 0,
    engine: Annotated[str, typer.Option(help="transformers | vllm (needs vllm and a GPU).")] = "transformers",
    tensor_parallel_size: Annotated[int, typer.Option(min=1, help="GPUs per model, --engine vllm only.")] = 1,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16.")] = "float32",
    device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N | auto.")] = "auto",
    trust_remote_code: Annotated[bool, typer.Option(help="Run the model folder's own Python code.")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="Allow pickle (*.bin) weights from a trusted source.")] = False,
    num_shards: Annotated[int | None, typer.Option(help="Processes splitting the shards (or WORLD_SIZE).")] = None,
    shard_index: Annotated[int | None, typer.Option(help="This process's range of shards (or RANK).")] = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
):
    """Sample responses from a policy: batched, seeded, resumable, with behaviour log-probs."""
    options = {k: v for k, v in locals().items() if k not in ("ctx", "config")}
    say(run(config=resolved_config(ctx), **options))


def summary_line(r: dict, num_samples: int, target: Path) -> str:
    reasons = ", ".join(f"{k} {v}" for k, v in r["finish_reasons"].items())
    (what, count), = r["long_prompts"].items()
    long = f"; {count} long prompt(s) {what}" if count else ""
    return (f"generate: {r['rows']} rows ({r['prompts']} prompts x {num_samples}), {r['num_tokens']:,} tokens, "
            f"{r['tokens_per_s']:,.0f} tok/s; finish: {reasons}{long} -> {target}")
