"""The train stage's core: options -> a finished policy folder (or an up-to-date one), as one call.

`stages/train.py` is the thin command (options in, `train(...)`, one line out). This module resolves the loss
spec through the registry (`--loss dpo,beta=0.1`; `--beta` is a shorthand that goes through it), checks every
option before any model loads, picks the reference, loads the policy, and runs `alignpipe.training.loop.fit` inside
the stage's atomic output, with resume, several processes and the trackers of `--report-to`.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from alignpipe.core.command import up_to_date_line
from alignpipe.core.errors import UserError

BATCH_KINDS = ("batches-sft", "batches-reward", "batches-pointwise", "batches-pairwise", "batches-group")
REFERENCE_CHOICES = ("auto", "stored", "policy")


@dataclass
class TrainOptions:
    """Every option of `alignpipe train` (the command's parameters, by name)."""

    policy: Path
    loss: str
    beta: float | None = None
    reference: str = "auto"
    lr: float = 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    scheduler: str = "cosine"
    warmup_steps: int = 0
    schedule_steps: int | None = None
    continue_from: Path | None = None
    trainer_state: bool = True
    max_staleness: int | None = None
    proximal: bool = False
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    weight_normalization: str = "dataset"
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    seed: int = 0
    epochs: int = 1
    max_steps: int | None = None
    save_every: int = 0
    resume: bool = False
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)
    merge: bool = False
    init_reward_head: bool = False
    device: str = "auto"
    sharding: str = "auto"
    report_to: str = ""
    revision: str | None = None


def loss_spec(opts: TrainOptions, kind: str, batches: Path):
    """The parsed --loss (with the --beta shorthand), checked against the batches' kind."""
    from alignpipe.training.losses import LOSSES

    spec = LOSSES.parse(opts.loss, beta=opts.beta)
    if kind != f"batches-{spec.component.task}":
        raise UserError(f"{batches}: is a {kind} dataset but --loss {spec.name} trains on batches-"
                        f"{spec.component.task} (build them with `alignpipe build-batches --task "
                        f"{spec.component.task}`)")
    return spec


def check_options(o: TrainOptions) -> None:
    """Every cheap check, before anything is read or loaded."""
    from alignpipe.training.loop import SCHEDULERS, WEIGHT_NORMALIZATIONS

    if not o.lr > 0:
        raise UserError(f"--lr {o.lr}: must be > 0")
    limits = (("--grad-accum", o.grad_accum, 1), ("--epochs", o.epochs, 1), ("--warmup-steps", o.warmup_steps, 0),
              ("--save-every", o.save_every, 0), ("--max-steps", 1 if o.max_steps is None else o.max_steps, 1),
              ("--schedule-steps", 1 if o.schedule_steps is None else o.schedule_steps, 1),
              ("--max-staleness", 0 if o.max_staleness is None else o.max_staleness, 0))
    for name, v, low in limits:
        if v < low:
            raise UserError(f"{name} {v}: must be >= {low}")
    for name, beta in (("--adam-beta1", o.adam_beta1), ("--adam-beta2", o.adam_beta2)):
        if not 0 <= beta < 1:
            raise UserError(f"{name} {beta}: must be in [0, 1)")
    for flag, value, known in (("--dtype", o.dtype, ("float32", "bfloat16")), ("--scheduler", o.scheduler, SCHEDULERS),
                               ("--weight-normalization", o.weight_normalization, tuple(WEIGHT_NORMALIZATIONS))):
        if value not in known:
            raise UserError(f"{flag} '{value}': unknown (known: {', '.join(known)})")


def lora_options(o: TrainOptions, task: str):
    from alignpipe.models.loading import is_adapter
    from alignpipe.training.checkpoint import LoraOptions

    if o.lora_r is None:
        if o.target_modules or o.lora_alpha is not None:
            raise UserError("--lora-alpha/--target-modules need --lora-r")
        if o.merge and not is_adapter(o.policy):
            raise UserError("--merge: only a LoRA run (--lora-r, or an adapter --policy) has one to merge")
        return None
    if o.lora_r < 1:
        raise UserError(f"--lora-r {o.lora_r}: must be >= 1")
    if task in ("reward", "value") and not o.merge:
        raise UserError(f"--loss {task} with --lora-r: add --merge (annotate and build-batches load full "
                        f"{'reward models' if task == 'reward' else 'critics'})")
    return LoraOptions(o.lora_r, o.lora_alpha if o.lora_alpha is not None else 2.0 * o.lora_r, o.lora_dropout,
                       o.target_modules or None)


