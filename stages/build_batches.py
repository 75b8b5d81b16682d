"""build-batches: feedback -> tokenised, truncated, length-grouped training batches (the batch contract).

    alignpipe build-batches WEIGHTED... --task sft|reward|pointwise|pairwise --tokenizer MODEL --out BATCHES

Inputs: `weighted` (reweight) or `annotations` (annotate/import; every weight 1); for `--task sft` also
`prompts` with a `reference` (train split only) and `generations`. Several inputs are concatenated, or
mixed with `--mix 0.5,0.3,0.2` (replay of earlier iterations; see `alignpipe.batches.tokenise.mix`).
Output: `batches-<task>`, one row per example, unpadded, in batch order with its `batch_index`, so `train`
reads batches in order and resumes by index. Tasks: `alignpipe.batches.tasks`; tokenisation, truncation and batch
composition: `alignpipe.batches.tokenise`. `--reference MODEL` stores each response's log-probs under the
reference model (pointwise, pairwise: summed; group: per token, for a loss's KL term, e.g. `grpo,kl_coef=0.04`),
computed in resumable shards, so `train` needs no reference in memory;
they are computed as `train` computes the policy's for the same `--dtype` (bfloat16: autocast over float32
weights), batch by stored batch, so with policy = reference the first DPO loss is exactly log 2. How they
were computed is recorded in the manifest (`reference_numerics`); train notes any difference from its own.
`--task group --advantage gae,critic=CRITIC` (PPO) stores the critic's per-token values, GAE returns and
per-token advantages (`alignpipe.batches.gae`), the values computed in the same resumable shards.

Bad input: an empty prompt, a NaN/negative weight, a non-finite reward, a preference outside [0, 1],
mismatched pair ids and a task that needs rewards on data without them are errors naming the row and column;
empty responses and ties are dropped and counted in the manifest's report.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from alignpipe.batches.advantages import ADVANTAGES, EQUAL_GROUPS
from alignpipe.batches.tasks import TASKS
from alignpipe.core.command import (
    ConfigOpt,
    ForceOpt,
    OutOpt,
    handle_errors,
    resolved_config,
    say,
    up_to_date_line,
)
from alignpipe.core.errors import UserError
from alignpipe.feedback.pairing import PAIRINGS


@dataclass(frozen=True)
class BatchOptions:
    max_length: int = 1024
    max_prompt_length: int = 512
    batch_size: int | None = 8  # examples per batch, or None with max_tokens_per_batch
    max_tokens_per_batch: int | None = None  # budget on the padded size (sequences x longest)
    group_by_length: bool = True
    group_size: int = 50  # batches per length-sorted chunk
    seed: int = 0
    use_chat_template: bool = True
    mix: tuple[float, ...] | None = None  # proportions, one per input
    num_examples: int | None = None  # total when mixing (default: the most that needs no repeats)
    pairs: str = "best-worst"
    threshold: str = "median"
    advantage: str = "grpo"  # group task: advantage estimator spec
    equal_groups: str = "drop"  # group task: drop | keep groups whose rewards are all equal


# ------------------------------------------------------------------------------------------- pure core
def _output_row(ex: dict, batch_index: int, kind: str) -> dict:
    from alignpipe import schemas

    row = {}
    for col in schemas.columns(kind):
        name = col.name
        if name == "batch_index":
            row[name] = batch_index
        elif name == "weight":  # one weight per example: a pair's is the mean of its two responses'
            ws = [ex[f"response{k}_weight"] for k in (1, 2) if f"response{k}_weight" in ex]
            row[name] = sum(ws) / len(ws)
        elif name.endswith("_attention_mask"):
            row[name] = [1] * len(ex[name.replace("_attention_mask", "_input_ids")])
        else:
            row[name] = ex.get(name)  # reference log-probs stay null until cached
    return row


def build_batches(inputs: list[tuple], tokenizer, task: str, opts: BatchOptions):
    """(dataset of kind batches-<task>, report) from [(dataset, kind, name)] inputs."""
    from datasets import Dataset

    from alignpipe import schemas
    from alignpipe.batches import tasks, tokenise

    spec = tasks.task(task)
    tokenise.check_lengths(opts.max_length, opts.max_prompt_length)
    topts = tasks.TaskOptions(pairs=opts.pairs, threshold=opts.threshold, seed=opts.seed, advantage=opts.advantage,
                              equal_groups=opts.equal_groups)
    parts, report = [], {"task": task, "inputs": []}
    for ds, kind, where in inputs:
        examples, counts = tasks.make_examples(ds, kind, spec, where, topts)
        parts.append(examples)
        report["inputs"].append({"path": where, "kind": kind, "rows": len(ds), "examples": len(examples), **counts})
    examples, taken = tokenise.mix(parts, list(opts.mix) if opts.mix else None, opts.num_examples, opts.seed)
    if opts.mix:
        report["mix"] = {"proportions": list(opts.mix), "taken": taken}
    if not examples:
        why = "; ".join(f"{i['path']}: {i['rows']} rows" + "".join(f", {k} {v}" for k, v in i.items()
                                                             if k not in ("path", "kind", "rows", "examples"))
                        for i in report["inputs"])
        raise UserError(f"no {task} examples left from the inputs ({why}){_equal_groups_hint(report['inputs'])}")
    counts: Counter = Counter()
    tokenise.tokenise(examples, tokenizer, num_responses=spec.num_responses, max_length=opts.max_length,
                      max_prompt_length=opts.max_prompt_length, use_chat_template=opts.use_chat_template,
                      counts=counts)
    if spec.kind == "batches-group":
        from alignpipe.batches.group import trim_to_ids

        trim_to_ids(examples)
    lengths = [tokenise.sequence_lengths(ex, spec.num_responses) for ex in examples]
    batches = tokenise.make_batches(lengths, batch_size=opts.batch_size, max_tokens=opts.max_tokens_per_batch,
                                    group_by_length=opts.group_by_length, group_size=opts.group_size,
                                    seed=opts.seed)
    baseline = tokenise.random_batches([len(b) for b in batches], opts.seed)
    rows = [_output_row(examples[i], b, spec.kind) for b, batch in enumerate(batches) for i in batch]
    report.update({
        "examples": len(rows), "batches": len(batches), "prompts_truncated": counts["prompts_truncated"],
        "responses_truncated": counts["responses_truncated"],
        "padding_fraction": round(tokenise.padding_fraction(batches, lengths), 6),
        "padding_fraction_random": round(tokenise.padding_fraction(baseline, lengths), 6),
        "tokens": sum(map(sum, lengths)), "max_padded_tokens": tokenise.padded_tokens(batches[0], lengths),
    })
    return Dataset.from_list(rows, features=schemas.features(spec.kind)), report


def _equal_groups_hint(inputs: list[dict]) -> str:
    """What to do when the group task dropped every group for equal rewards (nothing to learn from)."""
    groups = sum(i.get("groups", 0) for i in inputs)
    if not groups or sum(i.get("equal_groups_dropped", 0) for i in inputs) < groups:
        return ""
    return (f": every one of the {groups} groups got the same reward for all its answers, so every advantage is 0; "
            "keep them with --equal-groups keep (a step that changes nothing), sample more answers per prompt "
            "(generate --num-samples), or use an easier split the policy sometimes solves")


def reference_logps(part, model, *, whole, start: int, groups, task: str, pad_id: int, dtype: str, device):
    """`part` (rows start.. of `whole`) with `response{k}_ref_logp` = summed log-probs of each response under
    `model`, computed exactly as train computes the policy's (`alignpipe.models.logprobs.batch_logps`): stored batch by
    stored batch (`groups`; a batch cut by the shard's edge is computed whole), collated as train collates it,
    under training's autocast for `dtype`. So with policy = reference train's first differences are exactly 0."""
    from datasets import Value

    from alignpipe.models import logprobs
    from alignpipe.training import micro_batches

    n, end = len(part), start + len(part)
    values: dict[int, list] = {1: [None] * n, 2: [None] * n}
    for _, rows in groups:
        if rows[-1] < start or rows[0] >= end:
            continue
        batch = micro_batches.collate_group(micro_batches.read_group(whole, rows, task, False), task, pad_id, device)
        logps = logprobs.batch_logps(model, batch, dtype=dtype, device=device).tolist()
        for j, row in enumerate(rows):
            if start <= row < end:
                values[1][row - start] = logps[j]
                values[2][row - start] = logps[len(rows) + j] if batch.paired else None
    for k in (1, 2) if task == "pairwise" else (1,):
        col = f"response{k}_ref_logp"
        part = part.remove_columns(col).add_column(col, values[k], feature=Value("float64"))
    return part


def group_reference_logps(part, model, *, pad_id: int, device):
    """`part` of a batches-group dataset with `response1_ref_logps`: per-token reference log-probs."""
    from alignpipe import schemas
    from alignpipe.models.logprobs import reference_token_logps

    values = reference_token_logps(model, list(part["prompt_input_ids"]), list(part["response1_input_ids"]),
                                   pad_id, device=device)
    feature = schemas.features("batches-group")["response1_ref_logps"]
    return part.remove_columns("response1_ref_logps").add_column("response1_ref_logps", values, feature=feature)


# --------------------------------------------------------------------------------------------- command
def _check_vocab(ds, model, num_responses: int, reference: Path, what: str = "--reference") -> None:
    size = model.get_input_embeddings().num_embeddings
    cols = ["prompt_input_ids"] + [f"response{k}_input_ids" for k in range(1, num_responses + 1)]
    top = max(max(ids, default=0) for c in cols for ids in ds[c])
    if top >= size:
        raise UserError(f"{what} {reference}: has {size} token embeddings but the tokenizer produced id {top}; "
                        f"use the {'reference' if what == '--reference' else 'same'} model's tokenizer")


def _options(batch_size, max_tokens_per_batch, mix, num_inputs, **kw) -> BatchOptions:
    from alignpipe.batches import tokenise

    if batch_size is not None and max_tokens_per_batch is not None:
        raise UserError("give --batch-size or --max-tokens-per-batch, not both")
    if kw["num_examples"] is not None and mix is None:
        raise UserError("--num-examples needs --mix (the proportions to split it by)")
    props = tokenise.parse_mix(mix, num_inputs)
    return BatchOptions(batch_size=None if max_tokens_per_batch else (batch_size or 8),
                        max_tokens_per_batch=max_tokens_per_batch, mix=tuple(props) if props else None, **kw)


_PAIRS_HELP = "Pairing of generations of one prompt: " + " | ".join(PAIRINGS.usage(n) for n in PAIRINGS) + "."


@handle_errors
def command(
    ctx: typer.Context,
    inputs: Annotated[list[Path], typer.Argument(help="weighted or annotations datasets (sft: also prompts, "
                                                      "generations).", show_default=False)],
    out: OutOpt,
    task: Annotated[str, typer.Option(help=" | ".join(f"{k}: {v.doc}" for k, v in TASKS.items()))] = "pairwise",
    tokenizer: Annotated[Path | None, typer.Option(help="Model/tokenizer folder (default: --reference).")] = None,
    chat_template: Annotated[Path | None, typer.Option(help="Jinja chat template file overriding the "
                                                               "tokenizer's.")] = None,
    no_chat_template: Annotated[bool, typer.Option("--no-chat-template", help="Plain prompts as raw text "
                                                   "(conversations still use the template).")] = False,
    max_length: Annotated[int, typer.Option(min=1, help="Max prompt + response tokens.")] = 1024,
    max_prompt_length: Annotated[int, typer.Option(min=1, help="Max prompt tokens (cut from the left).")] = 512,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Examples per batch [default: 8].")] = None,
    max_tokens_per_batch: Annotated[int | None, typer.Option(min=1, help="Token budget per batch on the padded size "
                                                                     "(instead of --batch-size).")] = None,
    group_by_length: Annotated[bool, typer.Option(help="Group similar lengths to cut padding.")] = True,
    group_size: Annotated[int, typer.Option(min=1, help="Batches per length-sorted chunk.")] = 50,
    seed: Annotated[int, typer.Option(help="Seed of shuffling, pairing and mixing.")] = 0,
    mix: Annotated[str | None, typer.Option(help="Proportions per input, e.g. 0.5,0.3,0.2.")] = None,
    num_examples: Annotated[int | None, typer.Option(min=1, help="Examples in all with --mix [default: the most "
                                                             "that repeats none].")] = None,
    pairs: Annotated[str, typer.Option(help=_PAIRS_HELP)] = "best-worst",
    threshold: Annotated[str, typer.Option(help="pointwise: reward above = desirable: median | mean | VALUE.")]
    = "median",
    advantage: Annotated[str, typer.Option(help="group: advantage estimator NAME[,key=value...]: "
                                                + " | ".join(ADVANTAGES) + ".")] = "grpo",
    equal_groups: Annotated[str, typer.Option(help="group: groups whose answers all got the same reward: drop "
                                                   "(counted; DAPO dynamic sampling) | keep.")] = "drop",
    reference: Annotated[Path | None, typer.Option(help="Reference model (folder or adapter): cache its "
                                                           "log-probs (pointwise, pairwise: summed; group: per "
                                                           "token, for a KL term).")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit) of Hub id "
                                                      "--tokenizer / --reference.")] = None,
    dtype: Annotated[str, typer.Option(help="Reference numerics, as train's --dtype: float32 | bfloat16 (autocast "
                                            "over float32 weights) | float16 (float16 weights).")] = "float32",
    device: Annotated[str, typer.Option(help="cpu | cuda | auto.")] = "auto",
    shard_size: Annotated[int, typer.Option(min=1, help="Examples per resumable reference shard.")] = 512,
    config: ConfigOpt = None,
    force: ForceOpt = False,
):
    """Tokenise, truncate, pair and batch feedback into training examples; optionally cache reference log-probs."""
    opts = _options(batch_size, max_tokens_per_batch, mix, len(inputs), max_length=max_length,
                    max_prompt_length=max_prompt_length, group_by_length=group_by_length, group_size=group_size,
                    seed=seed, use_chat_template=not no_chat_template, num_examples=num_examples, pairs=pairs,
                    threshold=threshold, advantage=advantage, equal_groups=equal_groups)
    tokenizer, reference = (_hub(m, revision) for m in (tokenizer, reference))
    say(run(inputs, out, task=task, opts=opts, tokenizer=tokenizer, chat_template=chat_template,
            reference=reference, dtype=dtype, device=device, shard_size=shard_size,
            config=resolved_config(ctx), force=force))


def _hub(model: Path | None, revision: str | None) -> Path | None:
    """A model named with --revision: org/name@revision (a local folder with --revision is an error)."""
    from alignpipe.models.loading import with_revision

    return None if model is None else Path(with_revision(model, revision))


def run(inputs: list[Path], out: Path, *, task: str, opts: BatchOptions, tokenizer: Path | None,
        chat_template: Path | None, reference: Path | None, dtype: str, device: str, 
        shard_size: int, config: dict, force: bool) -> str:
    """The stage around the core: checks, reading, the atomic output, the reference pass in resumable
    shards; returns what to print."""
    from alignpipe.batches import tasks
    from alignpipe.data.io import read_input
    from alignpipe.data.output import StageOutput, map_shards
    from alignpipe.models.loading import load_causal_lm, load_tokenizer

    spec = tasks.task(task)
    PAIRINGS.parse(opts.pairs, flag="--pairs")
    tasks.parse_threshold(opts.threshold)
    critic = _critic(opts.advantage, spec.kind)
    if opts.equal_groups not in EQUAL_GROUPS:
        raise UserError(f"--equal-groups '{opts.equal_groups}': choose from {', '.join(EQUAL_GROUPS)}")
    if reference is not None and spec.kind not in ("batches-pointwise", "batches-pairwise", "batches-group"):
        raise UserError(f"--reference: {spec.kind} has no reference log-prob columns (pointwise, pairwise, group "
                        "have)")
    if tokenizer is None and reference is None:
        raise UserError("--tokenizer MODEL is needed (or --reference MODEL, whose tokenizer is then used)")
    data = [(*read_input(p, spec.input_kinds, stage="build-batches"), str(p)) for p in inputs]
    tok_path = tokenizer or reference
    models = [tok_path] + ([reference] if reference is not None and reference != tok_path else [])
    models += [critic] if critic is not None else []
    template = [chat_template] if chat_template is not None else []
    so = StageOutput(out, stage="build-batches", kind=spec.kind, config=config,
                     inputs=list(inputs) + models + template, force=force)
    if so.up_to_date():
        return up_to_date_line("build-batches", out)
    tok = load_tokenizer(tok_path, chat_template=chat_template)
    with so:
        ds, so.report = build_batches(data, tok, task, opts)
        passes = []  # per-shard passes of models over the batches (resumable together)
        if reference is not None:
            from alignpipe.models import logprobs
            from alignpipe.training.micro_batches import batch_groups

            weights = "float32" if dtype == "bfloat16" else dtype  # bfloat16: training's autocast over float32
            model = load_causal_lm(reference, dtype=weights, device=device, what="reference model").eval()
            _check_vocab(ds, model, spec.num_responses, reference)
            dev, groups, whole = next(model.parameters()).device, batch_groups(ds), ds
            so.report["reference_numerics"] = logprobs.reference_numerics(dtype, dev, logprobs.use_shared_prompt(model))

            def shard(part, index):
                if spec.kind == "batches-group":
                    return group_reference_logps(part, model, pad_id=tok.pad_token_id, device=dev)
                return reference_logps(part, model, whole=whole, start=index * shard_size, groups=groups,
                                       task=spec.kind.removeprefix("batches-"), pad_id=tok.pad_token_id,
                                       dtype=dtype, device=dev)

            passes.append(shard)
        if critic is not None:
            passes.append(_critic_pass(ds, critic, tok.pad_token_id, dtype, device))
        if passes:
            ds = map_shards(so, ds, lambda part, index: _chain(passes, part, index), shard_size,
                            " + ".join((["reference log-probs"] if reference else []) + (["critic values"] if critic else [])))
        if critic is not None:
            from alignpipe.batches.gae import apply_gae

            ds, so.report["gae"] = apply_gae(ds, ADVANTAGES.parse(opts.advantage))
        so.finish(ds)
    return _report_lines(so.report, task, out)


def _critic(advantage: str, kind: str) -> Path | None:
    """The critic folder of `--advantage gae,critic=PATH` (checked before anything loads), else None."""
    from alignpipe.models.loading import check_model_folder

    spec = ADVANTAGES.parse(advantage)
    if not spec.component.meta.get("per_token"):
        return None
    if kind != "batches-group":
        raise UserError(f"--advantage '{advantage}': per-token advantages are for --task group")
    return check_model_folder(spec.kwargs["critic"], f"--advantage '{advantage}': critic")


def _critic_pass(ds, critic: Path, pad_id: int, dtype: str, device: str):
    """The per-shard pass of the critic: `response1_values` (alignpipe.batches.gae.value_shard)."""
    from alignpipe.batches.gae import value_shard
    from alignpipe.models.values import load_value_model

    weights = "float32" if dtype == "bfloat16" else dtype
    model, _ = load_value_model(critic, dtype=weights, device=device, pad_token_id=pad_id)
    model.eval()
    _check_vocab(ds, model, 1, critic, what="critic")
    dev = next(model.parameters()).device
    return lambda part, index: value_shard(part, model, pad_id=pad_id, device=dev)


def _chain(passes: list, part, index: int):
    for fn in passes:
        part = fn(part, index)
    return part


def _report_lines(r: dict, task: str, out: Path) -> str:
    lines = [f"build-batches: {r['examples']} {task} examples in {r['batches']} batches -> {out}",
             (f"padding: {r['padding_fraction']:.1%} length-grouped vs {r['padding_fraction_random']:.1%} random "
              f"batching; truncated: {r['prompts_truncated']} prompts, {r['responses_truncated']} responses")]
    for info in r["inputs"]:
        dropped = {k: v for k, v in info.items() if k not in ("path", "kind", "rows", "examples")}
        lines.append(f"  {info['path']}: {info['rows']} {info['kind']} rows -> {info['examples']} examples"
                     + (f" ({', '.join(f'{k} {v}' for k, v in dropped.items())})" if dropped else ""))
    if "gae" in r:
        g, ev = r["gae"], r["gae"]["explained_variance"]
        lines.append(f"gae: critic {g['critic']}: mean value {g['value_mean']:.4g}, mean return {g['return_mean']:.4g}, "
                     f"explained variance {'-' if ev is None else f'{ev:.3f}'}")
    return "\n".join(lines)
