"""Advantage estimators for group-sampled answers: pure functions of rewards, one table.

Input: the rewards of one generation batch as groups, one group per prompt (the N answers sampled for it),
``groups[g][i] = r_{g,i}``. Output: an advantage per answer, same shape. Every estimator has the signature
``fn(groups: list[list[float]], *, <hyperparameters>) -> list[list[float]]`` and sees the whole batch, so
that batch-level estimators (REINFORCE++) fit the same table as group-level ones. No torch: build-batches
calls them on plain floats.

Groups whose rewards are all equal carry no signal for a group-relative estimator (every advantage is 0):
:func:`split_equal_groups` drops them and counts them (DAPO's dynamic sampling, arXiv 2503.14476 eq. 11)
or keeps them, by option.
"""
from __future__ import annotations

import math
from collections.abc import Callable

from alignpipe.batches import gae as gae_pass
from alignpipe.core.registry import ESTIMATORS as REGISTRY_ESTIMATORS
from alignpipe.core.registry import REQUIRED, Param

Groups = list[list[float]]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _std(xs: list[float]) -> float:
    """Sample standard deviation (Bessel-corrected, as torch.std and TRL's GRPOTrainer); 0 for one value."""
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def grpo(groups: Groups, *, eps: float = 1e-4) -> Groups:
    """GRPO, outcome supervision (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300, sec. 4.1.2).

    A_{g,i} = (r_{g,i} - mean_j r_{g,j}) / (std_j r_{g,j} + eps),  std Bessel-corrected (as TRL).
    """
    out = []
    for g in groups:
        m, s = _mean(g), _std(g)
        out.append([(r - m) / (s + eps) for r in g])
    return out


def dr_grpo(groups: Groups) -> Groups:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv 2503.20783, eq. 3):
    the group mean baseline without the std division (no question-difficulty bias).

    A_{g,i} = r_{g,i} - mean_j r_{g,j}
    """
    return [[r - _mean(g) for r in g] for g in groups]


def rloo(groups: Groups) -> Groups:
    """RLOO (Ahmadian et al. 2024, "Back to Basics", arXiv 2402.14740, eq. 6): leave-one-out baseline.

    A_{g,i} = r_{g,i} - 1/(N-1) sum_{j != i} r_{g,j}  =  N/(N-1) (r_{g,i} - mean_j r_{g,j});  0 when N = 1.
    """
    out = []
    for g in groups:
        n, total = len(g), sum(g)
        out.append([r - (total - r) / (n - 1) if n > 1 else 0.0 for r in g])
    return out


def reinforce_pp(groups: Groups, *, eps: float = 1e-8) -> Groups:
    """REINFORCE++ (Hu 2025, arXiv 2501.03262, sec. 3.2): the reward normalised across the whole batch.

    A_{g,i} = (r_{g,i} - mean_{batch} r) / (std_{batch} r + eps)   (batch = every answer of every group;
    std Bessel-corrected). The KL penalty the paper folds into r is the loss's `kl_coef` here.
    """
    flat = [r for g in groups for r in g]
    m, s = _mean(flat), _std(flat)
    return [[(r - m) / (s + eps) for r in g] for g in groups]


def reinforce_pp_baseline(groups: Groups, *, eps: float = 1e-8) -> Groups:
    """REINFORCE++-baseline (Hu 2025, arXiv 2501.03262 v3, eq. 10): the group mean subtracted first, then the
    result normalised across the whole batch.

    a_{g,i} = r_{g,i} - mean_j r_{g,j};  A_{g,i} = (a_{g,i} - mean_{batch} a) / (std_{batch} a + eps)
    """
    return reinforce_pp(dr_grpo(groups), eps=eps)


ADVANTAGES = REGISTRY_ESTIMATORS  # the registry's table (alignpipe.core.registry), rows added here
ADVANTAGES.add("grpo", grpo, docs={"eps": "added to the group's std"}, ranges={"eps": ">0"})
ADVANTAGES.add("dr-grpo", dr_grpo)
ADVANTAGES.add("rloo", rloo)
ADVANTAGES.add("reinforce++", reinforce_pp, docs={"eps": "added to the batch's std"}, ranges={"eps": ">0"})
ADVANTAGES.add("reinforce++-baseline", reinforce_pp_baseline, docs={"eps": "added to the batch's std"},
               ranges={"eps": ">0"})
ESTIMATORS: dict[str, Callable[..., Groups]] = {name: ADVANTAGES[name].fn for name in ADVANTAGES}
# per-token advantages from a critic's values (PPO): not a function of group rewards; computed by build-batches
# after tokenising (alignpipe.batches.gae), so not in ESTIMATORS
ADVANTAGES.add("gae", gae_pass.gae_estimator, per_token=True,
               doc="GAE (Schulman et al. 2016, arXiv 1506.02438) per token from a critic's values, the reward at "
                   "the answer's last token (PPO); advantages whitened over the batch",
               params={"critic": Param(REQUIRED, str, "the critic: a sequence-classification folder (reward model "
                                                      "or `train --loss value` output), or a causal LM (new zero "
                                                      "value head)"),
                       "gamma": Param(1.0, float, "discount per token"),
                       "lam": Param(0.95, float, "GAE lambda: 1 = Monte-Carlo returns, 0 = one-step TD"),
                       "whiten": Param(True, bool, "whiten the advantages over every token of the batch (as TRL)")},
               ranges={"gamma": "[0,1]", "lam": "[0,1]"})
EQUAL_GROUPS = ("drop", "keep")


def estimator(spec: str) -> Callable[[Groups], Groups]:
    """`--advantage NAME[,key=value...]` -> groups -> advantages (a UserError names a bad spec)."""
    parsed = ADVANTAGES.parse(spec)
    return lambda groups: parsed.component.fn(groups, **parsed.kwargs)


def split_equal_groups(groups: Groups, mode: str = "drop", tol: float = 0.0) -> tuple[list[int], int]:
    """(indices of the groups kept, number of equal-reward groups). A group is equal when max - min <= tol;
    `drop` removes equal groups (DAPO dynamic sampling), `keep` keeps every group. Both count them."""
    if mode not in EQUAL_GROUPS:
        raise ValueError(f"equal-groups mode {mode!r}: choose from {', '.join(EQUAL_GROUPS)}")
    equal = [max(g) - min(g) <= tol for g in groups]
    keep = [i for i, e in enumerate(equal) if not (e and mode == "drop")]
    return keep, sum(equal)


def advantages(name: str, groups: Groups, equal_groups: str = "drop", **hparams) -> tuple[Groups, list[int], int]:
    """Estimate advantages of `groups` with estimator `name` after the equal-group rule.

    Returns (advantages of the kept groups, indices of the kept groups, number of equal-reward groups)."""
    if name not in ESTIMATORS:
        raise ValueError(f"advantage estimator {name!r}: choose from {', '.join(ESTIMATORS)}")
    keep, equal = split_equal_groups(groups, equal_groups)
    kept = [list(map(float, groups[i])) for i in keep]
    return (ESTIMATORS[name](kept, **hparams) if kept else []), keep, equal