def choose_reference(choice: str, spec, stored: str, module, lora: bool):
    """The Reference to use: stored values, a frozen model, the adapter-disabled policy, or none."""
    from alignpipe.models.loading import load_causal_lm
    from alignpipe.training.checkpoint import frozen, frozen_copy, is_peft
    from alignpipe.training.loop import Reference

    if not spec.component.needs_reference:
        if choice != "auto":
            raise UserError(f"--reference {choice}: loss '{spec.name}' is reference-free")
        return Reference("none")
    if choice == "stored" and stored != "all":
        raise UserError("--reference stored: the batches carry no reference log-probs (response1_ref_logp); "
                        "rebuild them with `alignpipe build-batches --reference MODEL`, or drop --reference")
    if choice in ("auto", "stored") and stored == "all":
        return Reference("stored")
    if choice in ("auto", "policy"):
        return Reference("adapter") if lora or is_peft(module) else Reference("model", frozen_copy(module))
    return Reference("model", frozen(load_causal_lm(choice, what="reference")))


def group_reference(choice: str, spec, stored: str, batches: Path):
    """A policy-gradient loss with a KL term reads the per-token reference log-probs stored in the batches."""
    from alignpipe.training.loop import Reference

    if choice not in ("auto", "stored") or stored != "all":
        raise UserError(f"--loss {spec.text}: kl_coef > 0 needs the per-token reference log-probs stored in {batches} "
                        "(build-batches --task group --reference MODEL); --reference policy/MODEL is not supported "
                        "for policy-gradient losses")
    return Reference("stored")


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


def _metrics_log(so, history: list, report_to: tuple, config: dict):
    """The run's MetricsLog: TensorBoard as always, plus the trackers of --report-to."""
    from alignpipe.training.metrics import MetricsLog

    return MetricsLog(so.partial, history, report_to=report_to, run_name=None, config=config)


