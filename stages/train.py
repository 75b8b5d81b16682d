"""train: batches -> the next policy (a model folder, a LoRA adapter folder, or a reward model).

    alignpipe train BATCHES --policy MODEL --loss NAME[,key=value...] --out POLICY [--lora-r R] [--reference ...]

`--loss dpo,beta=0.1`: a loss of the registry (`alignpipe.training.losses.LOSSES`, docs/components.md) with its
hyperparameters; `--beta` is TRL's shorthand for `,beta=`. The loss decides the batches it needs (its `task`):
sft, reward, pointwise (kto) or pairwise; one optimisation step reads one stored batch (`--grad-accum K`: K
consecutive ones). A weight counts the same in every step (`--weight-normalization`, alignpipe.training.loop).
The core is `alignpipe.training.train.train`; this module is the command.
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

One run across iterations: the output keeps the optimiser of its last step in `POLICY/trainer_state/` (AdamW
moments, schedule position, RNG; not part of the model, left out of fingerprints and of `--merge` outputs);
`--continue-from PREV` starts from it (the weights still come from `--policy`), so K trains over B1..BK are one
train over B1..BK (alignpipe.training.continuation). `--schedule-steps N`: the schedule over the whole run.
`--max-staleness N` refuses answers sampled more than N policies before `--policy` (alignpipe.training.staleness).

Exit codes: 0 done / up to date; 2 bad input; 1 a non-finite loss or gradient (the run stops, the last good
checkpoint stays) or an internal error. Several processes: run the same command under
`torchrun --nproc_per_node N` or `accelerate launch --config_file pipelines/accelerate/ddp.yaml`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from alignpipe.core.command import ConfigOpt, ForceOpt, OutOpt, handle_errors, resolved_config, say
from alignpipe.training.losses import LOSSES  # the table imports torch lazily: `--help` needs no torch

# how a run is carried out, not what it computes: left out of the config key, so changing them neither
# discards checkpoints nor makes a finished output stale (they are in the manifest's report)
RUN_ONLY = ("resume", "save_every", "device", "sharding", "report_to", "max_staleness")


def _loss_help() -> str:
    return "NAME[,key=value...], one of:\n\n\b\n" + LOSSES.help_text(lambda c: c.task)


@handle_errors
def command(
    ctx: typer.Context,
    batches: Annotated[Path, typer.Argument(help="batches-<task> dataset from `alignpipe build-batches`.")],
    out: OutOpt,
    policy: Annotated[Path, typer.Option(help="Model folder, adapter folder, or reward model to train; or a Hub "
                                              "id org/name[@revision].")],
    loss: Annotated[str, typer.Option(help=_loss_help())],
    beta: Annotated[float | None, typer.Option(help="Shorthand of --loss NAME,beta=X (TRL's flag) for the losses "
                                                    "that take beta.")] = None,
    reference: Annotated[str, typer.Option(help="auto | stored | policy | MODEL folder.")] = "auto",
    lr: Annotated[float, typer.Option(help="Peak learning rate of AdamW.")] = 1e-6,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (matrices only).")] = 0.0,
    adam_beta1: Annotated[float, typer.Option(help="AdamW beta1.")] = 0.9,
    adam_beta2: Annotated[float, typer.Option(help="AdamW beta2.")] = 0.999,
    scheduler: Annotated[str, typer.Option(help="cosine | linear | constant (after warm-up).")] = "cosine",
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps.")] = 0,
    schedule_steps: Annotated[int | None, typer.Option(help="Length of the schedule in optimiser steps over the "
                                                            "whole run, continued iterations included [default: "
                                                            "the steps so far plus this run's].")] = None,
    continue_from: Annotated[Path | None, typer.Option(help="A policy written by train: continue its optimiser "
                                                            "(AdamW moments, schedule position, RNG) from its "
                                                            "trainer_state/; the weights still come from "
                                                            "--policy.")] = None,
    trainer_state: Annotated[bool, typer.Option(help="Save the optimiser state in POLICY/trainer_state/ for "
                                                     "--continue-from (not with --merge).")] = True,
    max_staleness: Annotated[int | None, typer.Option(help="Refuse answers sampled more than N policies before "
                                                           "--policy (overlapped iterations; the lag of each "
                                                           "answer goes in the manifest).")] = None,
    proximal: Annotated[bool, typer.Option(help="Decoupled PPO (AReaL): clip each token's ratio against the "
                                                "policy as this train starts, pi_prox (log-probs computed once "
                                                "before the first step), not the sampler's mu, and weight it by "
                                                "sg(min(pi_prox/mu, tis_cap)): for stale answers (OFF_POLICY). "
                                                "A group loss with tis_cap > 0.")] = False,
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
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps.")] = None,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps (0: never).")] = 0,
    resume: Annotated[bool, typer.Option(help="Insist on a checkpoint to resume from (resuming is "
                                              "automatic).")] = False,
    lora_r: Annotated[int | None, typer.Option(help="Train a LoRA adapter of this rank.")] = None,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA alpha [default: 2 r].")] = None,
    lora_dropout: Annotated[float, typer.Option(help="LoRA dropout.")] = 0.0,
    target_modules: Annotated[list[str] | None, typer.Option(help="LoRA target module (repeatable) "
                                                                  "[default: all linear layers].")] = None,
    merge: Annotated[bool, typer.Option(help="With LoRA: write merged full weights.")] = False,
    init_reward_head: Annotated[bool, typer.Option(help="--loss reward from a causal LM: add a new score "
                                                        "head.")] = False,
    device: Annotated[str, typer.Option(help="cpu | cuda | auto.")] = "auto",
    sharding: Annotated[str, typer.Option(help="Several processes: none (DDP) | grad-op (ZeRO-2) | full "
                                               "(ZeRO-3) | auto (accelerate launch's config).")] = "auto",
    revision: Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit) of a Hub id "
                                                      "--policy.")] = None,
    report_to: Annotated[str, typer.Option(help="Trackers besides TensorBoard, comma list: tensorboard, wandb, "
                                                "mlflow, trackio.")] = "",
    config: ConfigOpt = None,
    force: ForceOpt = False,
):
    """Train the policy on batches with a loss of the registry; write the next policy folder."""
    from alignpipe.training.train import TrainOptions, train

    opts = TrainOptions(**{k: v for k, v in ctx.params.items() if k in TrainOptions.__dataclass_fields__})
    opts.target_modules = list(target_modules or [])
    line = train(batches, out, opts, config=resolved_config(ctx, drop=("force", "config", "out") + RUN_ONLY),
                 force=force)
    if line:
        say(line)
