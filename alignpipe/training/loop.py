"""The training loop as small functions over one `Run` (a plain record of what a step needs).

A step: forward (chosen and rejected concatenated), reference log-probs, loss from `alignpipe.training.losses`,
backward, gradient clipping, AdamW, schedule, metrics. Not a `transformers.Trainer`.

What a weight means (`--weight-normalization`). A loss returns, for micro-batch m, the weighted SUM
S_m = sum_{i in m} w_i l_i (`alignpipe.training.losses`). A step covers micro-batches 1..k (k = --grad-accum stored
batches) on each of P processes, and its objective is L = sum_{i in step} w_i l_i / D, where

    dataset (default)  D = n_bar * w_bar = (sum of every example weight of the batches) / (steps per epoch):
                       the nominal examples per step (N / steps per epoch) times the mean example weight over
                       the whole training dataset, computed once from the batches (`train_data.dataset_scale`).
                       D is the same for every step, so an example of weight w counts w times wherever it
                       lands: halving every weight of one batch halves that step's update; a step of near-ties
                       weighted 0.05 moves the model 60 times less than one of sure pairs weighted 3.
    step               D = W = the step's own total weight (the rule before 0.3): each step is a weighted mean,
                       so scaling every weight of a step changes nothing; weights only matter within a step.

Exactly what holds, for gradients at fixed parameters (the first-order effect of training):
    weight 0 == absent      both rules, step by step: a weight-0 example adds nothing to S_m, to W or to the
                            dataset's total weight (D = total weight / steps does not depend on N).
    weight 2 == written twice
                            dataset: over an epoch, wherever the copy lands (same batch or another one): the
                            sum of the step gradients is grad sum_i w_i l_i / D, with the same D for both
                            datasets (same total weight, same number of steps); step by step when the copy
                            is in the same step.
                            step: only when the copy lands in the same step (then W is the same); in another
                            step the copy is divided by that step's total weight instead, so the epoch's
                            gradients differ in general.
Each micro-batch is back-propagated as S_m * P / D: DDP (and FSDP) average gradients over processes, so the
all-reduced gradient is exactly grad L, what one process gets from the whole step as one micro-batch (W and
D are known to every rank, which reads the whole global batch). Metrics are weighted means over the step
whatever the rule (sum of (W_m / W) * metric_m, W_m this rank's weight in micro-batch m). Batch statistics
inside a loss (KTO's reference point z0) are per stored batch, all-reduced over the processes.

Host reads: a step reads the device once, for its logged metrics and the gradient norm together (the
divergence check uses the same numbers); weights, counts and D are Python numbers from the batch lists.

Several processes (DDP, FSDP2): `alignpipe.training.distributed`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from alignpipe.core.errors import UserError
from alignpipe.training.distributed import (  # noqa: F401  (re-exported: the trainer's callers use them from here)
    SHARDING,
    Dist,
    init_distributed,
    no_sync,
    shard,
    sharding_mode,
    shutdown,
    unsharded,
)

SCHEDULERS = ("cosine", "linear", "constant")
# the denominator D of a step's objective sum_i w_i l_i / D, from (dataset scale, the step's total weight)
WEIGHT_NORMALIZATIONS = {"dataset": lambda scale, step_weight: scale, "step": lambda scale, step_weight: step_weight}


class TrainingDiverged(UserError):
    """A non-finite loss or gradient norm. Exit code 1: the inputs were valid, the optimisation failed."""

    exit_code = 1


# ------------------------------------------------------------------------------------------- the run
@dataclass(frozen=True)
class Normalization:
    """The denominator of a step's objective (module docstring): rule 'dataset' (D = `scale`, the nominal
    examples per step times the dataset's mean example weight) or 'step' (D = the step's total weight)."""

    rule: str = "dataset"
    scale: float = 1.0

    def __post_init__(self):
        if self.rule not in WEIGHT_NORMALIZATIONS:
            raise UserError(f"--weight-normalization '{self.rule}': unknown (known: "
                            f"{', '.join(WEIGHT_NORMALIZATIONS)})")

    def denominator(self, step_weight: float) -> float:
        return WEIGHT_NORMALIZATIONS[self.rule](self.scale, step_weight)


@dataclass
class Reference:
    """Where reference log-probs come from: 'stored' (batch columns), 'model' (a frozen model), 'adapter'
    (the policy with its LoRA adapter disabled) or 'none' (reference-free loss)."""

    kind: str
    model: object = None


@dataclass
class Run:
    model: object  # forward/backward go through it (the DDP wrapper, or the FSDP-sharded module)
    module: object  # the bare model (a PeftModel with LoRA): saving, checkpoints, adapter-disabled reference
    optimizer: object
    scheduler: object
    reference: Reference
    task: str
    loss: str
    hparams: dict
    pad_id: int
    dist: Dist
    normalization: Normalization
    dtype: str = "float32"
    max_grad_norm: float = 1.0
    proximal: dict | None = None  # batch_index -> log pi_prox per token (train --proximal: alignpipe.training.proximal)


def trainable(module) -> list:
    return [p for p in module.parameters() if p.requires_grad]


def build_optimizer(module, lr: float, weight_decay: float, fused: bool = True, betas=(0.9, 0.999)):
    """AdamW (betas as given); weight decay on matrices only (not on biases and norm scales). The fused kernel
    (one pass per tensor; on CPU 4x faster than the per-tensor loop for SmolLM2-135M) unless `fused` is off
    (sharded parameters) or this torch lacks it for the device."""
    import torch

    params = trainable(module)
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if fused:
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=True)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))


def lr_factor(step: int, kind: str, warmup: int, total: int) -> float:
    """Multiplier of --lr at 0-based `step`: linear warm-up (step+1)/(warmup+1), then cosine/linear decay
    towards 0 at `total` (never 0 on a step that trains), or constant."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - progress
    return 1.0


