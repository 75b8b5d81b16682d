"""train: batches -> the next policy (a model folder, a LoRA adapter folder, or a reward model).

    alignpipe train BATCHES --policy MODEL --loss LOSS --out POLICY [--lora-r R] [--reference ...]

The loss decides the batches it needs (`alignpipe.losses.LOSSES[name].task`): sft, reward, pointwise (kto)
or pairwise; one optimisation step reads one stored batch (`--grad-accum K`: K consecutive ones).
Reference log-probs (losses that need them), `--reference`: auto = the batches' cached `response*_ref_logp`
when every row has them, else the initial policy (a frozen copy; with LoRA, or an adapter --policy, the
policy with its adapter disabled, so the base model); stored = insist on the cached values; policy = the
initial policy even when values are cached; MODEL = a frozen reference model folder.
The reward loss trains a 1-output sequence classifier (`--policy` a reward model, or a causal LM with
`--init-reward-head`); its score is the model's output at the last non-pad token.

Progress: `.POLICY.partial/metrics.jsonl` (and `tb/` TensorBoard events) grow step by step; checkpoints go to
`.POLICY.partial/checkpoint-STEP/` every `--save-every` steps. A rerun with the same inputs and options
resumes from the newest checkpoint and continues exactly (`--resume` insists that one exists). The output
folder appears whole at the end with its manifest, `metrics.jsonl` and `tb/`.

Exit codes: 0 done / up to date; 2 bad input; 1 a non-finite loss or gradient (the run stops, the last good
checkpoint stays) or an internal error. Several processes: run the same command under
`torchrun --nproc_per_node N` or `accelerate launch --config_file pipelines/accelerate/ddp.yaml`.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Optional

import typer

from alignpipe.cli_common import ConfigOpt, ForceOpt, OutOpt, handle_errors, resolved_config, say, up_to_date_message
from alignpipe.errors import UserError

# the names of alignpipe.losses.LOSSES (kept here so that `--help` needs no torch; a test checks they agree)
from alignpipe.losses import LOSSES  # noqa: E402  (the table imports torch lazily)

LOSS_NAMES = tuple(LOSSES)
BATCH_KINDS = ("batches-sft", "batches-reward", "batches-pointwise", "batches-pairwise")
# how a run is carried out, not what it computes: left out of the config key, so changing them neither
# discards checkpoints nor makes a finished output stale (they are in the manifest's report)
RUN_ONLY = ("resume", "save_every", "device", "sharding")


def _hp(losses: str) -> str:
    return f"Loss hyperparameter of {losses} [default: the loss's own]."


def _hparams(loss: str, given: dict) -> dict:
    """The hyperparameters given on the command line, refusing those the loss does not take."""
    from alignpipe.losses import hyperparameters

    accepted = hyperparameters(loss)
    for name, value in given.items():
        if value is not None and name not in accepted:
            takes = ", ".join("--" + n.replace("_", "-") for n in accepted) or "none"
            raise UserError(f"--{name.replace('_', '-')}: loss '{loss}' does not take it (it takes: {takes})")
    return {k: v for k, v in given.items() if v is not None}


def _loss_spec(loss: str, kind: str, batches: Path):
    from alignpipe.losses import LOSSES

    if loss not in LOSSES:
        raise UserError(f"--loss '{loss}': unknown (known: {', '.join(LOSSES)})")
    spec = LOSSES[loss]
    if kind != f"batches-{spec.task}":
        raise UserError(f"{batches}: is a {kind} dataset but --loss {loss} trains on batches-{spec.task} "
                        f"(build them with `alignpipe build-batches --task {spec.task}`)")
    return spec


def _reference(choice: str, spec, loss: str, stored: str, module, lora: bool):
    """The Reference to use: stored values, a frozen model, the adapter-disabled policy, or none."""
    from alignpipe.checkpoint import frozen, frozen_copy, is_peft
    from alignpipe.models import load_causal_lm
    from alignpipe.trainer import Reference

    if not spec.needs_reference:
        if choice != "auto":
            raise UserError(f"--reference {choice}: loss '{loss}' is reference-free")
        return Reference("none")
    if choice == "stored" and stored != "all":
        raise UserError("--reference stored: the batches carry no reference log-probs (response1_ref_logp); "
                        "rebuild them with `alignpipe build-batches --reference MODEL`, or drop --reference")
    if choice in ("auto", "stored") and stored == "all":
        return Reference("stored")
    if choice in ("auto", "policy"):
        return Reference("adapter") if lora or is_peft(module) else Reference("model", frozen_copy(module))
    return Reference("model", frozen(load_causal_lm(choice, what="reference")))


def _lora(lora_r, lora_alpha, lora_dropout, target_modules, merge: bool, policy: Path, task: str):
    from alignpipe.checkpoint import LoraOptions

    if lora_r is None:
        if target_modules or lora_alpha is not None:
            raise UserError("--lora-alpha/--target-modules need --lora-r")
        if merge and not (policy / "adapter_config.json").exists():
            raise UserError("--merge: only a LoRA run (--lora-r, or an adapter --policy) has one to merge")
        return None
    if lora_r < 1:
        raise UserError(f"--lora-r {lora_r}: must be >= 1")
    if task == "reward" and not merge:
        raise UserError("--loss reward with --lora-r: add --merge (annotate loads full reward models)")
    return LoraOptions(lora_r, lora_alpha if lora_alpha is not None else 2.0 * lora_r, lora_dropout,
                       target_modules or None)


def _check_options(lr, grad_accum, epochs, max_steps, warmup_steps, save_every, dtype) -> None:
    if not lr > 0:
        raise UserError(f"--lr {lr}: must be > 0")
    limits = (("--grad-accum", grad_accum, 1), ("--epochs", epochs, 1), ("--warmup-steps", warmup_steps, 0),
              ("--save-every", save_every, 0), ("--max-steps", 1 if max_steps is None else max_steps, 1))
    for name, v, low in limits:
        if v < low:
            raise UserError(f"{name} {v}: must be >= {low}")
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"--dtype '{dtype}': unknown (known: float32, bfloat16)")


def _enter(so, dist) -> None:
    """Rank 0 takes the lock and opens the partial folder; every rank learns whether that worked."""
    error = None
    if dist.rank == 0:
        try:
            so.__enter__()
        except UserError as e:
            error = e
    if dist.world > 1:
        import torch.distributed as tdist

        box = [str(error) if error else None]
        tdist.broadcast_object_list(box, src=0)
        if box[0] and error is None:
            raise UserError(box[0])
    if error:
        raise error


@handle_errors
def command(
    ctx: typer.Context,
    batches: Annotated[Path, typer.Argument(help="batches-<task> dataset from `alignpipe build-batches`.")],
    out: OutOpt,
    policy: Annotated[Path, typer.Option(help="Model folder, adapter folder, or reward model to train.")],
    loss: Annotated[str, typer.Option(help=" | ".join(LOSS_NAMES))],
    reference: Annotated[str, typer.Option(help="auto | stored | policy | MODEL folder.")] = "auto",
    beta: Annotated[Optional[float], typer.Option(help=_hp("dpo, cdpo, robust-dpo, kto (0.1), simpo (2.0)"))] = None,
    label_smoothing: Annotated[Optional[float], typer.Option(help=_hp("cdpo, robust-dpo (0.1)"))] = None,
    tau: Annotated[Optional[float], typer.Option(help=_hp("ipo (0.1)"))] = None,
    length_normalize: Annotated[Optional[bool], typer.Option(help=_hp("ipo (off)"))] = None,
    delta: Annotated[Optional[float], typer.Option(help=_hp("slic (1.0)"))] = None,
    lam: Annotated[Optional[float], typer.Option(help=_hp("slic, orpo (0.1)"))] = None,
    gamma: Annotated[Optional[float], typer.Option(help=_hp("simpo (0.5)"))] = None,
    desirable_weight: Annotated[Optional[float], typer.Option(help=_hp("kto (1.0)"))] = None,
    undesirable_weight: Annotated[Optional[float], typer.Option(help=_hp("kto (1.0)"))] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate of AdamW.")] = 1e-6,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (matrices only).")] = 0.0,
    scheduler: Annotated[str, typer.Option(help="cosine | linear | constant (after warm-up).")] = "cosine",
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps.")] = 0,
    grad_accum: Annotated[int, typer.Option(help="Stored batches per optimisation step.")] = 1,
    max_grad_norm: Annotated[float, typer.Option(help="Gradient clipping norm (0: no clipping).")] = 1.0,
    weight_normalization: Annotated[str, typer.Option(help="dataset: a step's loss is sum w*l / (nominal examples "
                                                           "per step x the dataset's mean weight), so a weight "
                                                           "counts the same in every step | step: sum w*l / the "
                                                           "step's total weight.")] = "dataset",
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 (autocast, float32 master weights; the "
                                            "output is saved in this dtype).")] = "float32",
    gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute activations in backward.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of LoRA / head initialisation and dropout.")] = 0,
    epochs: Annotated[int, typer.Option(help="Passes over the batches.")] = 1,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many steps.")] = None,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps (0: never).")] = 0,
    resume: Annotated[bool, typer.Option(help="Insist on a checkpoint to resume from (resuming is "
                                              "automatic).")] = False,
    lora_r: Annotated[Optional[int], typer.Option(help="Train a LoRA adapter of this rank.")] = None,
    lora_alpha: Annotated[Optional[float], typer.Option(help="LoRA alpha [default: 2 r].")] = None,
    lora_dropout: Annotated[float, typer.Option(help="LoRA dropout.")] = 0.0,
    target_modules: Annotated[Optional[list[str]], typer.Option(help="LoRA target module (repeatable) "
                                                                     "[default: all linear layers].")] = None,
    merge: Annotated[bool, typer.Option(help="With LoRA: write merged full weights.")] = False,
    init_reward_head: Annotated[bool, typer.Option(help="--loss reward from a causal LM: add a new score "
                                                        "head.")] = False,
    device: Annotated[str, typer.Option(help="cpu | cuda | auto.")] = "auto",
    sharding: Annotated[str, typer.Option(help="Several processes: none (DDP) | grad-op (ZeRO-2) | full "
                                               "(ZeRO-3) | auto (accelerate launch's config).")] = "auto",
    config: ConfigOpt = None,
    force: ForceOpt = False,
):
    """Train the policy on batches with a loss of the table; write the next policy folder."""
    import torch

    from alignpipe import checkpoint as ck
    from alignpipe import train_data as td
    from alignpipe import trainer as tr
    from alignpipe.io import read_input
    from alignpipe.metrics import MetricsLog
    from alignpipe.output import StageOutput
    from alignpipe.progress import progress_bar

    ds, kind = read_input(batches, BATCH_KINDS, stage="train")
    spec = _loss_spec(loss, kind, batches)
    hparams = _hparams(loss, {"beta": beta, "label_smoothing": label_smoothing, "tau": tau, "delta": delta,
                              "lam": lam, "length_normalize": length_normalize, "gamma": gamma,
                              "desirable_weight": desirable_weight, "undesirable_weight": undesirable_weight})
    _check_options(lr, grad_accum, epochs, max_steps, warmup_steps, save_every, dtype)
    lora = _lora(lora_r, lora_alpha, lora_dropout, target_modules, merge, policy, spec.task)
    dist = tr.init_distributed(device, sharding)
    ref_inputs = [Path(reference)] if reference not in ("auto", "stored", "policy") else []
    so = StageOutput(out, stage="train", kind=None, inputs=[batches, policy] + ref_inputs, force=force,
                     config=resolved_config(ctx, drop=("force", "config", "out") + RUN_ONLY))
    if so.up_to_date():
        return up_to_date_message("train", out) if dist.rank == 0 else None

    def load():
        return ck.load_policy(policy, spec.task, lora=lora, init_reward_head=init_reward_head,
                              gradient_checkpointing=gradient_checkpointing)

    torch.manual_seed(seed)
    module, tokenizer = load()
    use_stored = spec.needs_reference and reference in ("auto", "stored")
    stored = td.stored_reference_state(ds, spec.task, str(batches)) if use_stored else "none"
    ref = _reference(reference, spec, loss, stored, module, lora is not None)
    vocab = module.get_input_embeddings().num_embeddings
    td.check_rows(ds, spec.task, str(batches), vocab, stored_reference=ref.kind == "stored")
    groups = td.batch_groups(ds)
    plan = td.Plan(len(groups), grad_accum, epochs, max_steps)
    norm = tr.Normalization(weight_normalization, td.dataset_scale(ds, spec.task, plan.steps_per_epoch))
    run = tr.prepare(module, reference=ref, task=spec.task, loss=loss, hparams=hparams, dist=dist, normalization=norm,
                     pad_id=tokenizer.pad_token_id, lr=lr, weight_decay=weight_decay, scheduler=scheduler,
                     warmup_steps=warmup_steps, total_steps=plan.total_steps, dtype=dtype,
                     max_grad_norm=max_grad_norm)
    _enter(so, dist)
    try:
        start, history, found = ck.resume(so.partial, run.module, run.optimizer, run.scheduler, rank=dist.rank,
                                          require=resume)
        log = MetricsLog(so.partial, history) if dist.rank == 0 else None
        if log is not None:
            say(f"train: {loss} ({spec.task}), {td.describe(batches, ds, groups)}; {plan.total_steps} steps, "
                f"reference {ref.kind}, {dist.world} process(es), sharding {dist.sharding}"
                + (f"; resuming after step {start}" if found else "") + f"; metrics: {log.path}")
        with progress_bar("train", total=plan.total_steps, done=start) as bar:
            def show(row):
                bar.advance(1)
                bar.progress.update(bar.task, rate=f"loss {row['loss']:.4f}, {row['tokens/s']:,.0f} tok/s")

            tr.fit(run, ds, groups, plan, start_step=start, log=log, partial=so.partial,
                   save_every=save_every, on_step=show if log is not None else None, last_checkpoint=found)
        final = tr.unsharded(run, lambda: load()[0])
        if log is not None:
            report = {"loss": loss, "task": spec.task, "hyperparameters": hparams, "reference": ref.kind,
                      "weight_normalization": norm.rule, "dataset_scale": norm.scale,
                      "processes": dist.world, "device": dist.device, "sharding": dist.sharding,
                      "save_every": save_every, "resumed_from_step": start or None}
            _finish(so, log, report, lambda folder: ck.save_policy(
                final, tokenizer, folder, base_path=_base(policy), merge=merge, dtype=dtype))
        dist.barrier()
    finally:
        if dist.rank == 0:
            so.__exit__(None, None, None)
        tr.shutdown(dist)


def _base(policy: Path) -> Path:
    """The base model of the policy: itself, or the base named by its adapter_config.json."""
    from alignpipe.models import adapter_base, is_adapter

    return Path(adapter_base(policy)) if is_adapter(policy) else policy


def _finish(so, log, report: dict, save) -> None:
    """Rank 0: the policy folder via `save(folder)`, the metrics beside it, the manifest with its report."""
    from alignpipe.metrics import summary

    log.close()
    so.report = {**report, **summary(log.history)}

    def write(folder: Path) -> None:
        so.report["output"] = save(folder)
        shutil.copy(log.path, folder / "metrics.jsonl")
        if (so.partial / "tb").is_dir():
            shutil.copytree(so.partial / "tb", folder / "tb")

    so.finish(write=write)
    say(f"train: {so.report['steps']} steps, final loss {log.history[-1]['loss']:.4f} -> {so.out} "
        f"({so.report['output']})")
