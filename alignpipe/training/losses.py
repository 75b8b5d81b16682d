"""Alignment losses as pure functions of per-example (summed) log-probabilities, plus one registry table.

Every loss has the signature ``fn(x: LossInputs, *, <hparams with paper names and defaults>)`` and returns
``(weighted_loss_sum, metrics)``; ``metrics`` holds detached scalar tensors (always ``"loss"``).

Weighting rule (shared by every loss, implemented once in :func:`_result`): each loss computes a
per-example loss ``l_i`` of shape (B,) and returns the weighted SUM

    S = sum_i w_i * l_i          (rows with w_i = 0 contribute exactly 0, even where l_i is inf/nan)

and ``metrics["loss"] = S / sum_i w_i``, the weighted mean (0 when every weight is 0). The denominator of
the training objective is the trainer's (``alignpipe.training.loop``: the dataset's mean weight times the nominal
examples per step by default, or the step's own total weight). So a row with weight 0 is the same as an
absent row and a row with weight 2 the same (value and gradient) as the row written twice with weight 1;
scaling all weights by c scales S by c and leaves the metrics unchanged. Batch statistics used inside a
loss (KTO's reference point z0) and all metrics are *weighted* means, so the same equivalences hold for them.

Conventions: response 1 is the chosen / preferred / only response; ``logp`` are sums over response tokens;
``h = beta * [(logp1 - ref_logp1) - (logp2 - ref_logp2)]`` is the DPO implicit-reward margin.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from alignpipe.core.lazy import F, torch
from alignpipe.core.registry import Registry
from alignpipe.training import policy_gradient as pg
from alignpipe.training import value_loss as vl

if TYPE_CHECKING:
    from torch import Tensor


@dataclass
class LossInputs:
    """Per-example quantities, all shape (B,) float tensors unless noted. Response 1 is the chosen/preferred
    (pairwise, reward) or the only response (sft, pointwise)."""

    logp1: Tensor  # sum over response-1 tokens of log pi_theta(y_t | x, y_<t); `reward`: the score r(x, y1)
    len1: Tensor  # number of response-1 tokens (float, >= 1)
    weight: Tensor  # per-example training weight, >= 0
    logp2: Tensor | None = None  # same for response 2 (rejected); None for sft/pointwise
    len2: Tensor | None = None
    ref_logp1: Tensor | None = None  # reference model's summed log-probs (no grad)
    ref_logp2: Tensor | None = None
    label: Tensor | None = None  # bool (B,), pointwise: True = desirable (KTO)
    margin: Tensor | None = None  # (B,) reward margin for the `reward` loss (Llama-2 style), else None
    kl_logp: Tensor | None = None  # optional: policy summed log-probs of mismatched (x, y') pairs (KTO KL)
    ref_kl_logp: Tensor | None = None


LossFn = Callable[..., "tuple[Tensor, dict[str, Tensor]]"]  # fn(x: LossInputs, **hparams) -> (loss, metrics)


# ----------------------------------------------------------------------------------------------- helpers
def weighted_sum(per_example: Tensor, weight: Tensor) -> Tensor:
    """sum_i w_i * l_i. Shapes: (B,), (B,) -> scalar. Rows with w_i == 0 contribute exactly 0 even if their
    l_i is inf/nan."""
    w = weight.to(per_example.dtype)
    return (w * torch.where(w > 0, per_example, torch.zeros_like(per_example))).sum()


def weighted_mean(per_example: Tensor, weight: Tensor) -> Tensor:
    """sum_i w_i * l_i / sum_i w_i  (0 when all weights are 0). Shapes: (B,), (B,) -> scalar."""
    w = weight.to(per_example.dtype)
    return weighted_sum(per_example, w) / w.sum().clamp_min(torch.finfo(per_example.dtype).tiny)


def _result(per_example: Tensor, x: LossInputs, metrics: dict) -> tuple[Tensor, dict[str, Tensor]]:
    """(sum_i w_i l_i, metrics + {"loss": weighted mean of l_i}): what every loss returns."""
    loss = weighted_sum(per_example, x.weight)
    return loss, {"loss": weighted_mean(per_example.detach(), x.weight), **metrics}


def _need(x: LossInputs, loss: str, *fields: str) -> list[Tensor]:
    missing = [f for f in fields if getattr(x, f) is None]
    if missing:
        raise ValueError(f"loss {loss!r} needs LossInputs fields {missing}")
    return [getattr(x, f) for f in fields]


def _log_ratios(x: LossInputs, loss: str) -> tuple[Tensor, Tensor]:
    """Policy-vs-reference log-ratios (logp1 - ref_logp1, logp2 - ref_logp2), each (B,)."""
    logp1, logp2, ref1, ref2 = _need(x, loss, "logp1", "logp2", "ref_logp1", "ref_logp2")
    return logp1 - ref1, logp2 - ref2


def _mean_logratio(x: LossInputs, lr1: Tensor, lr2: Tensor) -> Tensor:
    """The `logratio` metric: weighted mean over rows of (lr1_i + lr2_i) / 2, lr = log pi(y|x) - log pi_ref(y|x)
    summed over the answer's tokens, (B,) each -> scalar. Not a KL: the answers are not sampled from pi, and
    it is below zero whenever the policy makes them less likely than the reference does."""
    return weighted_mean(((lr1 + lr2) / 2).detach(), x.weight)


def _pair_metrics(x: LossInputs, r1: Tensor, r2: Tensor, **extra: Tensor) -> dict[str, Tensor]:
    """Detached metrics for pairwise losses; r1/r2 are the loss's (implicit) rewards, shape (B,)."""
    w, r1, r2 = x.weight, r1.detach(), r2.detach()
    m = {
        "rewards/chosen": weighted_mean(r1, w),
        "rewards/rejected": weighted_mean(r2, w),
        "rewards/margin": weighted_mean(r1 - r2, w),
        "rewards/accuracy": weighted_mean((r1 > r2).to(r1.dtype), w),
        "logps/chosen": weighted_mean(x.logp1.detach(), w),
    }
    if x.logp2 is not None:
        m["logps/rejected"] = weighted_mean(x.logp2.detach(), w)
    m.update({k: v.detach() for k, v in extra.items()})
    return m


