"""Token-level policy-gradient losses of online RL with verifiable rewards: the clipped surrogate of PPO/GRPO,
with GRPO's, Dr. GRPO's and DAPO's aggregations, an optional k3 KL to a reference, and their metrics.

Per token t of answer i (mask m_{i,t} = 1 on the answer's sampled tokens):

    rho_{i,t} = exp(logp_{i,t} - logp^b_{i,t})          logp^b: the behaviour policy that sampled the answer
    l_{i,t}   = -min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) + kl_coef * k3_{i,t}
                (A_{i,t} per token instead of A_i when the batches carry GAE advantages: PPO with a critic)
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

Variants (`ratios`, `surrogate_terms`): GSPO takes one ratio per answer, the geometric mean of its token ratios;
CISPO replaces the surrogate by -sg(clip(rho)) A logp; `tis_cap=C` multiplies every token's term by the truncated
importance weight sg(min(pi_old / mu, C)) of Yao et al. 2025 (sampler/trainer mismatch), with the ratio then
taken to pi_old (see `ratios` for what pi_old is here).
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
    advantage: Tensor  # (B,) one advantage per answer, or (B, T) one per token (PPO with a critic: GAE)
    weight: Tensor  # (B,) training weight per answer, >= 0
    ref_logp: Tensor | None = None  # reference log-probs (no grad), for the KL term
    entropy: Tensor | None = None  # the policy's per-token entropy, when the trainer computed it from logits
    old_logp: Tensor | None = None  # a recomputed pi_old (the trainer's log-probs before this batch's updates), TIS


def _token_mean(values: Tensor, x: TokenInputs) -> Tensor:
    """Weighted mean over answer tokens: sum_i w_i sum_t m v / sum_i w_i n_i (0 when nothing counts)."""
    tw = x.mask * x.weight[:, None].to(values.dtype)
    return (torch.where(tw > 0, values, torch.zeros_like(values)) * tw).sum() / tw.sum().clamp_min(1e-30)


def ratios(x: TokenInputs, mask: Tensor, level: str = "token", tis_cap: float = 0.0):
    """(rho, tis): the importance ratio per token, (B, T), and the TIS weight (None when tis_cap is 0).

    token level:     rho_{i,t} = exp(logp_{i,t} - logp^o_{i,t})
    sequence level:  rho_{i,t} = s_i = exp((1/n_i) sum_t m (logp - logp^o))   (GSPO; gradient through every token)
    TIS:             tis_{i,t} = sg(min(exp(logp^o_{i,t} - logp^b_{i,t}), tis_cap))

    logp^o is the old policy: the behaviour log-probs logp^b when tis_cap is 0; with TIS, the recomputed
    `old_logp` when the batch has one, else sg(logp) (the trainer's own log-prob at this step, as TRL's
    `old_per_token_logps = per_token_logps.detach()`), so that rho = 1 (value) and the mismatch between the
    sampler and the trainer is carried by the truncated weight alone. alignpipe stores no recomputed pi_old
    (batches carry mu, generate's per-token log-probs), so in `train` pi_old is the policy at the step: on the
    first step after sampling it is TRL's pi_old (the trainer's log-probs of the sampling policy); on later steps
    over the same samples the drift since sampling is weighted (up to C), not clipped."""
    zero = torch.zeros_like(x.logp)
    old = x.behaviour_logp if not tis_cap else (x.old_logp if x.old_logp is not None else x.logp.detach())
    log_ratio = torch.where(mask > 0, x.logp - old, zero)
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp_min(1.0))[:, None].expand_as(x.logp)
    elif level != "token":
        raise ValueError(f"importance level {level!r}: choose token or sequence")
    tis = None
    if tis_cap:
        tis = torch.exp(torch.where(mask > 0, old - x.behaviour_logp, zero)).detach().clamp_max(tis_cap)
    return torch.exp(log_ratio), tis


def surrogate_terms(x: TokenInputs, *, eps_low: float, eps_high: float, kl_coef: float, level: str = "token",
                    tis_cap: float = 0.0, cispo: bool = False):
    """Per-token loss l_{i,t} (B, T), zero on padding, and the token statistics the metrics need: the clipped
    surrogate (module doc), or CISPO's -sg(clip(rho, 1-eps_low, 1+eps_high)) A logp; times TIS's weight when on."""
    mask = x.mask.to(x.logp.dtype)
    rho, tis = ratios(x, mask, level, tis_cap)
    adv = x.advantage.to(x.logp.dtype)
    adv = adv[:, None] if adv.dim() == 1 else adv  # per answer, or per token (A_{i,t})
    clipped = torch.clamp(rho, 1 - eps_low, 1 + eps_high)
    if cispo:
        per_token = -clipped.detach() * adv * torch.where(mask > 0, x.logp, torch.zeros_like(x.logp))
    else:
        per_token = -torch.minimum(rho * adv, clipped * adv)
    if tis is not None:
        per_token = per_token * tis
    kl = None
    if x.ref_logp is not None:
        d = torch.where(mask > 0, x.ref_logp - x.logp, torch.zeros_like(x.logp))
        kl = torch.exp(d) - d - 1
        if kl_coef:
            per_token = per_token + kl_coef * kl
    elif kl_coef:
        from alignpipe.core.errors import UserError

        raise UserError("kl_coef > 0 needs per-token reference log-probs: build-batches --task group --reference MODEL")
    low, high = rho < 1 - eps_low, rho > 1 + eps_high  # CISPO truncates the weight on either side
    stats = {"rho": rho.detach(), "low": (low if cispo else (adv < 0) & low).detach(),
             "high": (high if cispo else (adv > 0) & high).detach(), "kl": None if kl is None else kl.detach(),
             "tis": tis, "tis_cap": tis_cap}
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
         "advantage/mean": _token_mean(x.advantage.to(rho.dtype), x) if x.advantage.dim() == 2 else
         (x.weight * x.advantage).sum() / x.weight.sum().clamp_min(1e-30)}
    if stats["kl"] is not None:
        m["kl"] = _token_mean(stats["kl"], x)
    if stats.get("tis") is not None:  # TIS: the weights' mean and the fraction truncated at the cap
        m["tis/mean"] = _token_mean(stats["tis"], x)
        m["tis/capped"] = _token_mean((stats["tis"] >= stats["tis_cap"]).to(rho.dtype), x)
    if x.entropy is not None:
        m["entropy"] = _token_mean(x.entropy.detach(), x)
    else:
        m["entropy_estimate"] = _token_mean(-x.logp.detach(), x)
    return {k: v.detach() for k, v in m.items()}


def clipped_pg(x: TokenInputs, *, aggregation: str, eps_low: float, eps_high: float, kl_coef: float,
               max_tokens: int = 0, level: str = "token", tis_cap: float = 0.0,
               cispo: bool = False) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(u, s, metrics): per-answer numerators and sizes of the clipped surrogate (module doc; `level`, `tis_cap`,
    `cispo`: :func:`surrogate_terms`); the loss of a batch alone is sum(w u) / sum(w s) (:func:`batch_loss`), a
    trainer may divide by a dataset-level size."""
    per_token, stats = surrogate_terms(x, eps_low=eps_low, eps_high=eps_high, kl_coef=kl_coef, level=level,
                                       tis_cap=tis_cap, cispo=cispo)
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


