"""reweight: give every response a training weight (annotations -> weighted), the SampleReweighter.

    alignpipe reweight ANNOTATIONS --strategy margin:temperature=2 --strategy recency:decay=0.5 \\
        --combine product --clip 0.1,10 --normalize mean --drop-below 0.05 --out WEIGHTED

The strategies, their formulas and the order of post-processing live in `alignpipe.feedback.weights`. This module
holds the pure core (`reweight`: strategies -> combine -> clip -> normalise -> drop, plus the report) and
the thin command; the importance strategy's forward pass is `alignpipe.models.logprobs.response_logps`.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated

import typer

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
from alignpipe.feedback import weights as W

SHARD_ROWS = 512  # rows per checkpointed shard of the importance forward pass


# ------------------------------------------------------------------------------------------------ cores
def check(t: dict, specs: list) -> None:
    """Cheap checks of the rows against the data and every strategy (before any forward pass)."""
    W.validate_table(t)
    for s in specs:
        W.check_rows(s.name, t)


def _summary(values: list) -> dict:
    w = [v for v in values if v is not None]
    return {"mean": math.fsum(w) / len(w), "min": min(w), "max": max(w), "ess": W.weight_summary(w)["ess"]}


def reweight(ds, specs: list, *, combine: str = "product", clip: tuple = (None, None),
             normalize: str = "none", drop_below: float | None = None, current: tuple | None = None,
             where: str = "input"):
    """Pure core: annotations -> (weighted dataset, report).

    `current` = (current_logp1, current_logp2) from `alignpipe.models.logprobs.response_logps`, needed by importance strategies.
    Report: ess / ess_fraction / weight_mean / weight_min / weight_max over the example weights of the kept
    rows (a pair's = mean of its two), dropped rows, and per strategy the mean, min, max and ESS of its
    per-response weights (`importance_ess` repeats the importance strategy's)."""
    t = ds.to_dict()
    if current is not None:
        t["current_logp1"], t["current_logp2"] = list(current[0]), list(current[1])
    try:
        check(t, specs)
        per = {str(s): W.run_strategy(s, t) for s in specs}
        w = W.combine(list(per.values()), combine)
        W.check_weights(w, t, f"--combine {combine}")
    except UserError as e:
        raise UserError(f"{where}: {e}" if str(e).startswith("row ") else str(e)) from None
    w, zero = W.normalize(W.clip(w, *clip), normalize, t["prompt_id"])
    keep = W.keep_rows(w, drop_below)
    if not keep:
        raise UserError(f"--drop-below {drop_below}: every one of the {len(ds)} rows is below it; nothing is left")
    out = ds.add_column("response1_weight", w[0]).add_column("response2_weight", w[1])
    if len(keep) < len(ds):
        out = out.select(keep)
    report = _report(specs, per, [w[0][i] for i in keep], [w[1][i] for i in keep], len(ds), zero)
    report.update(combine=combine, clip=list(clip), normalize=normalize, drop_below=drop_below)
    return out, report


def _report(specs, per: dict, w1: list, w2: list, rows_in: int, zero_prompts: int) -> dict:
    ex = W.example_weights((w1, w2))
    final = W.weight_summary(ex)
    report = {"strategies": [str(s) for s in specs], "rows_in": rows_in, "rows_out": len(ex),
              "dropped": rows_in - len(ex), "weight_mean": math.fsum(ex) / len(ex), "weight_min": min(ex),
              "weight_max": max(ex), "ess": final["ess"], "ess_fraction": final["ess_fraction"],
              "zero_weight_prompts": zero_prompts,
              "per_strategy": {name: _summary(r[0] + r[1]) for name, r in per.items()}}
    importance = [str(s) for s in specs if s.name == "importance"]
    if importance:
        report["importance_ess"] = report["per_strategy"][importance[0]]["ess"]
    return report


# ---------------------------------------------------------------------------------------------- command
def parse_clip(text: str | None) -> tuple[float | None, float | None]:
    """`LO,HI` (either may be empty: open) -> (lo, hi)."""
    if text is None:
        return None, None
    parts = text.split(",")
    try:
        lo, hi = (float(p) if p.strip() else None for p in parts)
    except ValueError:
        raise UserError(f"--clip '{text}': expected LO,HI, two numbers (either may be empty), e.g. 0.1,10")
    if any(v is not None and not math.isfinite(v) for v in (lo, hi)) or (lo is not None and lo < 0) or (
            lo is not None and hi is not None and lo > hi):
        raise UserError(f"--clip '{text}': need finite 0 <= LO <= HI")
    return lo, hi


def _check_options(specs, combine: str, normalize: str, drop_below: float | None) -> list[str]:
    """Fail on bad options before reading anything; return the importance policy folder (at most one)."""
    if not specs:
        raise UserError(f"give at least one --strategy NAME[:ARG][,key=value...] (known: {', '.join(W.STRATEGIES)})")
    if combine not in W.COMBINE:
        raise UserError(f"--combine '{combine}': unknown (known: {', '.join(W.COMBINE)})")
    if normalize not in W.NORMALIZE:
        raise UserError(f"--normalize '{normalize}': unknown (known: {', '.join(W.NORMALIZE)})")
    if drop_below is not None and not (math.isfinite(drop_below) and drop_below >= 0):
        raise UserError(f"--drop-below {drop_below}: must be a finite number >= 0")
    policies = sorted({s.values["policy"] for s in specs if s.component.forward})
    if len(policies) > 1:
        raise UserError(f"--strategy importance: one current policy per run, found {', '.join(policies)}")
    return policies


def _function_files(specs) -> list[Path]:
    """Source files of user functions, so that editing one makes the output out of date."""
    files = []
    for s in specs:
        if s.name == "function":
            module = sys.modules.get(s.values["target"].partition(":")[0])
            if getattr(module, "__file__", None):
                files.append(Path(module.__file__))
    return files


def _forward(so, ds, policy: str, *, device: str, dtype: str, batch_size: int) -> tuple[list, list]:
    """The importance forward pass over checkpointed shards (a killed run resumes)."""
    from datasets import Dataset, Features, Value

    from alignpipe.data.output import map_shards
    from alignpipe.models.loading import load_causal_lm, load_tokenizer
    from alignpipe.models.logprobs import response_logps

    model = load_causal_lm(policy, dtype=dtype, device=device, what="importance policy")
    tok = load_tokenizer(policy)
    features = Features({"current_logp1": Value("float64"), "current_logp2": Value("float64")})

    def shard(part, index):
        c1, c2 = response_logps(part, model, tok, batch_size=batch_size, device=model.device)
        return Dataset.from_dict({"current_logp1": c1, "current_logp2": c2}, features=features)

    done = map_shards(so, ds, shard, SHARD_ROWS, "importance forward")
    return done["current_logp1"], done["current_logp2"]


def _strategy_help() -> str:
    return "NAME[:ARG][,key=value...], repeatable, one of:\n\n\b\n" + W.STRATEGIES.help_text()


@handle_errors
def command(
    ctx: typer.Context,
    annotations: Annotated[Path, typer.Argument(help="Annotations dataset (from annotate or import).")],
    out: OutOpt,
    strategy: Annotated[list[str] | None, typer.Option("--strategy", "-s", help=_strategy_help())] = None,
    combine: Annotated[str, typer.Option(help="How strategies compose per response: product | sum.")] = "product",
    clip: Annotated[str | None, typer.Option(help="Clip weights to LO,HI (before normalising).")] = None,
    normalize: Annotated[str, typer.Option(help="none | mean (mean 1 over the dataset) | per-prompt.")] = "none",
    drop_below: Annotated[float | None, typer.Option(
        help="Drop rows whose weight (a pair: both) is below X, after normalising; the count is reported.")] = None,
    device: Annotated[str, typer.Option(help="Importance forward: cpu | cuda | auto.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Importance forward: float32 | bfloat16 | float16.")] = "float32",
    batch_size: Annotated[int, typer.Option(help="Importance forward: sequences per forward pass.")] = 16,
    config: ConfigOpt = None,
    force: ForceOpt = False,
):
    """Give every response a training weight: strategies -> combine -> clip -> normalise -> drop."""
    say(run(annotations, out, strategies=strategy or [], combine=combine, clip=clip, normalize=normalize,
            drop_below=drop_below, device=device, dtype=dtype, batch_size=batch_size,
            config=resolved_config(ctx), force=force))


def run(annotations: Path, out: Path, *, strategies: list[str], combine: str, clip: str | None, normalize: str,
        drop_below: float | None, device: str, dtype: str, batch_size: int, config: dict, force: bool) -> str:
    """The stage around the core: parse and check, read, resumable importance forward, atomic output;
    returns the line to print."""
    from alignpipe.data.io import read_input
    from alignpipe.data.output import StageOutput
    from alignpipe.models.loading import check_model_folder

    specs = [W.STRATEGIES.parse(s) for s in strategies]
    policies = _check_options(specs, combine, normalize, drop_below)
    bounds = parse_clip(clip)
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be >= 1")
    for p in policies:
        check_model_folder(p, "importance policy")
    ds, _ = read_input(annotations, "annotations", stage="reweight")
    inputs = [annotations, *map(Path, policies), *_function_files(specs)]
    so = StageOutput(out, stage="reweight", kind="weighted", config=config, inputs=inputs, force=force)
    if so.up_to_date():
        return up_to_date_line("reweight", out)

    def core(current=None):
        return reweight(ds, specs, combine=combine, clip=bounds, normalize=normalize, drop_below=drop_below,
                        current=current, where=str(annotations))

    if policies:  # the rows must fit before the forward pass starts
        try:
            check(ds.to_dict(), specs)
        except UserError as e:
            raise UserError(f"{annotations}: {e}") from None
    result = None if policies else core()  # without a forward pass, fail before anything is written
    with so:
        if policies:
            result = core(_forward(so, ds, policies[0], device=device, dtype=dtype, batch_size=batch_size))
        so.report = {**result[1], **so.report}  # + resumed_shards of the forward pass
        so.finish(result[0])
    return _report_line(so.report, out)


def _report_line(r: dict, out: Path) -> str:
    spread = f"weight mean {r['weight_mean']:.4g} [{r['weight_min']:.4g}, {r['weight_max']:.4g}]"
    parts = [f"{r['rows_out']} rows", spread, f"ESS {r['ess']:.1f} ({100 * r['ess_fraction']:.0f}%)"]
    if "importance_ess" in r:
        parts.append(f"importance ESS {r['importance_ess']:.1f}")
    if r["drop_below"] is not None:
        parts.append(f"dropped {r['dropped']} rows below {r['drop_below']:g}")
    if r["zero_weight_prompts"]:
        parts.append(f"{r['zero_weight_prompts']} prompts with weight 0")
    return f"reweight: {', '.join(parts)} -> {out}"