def build_scheduler(optimizer, kind: str, warmup: int, total: int):
    import torch

    if kind not in SCHEDULERS:
        raise UserError(f"--scheduler '{kind}': unknown (known: {', '.join(SCHEDULERS)})")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, kind, warmup, total))


def prepare(module, *, reference: Reference, task: str, loss: str, hparams: dict, pad_id: int, dist: Dist,
            normalization: Normalization, lr: float, weight_decay: float, scheduler: str, warmup_steps: int,
            total_steps: int, dtype: str = "float32", max_grad_norm: float = 1.0, betas=(0.9, 0.999)) -> Run:
    """Move the policy to its device, wrap it (DDP) or shard it (FSDP2), build optimizer and schedule."""
    module.to(dist.device).train()
    if reference.model is not None:
        reference.model.to(dist.device)
    model = module
    if dist.sharded:
        model = module = shard(module, reshard_after_forward=dist.sharding == "full")
    elif dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [dist.device] if dist.device.startswith("cuda") else None
        model = DistributedDataParallel(module, device_ids=ids)
    optimizer = build_optimizer(module, lr, weight_decay, fused=not dist.sharded, betas=betas)
    sched = build_scheduler(optimizer, scheduler, warmup_steps, total_steps)
    return Run(model, module, optimizer, sched, reference, task, loss, hparams, pad_id, dist, normalization,
               dtype, max_grad_norm)


# ----------------------------------------------------------------------------------------- forwards
def _autocast(run: Run):
    from alignpipe.models.logprobs import autocast

    return autocast(run.dist.device, run.dtype)


def _tensors(batch) -> dict:
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
            "response_mask": batch.response_mask}


def _logps(run: Run, model, batch):
    """Summed response log-probs and lengths, as `alignpipe.models.logprobs.summed_logps` computes them (the same
    calls build-batches' reference pass makes): the prompt computed once for both answers of a pair where
    `use_shared_prompt` says it pays (decided on the policy, for the policy and a live reference alike)."""
    from alignpipe.models.logprobs import summed_logps, use_shared_prompt

    return summed_logps(model, _tensors(batch), batch.shared, use_shared_prompt(run.module, run.dist.world))


def policy_outputs(run: Run, batch):
    """(values, lengths), each (N,): summed response log-probs, or reward scores for the reward task (the
    score at the last non-pad token, the model's own pooling). One forward over all N sequences."""
    with _autocast(run):
        if run.task == "reward":
            out = run.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            return out.logits[:, 0].float(), batch.response_mask.sum(-1).float()
        logps, lengths = _logps(run, run.model, batch)
    return logps, lengths.float()


