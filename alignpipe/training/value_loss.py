"""The critic's loss of PPO (`train --loss value[,clip=C]`) and its inputs.

The critic (`alignpipe.models.values`: a one-output sequence classifier whose head is read at every position)
is trained on the batches of `build-batches --task group --advantage gae,critic=CRITIC`: each answer token t
has the critic's value when the batches were built V_old (`response1_values`) and the GAE return R
(`response1_returns`). With V = V_phi(x, y_<t), the value being trained:

    l_{i,t} = 1/2 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)       (clip = c > 0; 0: 1/2 (V - R)^2)
    L       = sum_i w_i sum_t m_{i,t} l_{i,t} / sum_i w_i n_i                  (token mean, weights as everywhere)

the clipped value loss of PPO implementations (OpenAI baselines ppo2; TRL's PPOTrainer `cliprange_value`,
OpenRLHF's `value_clip`; Schulman et al. 2017 train the value by squared error). As with DAPO, the token count
of the normaliser is the dataset's (`mean_tokens`, set by train) so that a weight counts the same in every step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from alignpipe.core.errors import UserError
from alignpipe.core.lazy import torch

if TYPE_CHECKING:
    from torch import Tensor


@dataclass
class ValueInputs:
    """Per-token quantities of B answers padded to T tokens: (B, T) float tensors unless noted."""

    values: Tensor  # V_phi(x, y_<t) of the critic being trained (requires grad)
    old_values: Tensor  # V_old: the critic's values when the batches were built
    returns: Tensor  # R_t: the GAE returns
    mask: Tensor  # 1 on answer tokens, 0 on padding
    weight: Tensor  # (B,) training weight per answer, >= 0


def value_loss(x: ValueInputs, *, clip: float = 0.2, mean_tokens: float = 0.0):
    """PPO's clipped value loss, token mean (module doc):
    l_t = 1/2 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2) with c = clip > 0; clip 0: l_t = 1/2 (V - R)^2.

    Returns (S, metrics) in the loss table's convention: S = sum_i w_i sum_t m l / size with size =
    `mean_tokens` (0: this batch's weighted mean answer length), metrics["loss"] = this batch's token mean."""
    mask = x.mask.to(x.values.dtype)
    err = (x.values - x.returns) ** 2
    if not clip:
        per_token, clipped_frac = 0.5 * err, torch.zeros_like(err)
    else:
        v_clip = x.old_values + torch.clamp(x.values - x.old_values, -clip, clip)
        err_clip = (v_clip - x.returns) ** 2
        per_token, clipped_frac = 0.5 * torch.maximum(err, err_clip), (err_clip > err).to(err.dtype)
    w = x.weight.to(per_token.dtype)
    live = (w > 0)[:, None] & (mask > 0)
    per_token = torch.where(live, per_token, torch.zeros_like(per_token))
    u, n = per_token.sum(-1), mask.sum(-1)
    total, tokens = (w * u).sum(), (w * n).sum()
    size = float(mean_tokens) if mean_tokens else (tokens / w.sum().clamp_min(1e-30)).clamp_min(1e-30)
    metrics = {"loss": (total / tokens.clamp_min(1e-30)).detach(),
               "value/clipfrac": _mean(clipped_frac, mask, w), "value/mean": _mean(x.values, mask, w),
               "value/returns": _mean(x.returns, mask, w), "value/error": _mean(err, mask, w)}
    return total / size, metrics


def _mean(values: Tensor, mask: Tensor, w: Tensor) -> Tensor:
    tw = mask * w[:, None]
    return ((torch.where(tw > 0, values.detach(), torch.zeros_like(values)) * tw).sum()
            / tw.sum().clamp_min(1e-30)).detach()


def value_inputs(run, batch) -> ValueInputs:
    """The value loss's inputs for one micro-batch: the critic's per-token values (one forward through the
    wrapped model), the stored values and returns (`micro_batches.group_batch_fields`)."""
    from alignpipe.models.logprobs import autocast
    from alignpipe.models.values import token_values

    fields = batch.group
    tensors = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
               "response_mask": batch.response_mask}
    with autocast(run.dist.device, run.dtype):
        values, mask = token_values(run.model, tensors)
    width = values.shape[1]
    return ValueInputs(values=values, old_values=fields["old_values"][:, :width], returns=fields["returns"][:, :width],
                       mask=mask, weight=batch.weight)


def check_batches(ds, where: str) -> None:
    """`train --loss value` needs GAE returns and values in every row (build-batches --advantage gae)."""
    table = ds.select_columns(["response1_returns", "response1_values"]).with_format("arrow")[:]
    for col in ("response1_returns", "response1_values"):
        nulls = table[col].is_null().to_pylist()
        if any(nulls):
            raise UserError(f"{where} row {nulls.index(True)}: column '{col}' is null; --loss value trains the critic "
                            "on GAE returns: build the batches with `alignpipe build-batches --task group --advantage "
                            "gae,critic=CRITIC`")
