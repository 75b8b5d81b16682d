"""Token-level policy-gradient losses of online RL with verifiable rewards: the clipped surrogate of PPO/GRPO,
with GRPO's, Dr. GRPO's and DAPO's aggregations, an optional k3 KL to a reference, and their metrics.

Per token t of answer i (mask m_{i,t} = 1 on the answer's sampled tokens):

    rho_{i,t} = exp(logp_{i,t} - logp^b_{i,t})          logp^b: the behaviour policy that sampled the answer
    l_{i,t}   = -min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) + kl_coef * k3_{i,t}
    k3_{i,t}  = exp(ref_{i,t} - logp_{i,t}) - (ref_{i,t} - logp_{i,t}) - 1     (Schulman 2020; GRPO eq. 4)

Aggregation, with n_i = sum_t m_{i,t} and per-sample weights w_i (a numerator u_i and a size s_i per answer):

    token     (DAPO, arXiv 2503.14476 eq. 8):   u_i = sum_t m l,          s_i = n_i
    sequence  (GRPO, arXiv 2402.03300 eq. 3):   u_i = (1/n_i) sum_t m l,  s_i = 1
    constant  (Dr. GRPO, arXiv 2503.20783):     u_i = (1/C) sum_t m l,    s_i = 1     (C: the token budget)

    L = sum_i w_i u_i / sum_i w_i s_i

so that a weight 0 is an absent answer and a weight 2 the answer written twice (both hold for the numerator and
the normaliser; w = 1 gives the papers' and TRL's `loss_type` grpo / dr_grpo / dapo exactly). With rho = 1
(one optimiser step per generation batch) d l_{i,t} / d logp_{i,t} = -A_i: REINFORCE with advantage A_i. The
clip removes the gradient of a token only when the surrogate is the clipped one: A > 0 and rho > 1 + eps_high,
or A < 0 and rho < 1 - eps_low.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from alignpipe.core.lazy import torch

if TYPE_CHECKING:
    from torch import Tensor

AGGREGATIONS = ("token", "sequence", "constant")


@dataclass
class TokenInputs:
    """Per-token quantities of B answers, padded to T tokens; (B, T) float tensors unless noted."""

    logp: Tensor  # log pi_theta(y_t | x, y_<t) of the sampled tokens (requires grad)
    behaviour_logp: Tensor  # log-probs of the same tokens under the policy that sampled them
    mask: Tensor  # 1 on answer tokens, 0 on padding
    advantage: Tensor  # (B,) one advantage per answer
    weight: Tensor  # (B,) training weight per answer, >= 0
    ref_logp: Tensor | None = None  # reference log-probs (no grad), for the KL term
    entropy: Tensor | None = None  # the policy's per-token entropy, when the trainer computed it from logits


def _token_mean(values: Tensor, x: TokenInputs) -> Tensor:
    """Weighted mean over answer tokens: sum_i w_i sum_t m v / sum_i w_i n_i (0 when nothing counts)."""
    tw = x.mask * x.weight[:, None].to(values.dtype)
    return (torch.where(tw > 0, values, torch.zeros_like(values)) * tw).sum() / tw.sum().clamp_min(1e-30)


def surrogate_terms(x: TokenInputs, *, eps_low: float, eps_high: float, kl_coef: float):
    """Per-token loss l_{i,t} (B, T), zero on padding, and the token statistics the metrics need."""
    mask = x.mask.to(x.logp.dtype)
    log_ratio = torch.where(mask > 0, x.logp - x.behaviour_logp, torch.zeros_like(x.logp))
    rho = torch.exp(log_ratio)
    adv = x.advantage.to(x.logp.dtype)[:, None]
    clipped = torch.clamp(rho, 1 - eps_low, 1 + eps_high)
    per_token = -torch.minimum(rho * adv, clipped * adv)
    kl = None
    if x.ref_logp is not None:
        d = torch.where(mask > 0, x.ref_logp - x.logp, torch.zeros_like(x.logp))
        kl = torch.exp(d) - d - 1
        if kl_coef:
            per_token = per_token + kl_coef * kl
    elif kl_coef:
        from alignpipe.core.errors import UserError

        raise UserError("kl_coef > 0 needs per-token reference log-probs: build-batches --task group --reference MODEL")
    stats = {"rho": rho.detach(), "low": ((adv < 0) & (rho < 1 - eps_low)).detach(),
             "high": ((adv > 0) & (rho > 1 + eps_high)).detach(), "kl": None if kl is None else kl.detach()}
    return per_token * mask, stats


def aggregate(per_token: Tensor, mask: Tensor, aggregation: str, max_tokens: int = 0) -> tuple[Tensor, Tensor]:
    """(u, s), each (B,): the numerator and size of every answer under `aggregation` (see the module doc).
    `max_tokens` is Dr. GRPO's constant C; 0 takes the padded width T of the batch."""
    n = mask.to(per_token.dtype).sum(-1)
    total = per_token.sum(-1)
    if aggregation == "token":
        return total, n
    if aggregation == "sequence":
        return total / n.clamp_min(1.0), torch.ones_like(n)
    if aggregation == "constant":
        return total / float(max_tokens or per_token.shape[-1]), torch.ones_like(n)
    raise ValueError(f"aggregation {aggregation!r}: choose from {', '.join(AGGREGATIONS)}")