def grpo_loss(x: TokenInputs, *, eps_low: float = 0.2, eps_high: float = 0.2, kl_coef: float = 0.0,
              tis_cap: float = 0.0):
    """GRPO (Shao et al. 2024, arXiv 2402.03300, eq. 3): per-answer token mean, then the mean over answers.

    L = (1/sum w) sum_i w_i (1/|o_i|) sum_t -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) + kl_coef * k3.
    (The paper used kl_coef 0.04; 0 by default, as TRL and Dr. GRPO / DAPO.) tis_cap: :func:`ratios`."""
    u, s, m = clipped_pg(x, aggregation="sequence", eps_low=eps_low, eps_high=eps_high, kl_coef=kl_coef,
                         tis_cap=tis_cap)
    return _result(u, s, x, m)


def dr_grpo_loss(x: TokenInputs, *, eps_low: float = 0.2, eps_high: float = 0.2, kl_coef: float = 0.0,
                 max_tokens: int = 0, tis_cap: float = 0.0):
    """Dr. GRPO (Liu et al. 2025, arXiv 2503.20783, eq. 3): token sums divided by a constant, no length bias.

    L = (1/(sum w * C)) sum_i w_i sum_t -min(rho A, clip(rho) A) + kl_coef * k3;  C = max_tokens (the
    generation budget; 0: the batch's padded width). tis_cap: :func:`ratios`."""
    u, s, m = clipped_pg(x, aggregation="constant", eps_low=eps_low, eps_high=eps_high, kl_coef=kl_coef,
                         max_tokens=max_tokens, tis_cap=tis_cap)
    return _result(u, s, x, m)