def train(batches: Path, out: Path, o: TrainOptions, *, config: dict, force: bool = False) -> str | None:
    """Pure core of the stage: the policy trained on `batches` into `out`; returns the line to print (None on
    ranks other than 0)."""
    import random

    import torch

    from alignpipe.data.io import read_input
    from alignpipe.data.output import StageOutput
    from alignpipe.models.loading import with_revision
    from alignpipe.training import checkpoint as ck
    from alignpipe.training import continuation as cont
    from alignpipe.training import loop as tr
    from alignpipe.training import micro_batches as td
    from alignpipe.training import proximal as prox
    from alignpipe.training import staleness as stale
    from alignpipe.training.noop import no_op_notes
    from alignpipe.training.trackers import parse as parse_trackers

    check_options(o)
    o.policy = Path(with_revision(o.policy, o.revision))  # a Hub id org/name[@revision] or a folder
    report_to = parse_trackers(o.report_to or "")
    ds, kind = read_input(batches, BATCH_KINDS, stage="train")
    spec = loss_spec(o, kind, batches)
    lag = stale.lags(batches, o.policy, len(ds))  # how many policies behind --policy the answers were sampled
    stale.check(lag, o.max_staleness, batches)
    model_task = spec.component.meta.get("model") or spec.component.task  # 'value': PPO's critic
    if model_task == "value":
        from alignpipe.training.value_loss import check_batches

        check_batches(ds, str(batches))
    lora = lora_options(o, model_task)
    dist = tr.init_distributed(o.device, o.sharding)
    ref_inputs = [Path(o.reference)] if o.reference not in REFERENCE_CHOICES else []
    ref_inputs += [Path(o.continue_from)] if o.continue_from is not None else []
    config = {**{k: v for k, v in config.items() if k != "beta"}, "loss": spec.identity()}  # --beta folded in
    so = StageOutput(out, stage="train", kind=None, inputs=[batches, o.policy] + ref_inputs, force=force,
                     config=config)
    if so.up_to_date():
        return up_to_date_line("train", out) if dist.rank == 0 else None

    def load():
        return ck.load_policy(o.policy, model_task, lora=lora, init_reward_head=o.init_reward_head,
                              gradient_checkpointing=o.gradient_checkpointing)

    prior = cont.read(o.continue_from) if o.continue_from is not None else None
    torch.manual_seed(o.seed)
    random.seed(o.seed)  # the RNG state a trainer state keeps: the same run, the same bytes
    module, tokenizer = load()
    if prior is not None:
        cont.check_fits(o.continue_from, prior, module)
    task = spec.component.task
    pg_kl = task == "group" and (spec.kwargs.get("kl_coef") or 0) > 0  # per-token reference, stored only
    use_stored = (spec.component.needs_reference or pg_kl) and o.reference in ("auto", "stored")
    stored = td.stored_reference_state(ds, task, str(batches)) if use_stored else "none"
    ref = group_reference(o.reference, spec, stored, batches) if pg_kl else \
        choose_reference(o.reference, spec, stored, module, lora is not None)
    numerics = reference_numerics(batches, ref, module, o.dtype, dist) if task != "group" else None
    td.check_rows(ds, task, str(batches), module.get_input_embeddings().num_embeddings,
                  stored_reference=ref.kind == "stored")
    groups = td.batch_groups(ds)
    plan = td.Plan(len(groups), o.grad_accum, o.epochs, o.max_steps)
    before = int(prior["step"]) if prior else 0
    schedule = schedule_steps(o, before, plan.total_steps)
    norm = tr.Normalization(o.weight_normalization, td.dataset_scale(ds, task, plan.steps_per_epoch))
    hparams = dict(spec.kwargs)
    prox.check(o.proximal, task, hparams, str(spec))
    if hparams.get("mean_tokens") == 0 and o.weight_normalization == "dataset":  # DAPO: the dataset's tokens
        hparams["mean_tokens"] = td.mean_answer_tokens(ds)
    run = tr.prepare(module, reference=ref, task=task, loss=spec.name, hparams=hparams, dist=dist,
                     normalization=norm, pad_id=tokenizer.pad_token_id, lr=o.lr, weight_decay=o.weight_decay,
                     scheduler=o.scheduler, warmup_steps=o.warmup_steps, total_steps=schedule,
                     dtype=o.dtype, max_grad_norm=o.max_grad_norm, betas=(o.adam_beta1, o.adam_beta2))
    _enter(so, dist)
    try:
        start, history, found = ck.resume(so.partial, run.module, run.optimizer, run.scheduler, rank=dist.rank,
                                          require=o.resume)
        if o.proximal:  # before the first step (kept in the partial folder: a resumed train reads it)
            run.proximal = prox.load_or_compute(run, ds, groups, ref.kind == "stored", so.partial)
        log = _metrics_log(so, history, report_to, config) if dist.rank == 0 else None
        continued = _continue(o, prior, run, found, schedule, say_it=log is not None)
        if log is not None and numerics and not numerics["match"]:
            from alignpipe.core.command import say

            say(f"train: note: {numerics['note']}")
        keep_state = o.trainer_state and not o.merge
        _fit(run, ds, groups, plan, so, log, o, start, found, td.describe(batches, ds, groups), spec, keep_state)
        final = tr.unsharded(run, lambda: load()[0])
        line = None
        if log is not None:
            report = {"loss": spec.name, "loss_spec": str(spec), "task": task, "hyperparameters": spec.kwargs,
                      "reference": ref.kind, "weight_normalization": norm.rule, "dataset_scale": norm.scale,
                      "processes": dist.world, "device": dist.device, "sharding": dist.sharding,
                      "save_every": o.save_every, "resumed_from_step": start or None,
                      "optimizer": cont.settings(o, schedule), "continued_from": continued,
                      "staleness": stale.summary(lag), "proximal": o.proximal,
                      **({"reference_numerics": numerics} if numerics else {}),
                      "no_op": no_op_notes(ds, policy_gradient=model_task == "group", history=log.history)}
            line = _finish(so, log, report, _saver(o, so, run, final, tokenizer, schedule, keep_state))
            line += f"; nothing learned: {'; '.join(report['no_op'])}" if report["no_op"] else ""
        dist.barrier()
        return line
    finally:
        if dist.rank == 0:
            so.__exit__(None, None, None)
        tr.shutdown(dist)


def schedule_steps(o: TrainOptions, before: int, steps: int) -> int:
    """The schedule's length over the whole run: --schedule-steps, or the steps so far plus this run's."""
    total = o.schedule_steps if o.schedule_steps is not None else before + steps
    if total < before + steps:
        raise UserError(f"--schedule-steps {total}: shorter than the run ({before} steps before this one, whose "
                        f"{steps} steps end at {before + steps})")
    return total


