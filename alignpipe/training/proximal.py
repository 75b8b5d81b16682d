"""The proximal policy of decoupled PPO, for answers sampled by an older policy (`train --proximal`).

AReaL (Fu et al. 2025, "AReaL: A Large-Scale Asynchronous Reinforcement Learning System for Language
Reasoning", arXiv 2505.24298, eq. 5) separates the policy that sampled an answer, mu, from the policy the
trust region is taken around, pi_prox:

    J(theta) = E_{y ~ mu} [ sum_t  sg(pi_prox(y_t) / mu(y_t)) * min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t) ],
    r_t = pi_theta(y_t) / pi_prox(y_t).

With the sampler K policies behind (`OFF_POLICY=K`), the usual ratio pi_theta / mu starts this train already
outside its clip range on many tokens, whose gradient is then zero: a stale answer teaches little. Here
pi_prox is the policy as this `train` starts (its --policy, optimiser state continued): the clip bounds the
update of this train, and the staleness is carried by the importance weight alone, truncated at the loss's
`tis_cap` C (TIS; Yao et al. 2025), i.e. sg(min(pi_prox / mu, C)). In the losses this is
`TokenInputs.old_logp` (alignpipe.training.policy_gradient.ratios): log pi_prox per answer token.

log pi_prox is computed once for every stored batch before the first step (eval mode, no gradient, the
trainer's own forward), and kept beside the checkpoints (`proximal-rankR.safetensors` in the stage's partial
folder), so that a killed and resumed train uses the same values as an uninterrupted one.
"""
from __future__ import annotations

import os
from pathlib import Path

from alignpipe.core.errors import UserError


def check(enabled: bool, task: str, hparams: dict, loss: str) -> None:
    if enabled and (task != "group" or not hparams.get("tis_cap")):
        raise UserError(f"--proximal: needs a policy-gradient loss with tis_cap > 0 (the weight sg(min(pi_prox/mu, "
                        f"C))), e.g. --loss grpo,tis_cap=2; got --loss {loss}")


def compute(run, ds, batch_groups: list, stored_reference: bool) -> dict:
    """{batch_index: log pi_prox (B_rank, R) float32} of this rank's share of every stored batch, with the
    current weights."""
    import torch

    from alignpipe.models.logprobs import response_token_logps
    from alignpipe.training.loop import _autocast, _tensors
    from alignpipe.training.micro_batches import micro_batches

    d, out = run.dist, {}
    was_training = run.module.training
    run.module.eval()
    try:
        for index, rows in batch_groups:
            step = micro_batches(ds, [(index, rows)], run.task, stored_reference, run.pad_id, d.device, d.rank,
                                 d.world)
            with torch.no_grad(), _autocast(run):
                logp, _mask, _ = response_token_logps(run.model, _tensors(step.micro[0]))
            out[int(index)] = logp.detach().float().cpu().contiguous()
    finally:
        run.module.train(was_training)
    return out


def load_or_compute(run, ds, batch_groups: list, stored_reference: bool, partial: Path) -> dict:
    """The values kept in `partial` by an earlier start of this train, else computed now and kept there."""
    from safetensors.torch import load_file, save_file

    path = Path(partial) / f"proximal-rank{run.dist.rank}.safetensors"
    if path.exists():
        return {int(k): v for k, v in load_file(str(path)).items()}
    values = compute(run, ds, batch_groups, stored_reference)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({str(k): v for k, v in values.items()}, str(tmp))
    os.replace(tmp, path)
    return values