def token_inputs(run: Run, batch, old_logp=None):
    """The group task's TokenInputs: the policy's per-token log-probs and entropies of the sampled answers (one
    forward), with their stored behaviour (and reference) log-probs and advantages, and pi_prox's log-probs
    (`old_logp`) under `train --proximal`."""
    from alignpipe.models.logprobs import response_token_logps
    from alignpipe.training.policy_gradient import TokenInputs

    fields = batch.group
    with _autocast(run):
        logp, mask, entropy = response_token_logps(run.model, _tensors(batch), with_entropy=True)
    return TokenInputs(logp=logp, behaviour_logp=fields["behaviour"], mask=mask, advantage=fields["advantage"],
                       weight=batch.weight, ref_logp=fields.get("ref_tokens"), entropy=entropy, old_logp=old_logp)


def reference_logps(run: Run, batch):
    """(ref1, ref2) summed reference log-probs, each (B,) or None; no gradients."""
    import torch

    ref = run.reference
    if ref.kind == "stored":
        return batch.ref1, batch.ref2
    if ref.kind == "none":
        return None, None
    with torch.no_grad(), _autocast(run):
        if ref.kind == "adapter":
            was_training = run.module.training
            run.module.eval()
            with run.module.disable_adapter():
                logps, _ = _logps(run, run.module, batch)
            run.module.train(was_training)
        else:
            logps, _ = _logps(run, ref.model, batch)
    b = batch.weight.shape[0]
    return logps[:b], (logps[b:] if batch.paired else None)


def _global_reference_point(run: Run, batch, logp1, ref1):
    """KTO's z0 over this stored batch across all processes: weighted mean of logp1 - ref1 (detached)."""
    import torch

    w = batch.weight.double()
    r = torch.where(w > 0, (logp1.detach() - ref1).double(), torch.zeros_like(w))
    sums = run.dist.all_reduce(torch.stack([(w * r).sum(), w.sum()]))
    return (sums[0] / sums[1].clamp_min(1e-300)).to(logp1.dtype)  # a device scalar: no host read


def loss_inputs(run: Run, batch, values, lengths, refs):
    import torch

    from alignpipe.training.losses import LossInputs

    b = batch.weight.shape[0]
    x = LossInputs(logp1=values[:b], len1=lengths[:b], weight=batch.weight, label=batch.label,
                   margin=batch.margin, ref_logp1=refs[0], ref_logp2=refs[1])
    if batch.paired:
        x.logp2, x.len2 = values[b:], lengths[b:]
    if run.task == "pointwise" and run.dist.world > 1 and refs[0] is not None:
        z0 = _global_reference_point(run, batch, x.logp1, refs[0])  # passed as a ready KL estimate
        x.kl_logp, x.ref_kl_logp = z0.expand_as(x.logp1), torch.zeros_like(x.logp1)
    return x


# --------------------------------------------------------------------------------------------- a step
def accumulate_gradients(run: Run, step, proximal: list | None = None) -> tuple[list[str], object]:
    """Forward + backward of this rank's micro-batches of `step` (a `train_data.Step`; `proximal`: pi_prox's
    log-probs of each); returns the metric names and their values over the whole step as one float64 device
    tensor (all-reduced, not read)."""
    import torch

    from alignpipe.training.losses import compute_loss, is_value_loss
    from alignpipe.training.value_loss import value_inputs

    denominator = run.normalization.denominator(step.weight)
    scale = run.dist.world / denominator if denominator > 0 else 0.0
    sums: dict = {}
    for i, batch in enumerate(step.micro):
        share = batch.weight_sum / step.weight if step.weight > 0 else 0.0
        with no_sync(run, sync=i == len(step.micro) - 1):
            if batch.group is not None and is_value_loss(run.loss):  # PPO's critic (alignpipe.training.value_loss)
                x = value_inputs(run, batch)
            elif batch.group is not None:  # token-level policy-gradient losses (alignpipe.training.policy_gradient)
                x = token_inputs(run, batch, proximal[i] if proximal else None)
            else:
                values, lengths = policy_outputs(run, batch)
                x = loss_inputs(run, batch, values, lengths, reference_logps(run, batch))
            loss, metrics = compute_loss(run.loss, x, **run.hparams)
            (loss * scale).backward()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v.double() * share
    keys = sorted(sums)
    return keys, run.dist.all_reduce(torch.stack([torch.as_tensor(sums[k]) for k in keys]))