def ppo_loss(x: TokenInputs, *, eps_low: float = 0.2, eps_high: float = 0.2, kl_coef: float = 0.0,
             mean_tokens: float = 0.0):
    """PPO's clipped surrogate (Schulman et al. 2017, arXiv 1707.06347, eq. 7) per token, as for language models
    with a critic (Ouyang et al. 2022; TRL's PPOTrainer): the per-token GAE advantages A_{i,t} of
    build-batches --advantage gae, one mean over every token of the batch.

    L = sum_i w_i sum_t -min(rho_{i,t} A_{i,t}, clip(rho_{i,t}, 1-eps_low, 1+eps_high) A_{i,t}) / sum_i w_i |o_i|
    (the token count as DAPO's: `mean_tokens` = the dataset's mean answer length, set by train; 0: this batch's)."""
    return dapo_loss(x, eps_low=eps_low, eps_high=eps_high, kl_coef=kl_coef, mean_tokens=mean_tokens)


def dapo_loss(x: TokenInputs, *, eps_low: float = 0.2, eps_high: float = 0.28, kl_coef: float = 0.0,
              mean_tokens: float = 0.0, tis_cap: float = 0.0):
    """DAPO (Yu et al. 2025, arXiv 2503.14476, eq. 8): one mean over every token, clip-higher (eps_high > eps_low).

    L = sum_i w_i sum_t -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) / sum_i w_i |o_i|. The token count
    is the dataset's: `mean_tokens` = sum w |o| / sum w over the whole batches dataset (train sets it), times
    the step's examples; 0 takes this batch's own (the per-step rule). tis_cap: :func:`ratios`."""
    u, s, m = clipped_pg(x, aggregation="token", eps_low=eps_low, eps_high=eps_high, kl_coef=kl_coef,
                         tis_cap=tis_cap)
    return _result(u, s, x, m, _token_size(x, s, mean_tokens))


def _token_size(x: TokenInputs, s: Tensor, mean_tokens: float):
    """The size of a token-mean loss: `mean_tokens` (the dataset's mean answer length, set by train), else this
    batch's weighted mean answer length (all weights 0: S = 0)."""
    if mean_tokens:
        return float(mean_tokens)
    w = x.weight.to(s.dtype)
    return ((w * s).sum() / w.sum().clamp_min(1e-30)).clamp_min(1e-30)


def gspo_loss(x: TokenInputs, *, eps_low: float = 3e-4, eps_high: float = 4e-4, kl_coef: float = 0.0,
              tis_cap: float = 0.0):
    """GSPO (Zheng et al. 2025, arXiv 2507.18071, eqs. 5 and 7): one importance ratio per answer, the geometric
    mean of its token ratios, clipped per answer; the mean over answers.

    s_i = exp((1/|o_i|) sum_t (logp_{i,t} - logp^b_{i,t}))
    L   = (1/sum w) sum_i w_i [-min(s_i A_i, clip(s_i, 1-eps_low, 1+eps_high) A_i) + kl_coef (1/|o_i|) sum_t k3]

    Gradient as TRL computes it (importance_sampling_level="sequence"): through every token of the mean,
    d L / d logp_{i,t} = -w_i s_i A_i / (|o_i| sum w) while s_i is inside the band (the paper's eq. 10; its
    GSPO-token variant, eq. 13, has the same value and gradient for one advantage per answer). The paper's
    clip range is 3e-4 / 4e-4 (section 5.1). tis_cap: :func:`ratios`."""
    u, s, m = clipped_pg(x, aggregation="sequence", eps_low=eps_low, eps_high=eps_high, kl_coef=kl_coef,
                         level="sequence", tis_cap=tis_cap)
    return _result(u, s, x, m)


def cispo_loss(x: TokenInputs, *, eps_low: float = 1.0, eps_high: float = 4.0, kl_coef: float = 0.0,
               mean_tokens: float = 0.0, tis_cap: float = 0.0):
    """CISPO (MiniMax-M1, arXiv 2506.13585, eq. 4): the clipped importance weight with a stop-gradient, times the
    advantage, times the log-prob; one mean over every token (as DAPO's).

    L = sum_i w_i sum_t [-sg(clip(rho_{i,t}, 1-eps_low, 1+eps_high)) A_i logp_{i,t} + kl_coef k3] / sum_i w_i |o_i|

    Every token keeps its gradient, -w_i clip(rho) A_i / sum w |o| (no token is dropped as PPO's clip does). The
    defaults: no lower bound (eps_low = 1: the weight is never raised, as the paper), upper bound 5 (TRL's
    `epsilon_high=5.0` for loss_type="cispo", from ScaleRL). The loss value carries logp, so it is not near 0
    as the surrogates' are. `mean_tokens`: :func:`dapo_loss`; tis_cap: :func:`ratios`."""
    u, s, m = clipped_pg(x, aggregation="token", eps_low=eps_low, eps_high=eps_high, kl_coef=kl_coef,
                         tis_cap=tis_cap, cispo=True)
    return _result(u, s, x, m, _token_size(x, s, mean_tokens))