def _continue(o: TrainOptions, prior: dict | None, run, found, schedule: int, say_it: bool) -> dict | None:
    """--continue-from: the optimiser state of the previous policy restored (unless a checkpoint of this run
    already was), a changed setting said in one line; what the manifest records."""
    from alignpipe.core.command import say
    from alignpipe.training import continuation as cont

    if prior is None:
        return None
    if found is None:
        cont.restore(o.continue_from, run, run.dist.rank)
    changed = cont.changes(prior["settings"], cont.settings(o, schedule))
    if changed and say_it:
        say(f"train: optimiser settings changed from {o.continue_from}: {cont.describe(changed)}")
    return {"path": str(o.continue_from), "global_step": int(prior["step"]), "changed": changed}


def reference_numerics(batches: Path, ref, module, dtype: str, dist) -> dict | None:
    """With a stored reference: how it was computed (the batches' manifest), how this run computes the policy's
    log-probs, whether they agree and, if not, the one-line note train prints (None without a stored one)."""
    from alignpipe.data.manifest import read_manifest
    from alignpipe.models import logprobs

    if ref.kind != "stored":
        return None
    stored = ((read_manifest(batches) or {}).get("report") or {}).get("reference_numerics")
    used = logprobs.reference_numerics(dtype, dist.device, logprobs.use_shared_prompt(module, dist.world), dist.world)
    note = logprobs.numerics_mismatch(stored, used)
    return {"stored": stored, "train": used, "match": note is None, **({"note": note} if note else {})}


def _fit(run, ds, groups, plan, so, log, o: TrainOptions, start: int, found, about: str, spec,
         keep_state: bool) -> None:
    from alignpipe.core.command import say
    from alignpipe.core.progress import progress_bar
    from alignpipe.training import loop as tr

    d = run.dist
    if log is not None:
        say(f"train: {spec.identity()} ({run.task}), {about}; {plan.total_steps} steps, reference "
            f"{run.reference.kind}, weights normalised per {run.normalization.rule}, {d.world} process(es), "
            f"sharding {d.sharding}" + (f"; resuming after step {start}" if found else "")
            + f"; metrics: {so.out / 'metrics.jsonl'} at the end ({log.path} while it trains)")
    with progress_bar("train", total=plan.total_steps, done=start) as bar:
        def show(row):
            bar.advance(1)
            bar.progress.update(bar.task, rate=f"loss {row['loss']:.4f}, {row['tokens/s']:,.0f} tok/s")

        tr.fit(run, ds, groups, plan, start_step=start, log=log, partial=so.partial, save_every=o.save_every,
               on_step=show if log is not None else None, last_checkpoint=found, keep_state=keep_state)


def _saver(o: TrainOptions, so, run, final, tokenizer, schedule: int, keep_state: bool):
    """save(folder): the policy (alignpipe.training.checkpoint.save_policy) and, unless `keep_state` is off,
    its trainer_state/ from the run's last checkpoint (alignpipe.training.continuation)."""
    from alignpipe.data.manifest import TRAINER_STATE
    from alignpipe.training import checkpoint as ck
    from alignpipe.training import continuation as cont

    def save(folder: Path) -> str:
        if keep_state:
            cont.export(ck.latest_checkpoint(so.partial), folder / TRAINER_STATE, world=run.dist.world,
                        step=run.scheduler.last_epoch, settings_=cont.settings(o, schedule),
                        params=cont.shapes(run.module))
        return ck.save_policy(final, tokenizer, folder, base_path=_base(Path(o.policy)), merge=o.merge,
                              dtype=o.dtype)

    return save


def _base(policy: Path) -> Path:
    """The base model of the policy: itself, or the base named by its adapter_config.json."""
    from alignpipe.models.loading import adapter_base, is_adapter

    return Path(adapter_base(policy)) if is_adapter(policy) else policy


def _finish(so, log, report: dict, save) -> str:
    """Rank 0: the policy folder via `save(folder)`, the metrics beside it, the manifest with its report."""
    from alignpipe.training.metrics import summary

    log.close()
    so.report = {**report, **summary(log.history)}

    def write(folder: Path) -> None:
        so.report["output"] = save(folder)
        shutil.copy(log.path, folder / "metrics.jsonl")
        if (so.partial / "tb").is_dir():
            shutil.copytree(so.partial / "tb", folder / "tb")
        if (so.partial / "trackers.json").exists():
            shutil.copy(so.partial / "trackers.json", folder / "trackers.json")

    so.finish(write=write)
    return (f"train: {so.report['steps']} steps, final loss {log.history[-1]['loss']:.4f} -> {so.out} "
            f"({so.report['output']})")