def optimizer_step(run: Run, keys: list[str], values, step: int) -> dict:
    """Clip, read the metrics and the gradient norm in ONE host read, check for divergence, AdamW step,
    schedule step. Returns the metrics with grad_norm and lr."""
    import torch

    max_norm = run.max_grad_norm if run.max_grad_norm and run.max_grad_norm > 0 else math.inf
    norm = torch.nn.utils.clip_grad_norm_(trainable(run.module), max_norm)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor; its global value (a collective, not a host read)
        norm = norm.full_tensor()
    read = torch.cat([values, norm.detach().reshape(1).to(values)]).tolist()  # the step's only host read
    metrics, norm = dict(zip(keys, read[:-1])), read[-1]
    for name, value in (("loss", metrics["loss"]), ("gradient norm", norm)):
        if not math.isfinite(value):
            raise TrainingDiverged(f"{name} is {value} at step {step}")
    lr, global_step = run.scheduler.get_last_lr()[0], run.scheduler.last_epoch + 1  # over continued runs too
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {**metrics, "grad_norm": norm, "lr": lr, "global_step": global_step}


# --------------------------------------------------------------------------------------------- the loop
def proximal_logps(run: Run, groups: list) -> list | None:
    """log pi_prox of each micro-batch of a step (its stored batches, in order; alignpipe.training.proximal
    computed them before step 1), or None without `train --proximal`."""
    if run.proximal is None:
        return None
    return [run.proximal[int(index)].to(run.dist.device) for index, _rows in groups]


def train_step(run: Run, ds, groups: list, stored_reference: bool, step: int) -> dict:
    """One optimisation step over the given stored batches; returns its metrics row (step is 1-based)."""
    from alignpipe.training.micro_batches import micro_batches

    start = time.perf_counter()
    d = run.dist
    data = micro_batches(ds, groups, run.task, stored_reference, run.pad_id, d.device, d.rank, d.world)
    metrics = optimizer_step(run, *accumulate_gradients(run, data, proximal_logps(run, groups)), step)
    seconds = time.perf_counter() - start
    return {"step": step, "epoch": 0.0, "batch_index": groups[0][0], **metrics, "examples": data.examples,
            "tokens": data.tokens, "seconds": seconds, "tokens/s": data.tokens / seconds,
            "examples/s": data.examples / seconds}


def fit(run: Run, ds, batch_groups: list, plan, *, start_step: int = 0, log=None, partial=None,
        save_every: int = 0, on_step=None, last_checkpoint=None, keep_state: bool = False) -> None:
    """Steps start_step+1 .. plan.total_steps: metrics to `log` (rank 0), a checkpoint every `save_every`
    steps and after the last (also without `save_every` when `keep_state`: the policy's trainer state) into
    `partial`, `on_step(row)` after each step. A divergence names the last
    good checkpoint."""
    from alignpipe.training.checkpoint import save_checkpoint

    stored = run.reference.kind == "stored"
    for step in range(start_step + 1, plan.total_steps + 1):
        try:
            row = train_step(run, ds, batch_groups[plan.groups(step - 1)], stored, step)
        except TrainingDiverged as e:
            kept = f"last good checkpoint kept: {last_checkpoint}" if last_checkpoint else "no checkpoint"
            raise TrainingDiverged(f"{e}; training stopped, {kept}; lower --lr or check the batch") from None
        row["epoch"] = step / plan.steps_per_epoch
        if log is not None:
            log.write(row)
        if on_step is not None:
            on_step(row)
        # a checkpoint after the last step too: a crash while writing the output resumes with no step left
        if (save_every and step % save_every == 0) or ((save_every or keep_state) and step == plan.total_steps):
            state = {"metrics": log.history if log is not None else [],
                     "next_batch_index": row["batch_index"] + 1}
            d = run.dist
            last_checkpoint = save_checkpoint(partial, step, run.module, run.optimizer, run.scheduler, state,
                                              rank=d.rank, world=d.world, barrier=d.barrier)