def _dpo_family(x: LossInputs, loss_name: str, beta: float, per_example_of_h: Callable[[Tensor], Tensor]):
    """Shared body of dpo / cdpo / robust-dpo: l_i = f(h_i) with h = beta * (lr1 - lr2)."""
    lr1, lr2 = _log_ratios(x, loss_name)
    return _result(per_example_of_h(beta * (lr1 - lr2)), x,
                   _pair_metrics(x, beta * lr1, beta * lr2, logratio=_mean_logratio(x, lr1, lr2)))


def _log1mexp(a: Tensor) -> Tensor:
    """log(1 - exp(a)) for a < 0, stable at both ends (Maechler 2012); a is clamped just below 0."""
    a = a.clamp_max(-torch.finfo(a.dtype).eps)
    return torch.where(a > -0.6931471805599453, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


# ------------------------------------------------------------------------------------------------ losses
def sft_loss(x: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
    """Supervised fine-tuning: per-example mean token negative log-likelihood.

    l_i = -logp1_i / len1_i.  Shapes: logp1, len1, weight (B,) -> scalar.
    """
    return _result(-x.logp1 / x.len1, x, {"logps/chosen": weighted_mean(x.logp1.detach(), x.weight)})


def reward_loss(x: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley-Terry reward-model loss (Ouyang et al. 2022); optional margin as in Llama 2 (Touvron 2023).

    l_i = -log sigmoid(r1_i - r2_i - m_i),  r = scalar scores in logp1/logp2 (B,), m = margin (B,) or 0.
    """
    r1, r2 = _need(x, "reward", "logp1", "logp2")
    m = x.margin if x.margin is not None else torch.zeros_like(r1)
    return _result(-F.logsigmoid(r1 - r2 - m), x, _pair_metrics(x, r1, r2))


def dpo_loss(x: LossInputs, *, beta: float = 0.1) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO (Rafailov et al. 2023, eq. 7).

    l_i = -log sigmoid(h_i),  h = beta * [(logp1 - ref_logp1) - (logp2 - ref_logp2)], all (B,).
    """
    return _dpo_family(x, "dpo", beta, lambda h: -F.logsigmoid(h))


def cdpo_loss(x: LossInputs, *, beta: float = 0.1, label_smoothing: float = 0.1):
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"): labels flipped w.p. eps.

    l_i = -(1 - eps) log sigmoid(h_i) - eps log sigmoid(-h_i),  eps = label_smoothing in [0, 0.5].
    """
    eps = label_smoothing
    if not 0.0 <= eps <= 0.5:
        raise ValueError(f"cdpo label_smoothing must be in [0, 0.5], got {eps}")
    return _dpo_family(x, "cdpo", beta, lambda h: -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h))


def robust_dpo_loss(x: LossInputs, *, beta: float = 0.1, label_smoothing: float = 0.1):
    """Robust DPO (Chowdhury et al. 2024, "Provably robust DPO", eq. 8): unbiased loss under flip rate eps.

    l_i = [(1 - eps) * (-log sigmoid(h_i)) - eps * (-log sigmoid(-h_i))] / (1 - 2 eps),  0 <= eps < 0.5.
    (l_i may be negative; it is monotone decreasing in h for every eps < 0.5.)
    """
    eps = label_smoothing
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"robust-dpo label_smoothing (noise rate) must be in [0, 0.5), got {eps}")
    return _dpo_family(
        x, "robust-dpo", beta,
        lambda h: ((1 - eps) * -F.logsigmoid(h) - eps * -F.logsigmoid(-h)) / (1 - 2 * eps),
    )


def ipo_loss(x: LossInputs, *, tau: float = 0.1, length_normalize: bool = False):
    """IPO (Azar et al. 2023, eq. 17 / sampled loss of Sec. 5.2).

    l_i = (h_i - 1/(2 tau))^2,  h = (logp1 - ref_logp1) - (logp2 - ref_logp2), all (B,).
    The paper's h uses *summed* log-ratios (the default here). TRL and HALOs divide each log-ratio by its
    response length; ``length_normalize=True`` does that: h = (logp1 - ref1)/len1 - (logp2 - ref2)/len2.
    Metrics' rewards are the (optionally normalised) log-ratios themselves (no beta).
    """
    lr1, lr2 = _log_ratios(x, "ipo")
    if length_normalize:
        lr1, lr2 = lr1 / x.len1, lr2 / _need(x, "ipo", "len2")[0]
    return _result((lr1 - lr2 - 1 / (2 * tau)) ** 2, x,
                   _pair_metrics(x, lr1, lr2, logratio=_mean_logratio(x, lr1, lr2)))


def slic_loss(x: LossInputs, *, delta: float = 1.0, lam: float = 0.1):
    """SLiC-HF (Zhao et al. 2023, eq. 1): rank-calibration hinge on policy log-probs + NLL regulariser.

    l_i = max(0, delta - logp1_i + logp2_i) + lam * (-logp1_i / len1_i),  all (B,). Reference-free; the NLL
    term is on the chosen response (the paper regularises towards SFT targets) as a per-token mean.
    """
    logp1, logp2, len2 = _need(x, "slic", "logp1", "logp2", "len2")
    per = torch.clamp_min(delta - (logp1 - logp2), 0.0) + lam * (-logp1 / x.len1)
    return _result(per, x, _pair_metrics(x, logp1 / x.len1, logp2 / len2))


def kto_loss(
    x: LossInputs, *, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
):
    """KTO (Ethayarajh et al. 2024, eq. 8): pointwise prospect-theoretic loss with a batch reference point.

    r_i = logp1_i - ref_logp1_i;  z0 = max(0, weighted mean of (kl_logp - ref_kl_logp)) over mismatched
    pairs, or max(0, weighted mean of r) when no KL fields are given; z0 is detached.
    desirable (label True):    l_i = lambda_D * (1 - sigmoid(beta (r_i - z0)))
    undesirable (label False): l_i = lambda_U * (1 - sigmoid(beta (z0 - r_i)))
    lambda_D = desirable_weight, lambda_U = undesirable_weight; all tensors (B,), label bool (B,).
    Metric `z0`: the reference point (the paper's clamped KL estimate; the answers' own log-ratio without KL fields).
    """
    logp1, ref1, label = _need(x, "kto", "logp1", "ref_logp1", "label")
    r = logp1 - ref1
    if x.kl_logp is not None and x.ref_kl_logp is not None:
        z0 = weighted_mean((x.kl_logp - x.ref_kl_logp).detach(), x.weight).clamp_min(0)
    else:
        z0 = weighted_mean(r.detach(), x.weight).clamp_min(0)
    label = label.bool()
    per = torch.where(
        label,
        desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))),
    )
    w, br = x.weight, (beta * r).detach()
    return _result(per, x, {
        "z0": z0.detach(),
        "rewards/chosen": weighted_mean(br, w * label),  # mean implicit reward of desirable rows
        "rewards/rejected": weighted_mean(br, w * ~label),  # ... of undesirable rows
        "logps/chosen": weighted_mean(logp1.detach(), w),
    })


def simpo_loss(x: LossInputs, *, beta: float = 2.0, gamma: float = 0.5):
    """SimPO (Meng et al. 2024, eq. 6): length-normalised, reference-free margin loss.

    l_i = -log sigmoid(beta/len1_i * logp1_i - beta/len2_i * logp2_i - gamma),  all (B,).
    gamma is the paper's absolute target margin (not the gamma/beta ratio of the SimPO code base).
    """
    logp1, logp2, len2 = _need(x, "simpo", "logp1", "logp2", "len2")
    r1, r2 = beta * logp1 / x.len1, beta * logp2 / len2
    return _result(-F.logsigmoid(r1 - r2 - gamma), x, _pair_metrics(x, r1, r2))


def orpo_loss(x: LossInputs, *, lam: float = 0.1):
    """ORPO (Hong et al. 2024, eqs. 6-7): NLL on chosen + odds-ratio preference term, reference-free.

    a = logp/len (mean token log-prob, < 0);  log odds(y) = a - log(1 - exp(a));
    l_i = -a1_i + lam * (-log sigmoid(log_odds1_i - log_odds2_i)),  all (B,).
    """
    logp1, logp2, len2 = _need(x, "orpo", "logp1", "logp2", "len2")
    a1, a2 = logp1 / x.len1, logp2 / len2
    log_or = (a1 - _log1mexp(a1)) - (a2 - _log1mexp(a2))
    extra = {"log_odds_ratio": weighted_mean(log_or.detach(), x.weight)}
    return _result(-a1 + lam * -F.logsigmoid(log_or), x, _pair_metrics(x, a1, a2, **extra))


# ---------------------------------------------------------------------------------------------- registry
# One row per loss: name, function, the batches it trains on (task: sft | reward | pointwise | pairwise),
# whether it needs reference log-probs, the paper, whether it falls (non-strictly) as logp1 rises with
# everything else fixed (a property test), and one line per hyperparameter.
LOSSES = Registry("loss", "--loss", doc="Alignment losses (alignpipe/training/losses.py); `train --loss NAME[,key=value...]`.")
_BETA = {"beta": "inverse temperature of the implicit reward beta * log(pi / pi_ref)"}
_EPS = {"label_smoothing": "assumed rate eps of flipped preference labels"}
# ranges (alignpipe.core.ranges): beta > 0 where the loss's direction depends on its sign; a label-flip rate
# below 1/2 (robust DPO divides by 1 - 2 eps); IPO's target margin 1/(2 tau) needs tau > 0
_POSITIVE_BETA = {"beta": ">0"}
_FLIP = {"label_smoothing": "[0,0.5)"}
LOSSES.add("sft", sft_loss, task="sft", needs_reference=False, paper="supervised fine-tuning (token NLL)",
           monotone_in_logp1=True)
LOSSES.add("reward", reward_loss, task="reward", needs_reference=False,
           paper="Ouyang et al. 2022, Bradley-Terry reward model", monotone_in_logp1=True)
LOSSES.add("dpo", dpo_loss, task="pairwise", needs_reference=True, paper="Rafailov et al. 2023, DPO",
           monotone_in_logp1=True, docs=_BETA, ranges=_POSITIVE_BETA)
LOSSES.add("cdpo", cdpo_loss, task="pairwise", needs_reference=True, paper="Mitchell 2023, conservative DPO",
           monotone_in_logp1=False, docs={**_BETA, **_EPS}, ranges={**_POSITIVE_BETA, **_FLIP})
LOSSES.add("ipo", ipo_loss, task="pairwise", needs_reference=True, paper="Azar et al. 2023, IPO",
           monotone_in_logp1=False, docs={"tau": "regularisation: the target margin is 1/(2 tau)",
                                          "length_normalize": "divide each log-ratio by its response length"},
           ranges={"tau": ">0"})
LOSSES.add("slic", slic_loss, task="pairwise", needs_reference=False, paper="Zhao et al. 2023, SLiC-HF",
           monotone_in_logp1=True, docs={"delta": "hinge margin on logp1 - logp2",
                                         "lam": "weight of the NLL regulariser on the chosen response"},
           ranges={"delta": ">=0", "lam": ">=0"})
LOSSES.add("kto", kto_loss, task="pointwise", needs_reference=True, paper="Ethayarajh et al. 2024, KTO",
           monotone_in_logp1=False, docs={**_BETA, "desirable_weight": "lambda_D, weight of desirable rows",
                                          "undesirable_weight": "lambda_U, weight of undesirable rows"},
           ranges={**_POSITIVE_BETA, "desirable_weight": ">=0", "undesirable_weight": ">=0"})
LOSSES.add("simpo", simpo_loss, task="pairwise", needs_reference=False, paper="Meng et al. 2024, SimPO",
           monotone_in_logp1=True, docs={"beta": "scale of the length-normalised log-probs",
                                         "gamma": "target reward margin"},
           ranges={**_POSITIVE_BETA, "gamma": ">=0"})
LOSSES.add("orpo", orpo_loss, task="pairwise", needs_reference=False, paper="Hong et al. 2024, ORPO",
           monotone_in_logp1=True, docs={"lam": "weight of the odds-ratio term"}, ranges={"lam": ">=0"})
LOSSES.add("robust-dpo", robust_dpo_loss, task="pairwise", needs_reference=True,
           paper="Chowdhury et al. 2024, robust DPO", monotone_in_logp1=True,
           docs={**_BETA, "label_smoothing": "known rate eps of flipped preference labels (< 0.5)"},
           ranges={**_POSITIVE_BETA, **_FLIP})


# token-level policy-gradient losses (task group): presets of the clipped surrogate with their papers' hyperparameters
_PG = {"eps_low": "clip below: rho >= 1 - eps_low counts for A < 0",
       "eps_high": "clip above: rho <= 1 + eps_high counts for A > 0 (DAPO's clip-higher: eps_high > eps_low)",
       "kl_coef": "coefficient of the k3 KL to the reference per token (needs build-batches --reference)"}
_PG_RANGES = {"eps_low": "[0,1]", "eps_high": ">=0", "kl_coef": ">=0", "tis_cap": ">=0"}
_TIS = {"tis_cap": "truncated importance sampling C (Yao et al. 2025): each token times sg(min(pi_old/mu, C)), the "
                   "ratio then to pi_old = the trainer's own log-prob at this step; 0: off (ratio to mu, the sampler)"}
LOSSES.add("grpo", pg.grpo_loss, task="group", needs_reference=False, monotone_in_logp1=False,
           paper="Shao et al. 2024, DeepSeekMath GRPO (arXiv 2402.03300)", docs={**_PG, **_TIS}, ranges=_PG_RANGES)
LOSSES.add("dr-grpo", pg.dr_grpo_loss, task="group", needs_reference=False, monotone_in_logp1=False,
           paper="Liu et al. 2025, Dr. GRPO (arXiv 2503.20783)",
           docs={**_PG, **_TIS,
                 "max_tokens": "the constant C token sums are divided by (0: the batch's longest answer)"},
           ranges={**_PG_RANGES, "max_tokens": ">=0"})
LOSSES.add("dapo", pg.dapo_loss, task="group", needs_reference=False, monotone_in_logp1=False,
           paper="Yu et al. 2025, DAPO (arXiv 2503.14476)",
           docs={**_PG, **_TIS, "mean_tokens": "mean answer length of the normaliser (0: train sets the dataset's)"},
           ranges={**_PG_RANGES, "mean_tokens": ">=0"})
LOSSES.add("gspo", pg.gspo_loss, task="group", needs_reference=False, monotone_in_logp1=False,
           paper="Zheng et al. 2025, GSPO (arXiv 2507.18071)",
           docs={**_TIS, "eps_low": "clip below of the answer's ratio s_i (geometric mean of its token ratios)",
                 "eps_high": "clip above of the answer's ratio s_i",
                 "kl_coef": _PG["kl_coef"]}, ranges=_PG_RANGES)
LOSSES.add("cispo", pg.cispo_loss, task="group", needs_reference=False, monotone_in_logp1=False,
           paper="MiniMax 2025, MiniMax-M1 CISPO (arXiv 2506.13585)",
           docs={**_TIS, "eps_low": "the importance weight is raised to at least 1 - eps_low (1: no lower bound)",
                 "eps_high": "the importance weight is cut at 1 + eps_high (TRL's epsilon_high = 1 + eps_high)",
                 "kl_coef": _PG["kl_coef"],
                 "mean_tokens": "mean answer length of the normaliser (0: train sets the dataset's)"},
           ranges={**_PG_RANGES, "mean_tokens": ">=0"})
LOSSES.add("ppo", pg.ppo_loss, task="group", needs_reference=False, monotone_in_logp1=False,
           paper="Schulman et al. 2017, PPO (arXiv 1707.06347), per-token GAE advantages (build-batches --advantage gae)",
           docs={**_PG, "mean_tokens": "mean answer length of the normaliser (0: train sets the dataset's)"},
           ranges={"eps_low": "[0,1]", "eps_high": ">=0", "kl_coef": ">=0", "mean_tokens": ">=0"})
# the critic of PPO (alignpipe.training.value_loss): trains a value model (model='value') on the group batches' returns
LOSSES.add("value", vl.value_loss, task="group", model="value", needs_reference=False, monotone_in_logp1=False,
           paper="PPO's clipped value loss (OpenAI baselines ppo2; TRL cliprange_value, OpenRLHF value_clip)",
           docs={"clip": "value clipping c: V kept within V_old +- c in the max of the two squared errors (0: none)",
                 "mean_tokens": "mean answer length of the normaliser (0: train sets the dataset's)"},
           ranges={"clip": ">=0", "mean_tokens": ">=0"})
PG_LOSSES = {name: c.fn for name, c in LOSSES.items()
             if c.task == "group" and c.meta.get("model") != "value"}  # token-level policy-gradient losses


def is_value_loss(name: str) -> bool:
    """Whether loss `name` trains a critic (its table row says model='value'), not the policy."""
    return name in LOSSES and LOSSES[name].meta.get("model") == "value"


def _spec(name: str):
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}") from None


def hyperparameters(name: str) -> dict[str, float]:
    """The keyword hyperparameters of loss `name` with their defaults (the registry's, from the signature)."""
    return {k: p.default for k, p in _spec(name).params.items()}


def compute_loss(name: str, x: LossInputs, **hparams) -> tuple[Tensor, dict[str, Tensor]]:
    """Call loss `name` with the hparams it accepts (other names and None values are ignored)."""
    spec, accepted = _spec(name), hyperparameters(name)
    return spec.fn(x, **{k: v for k, v in hparams.items() if k in accepted and v is not None})