def pg_metrics(x: TokenInputs, stats: dict) -> dict[str, Tensor]:
    """Detached metrics, weighted token means: clip fractions (low / high side), ratio mean and std, KL to the
    reference (k3), entropy (from logits when given, else `entropy_estimate`: the sampled tokens' mean
    negative log-prob, an unbiased estimate of the entropy when on-policy) and the weighted mean advantage."""
    rho = stats["rho"]
    mean = _token_mean(rho, x)
    m = {"clip/low": _token_mean(stats["low"].to(rho.dtype), x), "clip/high": _token_mean(stats["high"].to(rho.dtype), x),
         "ratio/mean": mean, "ratio/std": _token_mean((rho - mean) ** 2, x).sqrt(),
         "advantage/mean": (x.weight * x.advantage).sum() / x.weight.sum().clamp_min(1e-30)}
    if stats["kl"] is not None:
        m["kl"] = _token_mean(stats["kl"], x)
    if x.entropy is not None:
        m["entropy"] = _token_mean(x.entropy.detach(), x)
    else:
        m["entropy_estimate"] = _token_mean(-x.logp.detach(), x)
    return {k: v.detach() for k, v in m.items()}


def clipped_pg(x: TokenInputs, *, aggregation: str, eps_low: float, eps_high: float, kl_coef: float,
               max_tokens: int = 0) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(u, s, metrics): per-answer numerators and sizes of the clipped surrogate (module doc); the loss of a
    batch alone is sum(w u) / sum(w s) (:func:`batch_loss`), a trainer may divide by a dataset-level size."""
    per_token, stats = surrogate_terms(x, eps_low=eps_low, eps_high=eps_high, kl_coef=kl_coef)
    u, s = aggregate(per_token, x.mask, aggregation, max_tokens)
    return u, s, pg_metrics(x, stats)


def batch_loss(u: Tensor, s: Tensor, weight: Tensor) -> Tensor:
    """L = sum_i w_i u_i / sum_i w_i s_i; rows with w_i = 0 contribute exactly 0; 0 when nothing counts."""
    w = weight.to(u.dtype)
    num = (w * torch.where(w > 0, u, torch.zeros_like(u))).sum()
    return num / (w * s).sum().clamp_min(torch.finfo(u.dtype).tiny)


# --- the registered losses: presets of the clipped surrogate with their papers' hyperparameters ------------
def _result(u: Tensor, s: Tensor, x: TokenInputs, metrics: dict, size: Tensor | float = 1.0):
    """(S, metrics) in the loss table's convention (alignpipe.training.losses): S = sum_i w_i u_i / size, the weighted
    SUM the trainer divides by its step denominator (the nominal examples per step times the dataset's mean
    weight); metrics["loss"] = sum w u / sum w s, this batch's own loss value."""
    w = x.weight.to(u.dtype)
    total = (w * torch.where(w > 0, u, torch.zeros_like(u))).sum()
    return total / size, {"loss": batch_loss(u.detach(), s, x.weight).detach(), **metrics}


def grpo_loss(x: TokenInputs, *, eps_low: float = 0.2, eps_high: float = 0.2, kl_coef: float = 0.0):
    """GRPO (Shao et al. 2024, arXiv 2402.03300, eq. 3): per-answer token mean, then the mean over answers.

    L = (1/sum w) sum_i w_i (1/|o_i|) sum_t -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) + kl_coef * k3.
    (The paper used kl_coef 0.04; 0 by default, as TRL and Dr. GRPO / DAPO.)"""
    u, s, m = clipped_pg(x, aggregation="sequence", eps_low=eps_low, eps_high=eps_high, kl_coef=kl_coef)
    return _result(u, s, x, m)


def dr_grpo_loss(x: TokenInputs, *, eps_low: float = 0.2, eps_high: float = 0.2, kl_coef: float = 0.0,
                 max_tokens: int = 0):
    """Dr. GRPO (Liu et al. 2025, arXiv 2503.20783, eq. 3): token sums divided by a constant, no length bias.

    L = (1/(sum w * C)) sum_i w_i sum_t -min(rho A, clip(rho) A) + kl_coef * k3;  C = max_tokens (the
    generation budget; 0: the batch's padded width)."""
    u, s, m = clipped_pg(x, aggregation="constant", eps_low=eps_low, eps_high=eps_high, kl_coef=kl_coef,
                         max_tokens=max_tokens)
    return _result(u, s, x, m)


def dapo_loss(x: TokenInputs, *, eps_low: float = 0.2, eps_high: float = 0.28, kl_coef: float = 0.0,
              mean_tokens: float = 0.0):
    """DAPO (Yu et al. 2025, arXiv 2503.14476, eq. 8): one mean over every token, clip-higher (eps_high > eps_low).

    L = sum_i w_i sum_t -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) / sum_i w_i |o_i|. The token count
    is the dataset's: `mean_tokens` = sum w |o| / sum w over the whole batches dataset (train sets it), times
    the step's examples; 0 takes this batch's own (the per-step rule)."""
    u, s, m = clipped_pg(x, aggregation="token", eps_low=eps_low, eps_high=eps_high, kl_coef=kl_coef)
    if mean_tokens:
        size = float(mean_tokens)
    else:
        w = x.weight.to(s.dtype)
        size = ((w * s).sum() / w.sum().clamp_min(1e-30)).clamp_min(1e-30)  # all weights 0: S = 0
    return _result(u, s, x, m, size)
