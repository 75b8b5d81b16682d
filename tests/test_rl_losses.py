"""Token-level policy-gradient losses vs numbers computed by hand: the clipped surrogate, the three
aggregations, the k3 KL, REINFORCE at rho = 1, which side clipping removes, and the weight rule."""
from __future__ import annotations

import math

import pytest
import torch

from alignpipe.core.errors import UserError
from alignpipe.training.losses import PG_LOSSES
from alignpipe.training.policy_gradient import TokenInputs, batch_loss, clipped_pg

L2 = math.log(2.0)


def _value(*args) -> float:
    return batch_loss(*args).detach()


def _inputs(weight=(1.0, 1.0), ref=None):
    """Answer 1: A = +1, rho = [1, 1.5, 0.5]; answer 2: A = -1, rho = [1.5, 0.5], third token padding."""
    behaviour = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -1.0, -3.0]], dtype=torch.float64)
    rho = torch.tensor([[1.0, 1.5, 0.5], [1.5, 0.5, 9.0]], dtype=torch.float64)
    logp = (behaviour + rho.log()).requires_grad_()
    return TokenInputs(logp=logp, behaviour_logp=behaviour, mask=torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64),
                       advantage=torch.tensor([1.0, -1.0], dtype=torch.float64),
                       weight=torch.tensor(weight, dtype=torch.float64), ref_logp=ref)


# per-token losses by hand (eps 0.2): answer 1 -min(rho, clip) = [-1, -1.2, -0.5]; answer 2 -min(-rho, -clip)
# = [1.5, 0.8]. Token sums -2.7 and 2.3; token means -0.9 and 1.15.
@pytest.mark.parametrize("aggregation, max_tokens, expected", [
    ("sequence", 0, (-0.9 + 1.15) / 2),
    ("token", 0, (-2.7 + 2.3) / 5),
    ("constant", 4, (-2.7 / 4 + 2.3 / 4) / 2),
    ("constant", 0, (-2.7 / 3 + 2.3 / 3) / 2),  # C defaults to the padded width T = 3
])
def test_aggregations_match_hand_computed(aggregation, max_tokens, expected):
    x = _inputs()
    u, s, m = clipped_pg(x, aggregation=aggregation, eps_low=0.2, eps_high=0.2, kl_coef=0.0, max_tokens=max_tokens)
    assert float(_value(u, s, x.weight)) == pytest.approx(expected, abs=1e-12)
    assert float(m["clip/high"]) == pytest.approx(1 / 5) and float(m["clip/low"]) == pytest.approx(1 / 5)
    assert float(m["ratio/mean"]) == pytest.approx((1 + 1.5 + 0.5 + 1.5 + 0.5) / 5)
    assert float(m["ratio/std"]) == pytest.approx(math.sqrt((0 + 0.25 + 0.25 + 0.25 + 0.25) / 5 - 0.0), abs=1e-12)
    assert float(m["advantage/mean"]) == 0.0
    assert float(m["entropy_estimate"]) == pytest.approx(-float((x.logp.detach() * x.mask).sum()) / 5)


def test_gradient_by_hand_clipped_tokens_get_none():
    """d loss / d logp (sequence aggregation, B = 2): unclipped tokens -A rho / n_i / B, clipped ones 0."""
    x = _inputs()
    u, s, _ = clipped_pg(x, aggregation="sequence", eps_low=0.2, eps_high=0.2, kl_coef=0.0)
    batch_loss(u, s, x.weight).backward()
    expected = [[-1.0 / 3 / 2, 0.0, -0.5 / 3 / 2], [1.5 / 2 / 2, 0.0, 0.0]]
    assert torch.allclose(x.logp.grad, torch.tensor(expected, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("adv, rho, has_grad", [
    (1.0, 1.3, False),  # A > 0, rho > 1 + eps_high: clipped
    (1.0, 0.5, True),  # A > 0, rho < 1 - eps_low: the unclipped term is the smaller one, gradient kept
    (-1.0, 0.5, False),  # A < 0, rho < 1 - eps_low: clipped
    (-1.0, 1.3, True),  # A < 0, rho > 1 + eps_high: gradient kept (PPO's pessimism)
    (1.0, 1.1, True), (-1.0, 0.9, True),  # inside the band
    (1.0, 1.25, True),  # DAPO clip-higher: eps_high 0.28 lets 1.25 through
])
def test_clipping_removes_gradient_only_outside_the_band_on_the_papers_side(adv, rho, has_grad):
    eps_high = 0.28 if rho == 1.25 else 0.2
    logp = torch.tensor([[math.log(rho) - 1.0]], dtype=torch.float64, requires_grad=True)
    x = TokenInputs(logp=logp, behaviour_logp=torch.tensor([[-1.0]], dtype=torch.float64),
                    mask=torch.ones(1, 1, dtype=torch.float64), advantage=torch.tensor([adv], dtype=torch.float64),
                    weight=torch.ones(1, dtype=torch.float64))
    u, s, _ = clipped_pg(x, aggregation="token", eps_low=0.2, eps_high=eps_high, kl_coef=0.0)
    batch_loss(u, s, x.weight).backward()
    assert (abs(float(logp.grad)) > 0) == has_grad
    if has_grad:
        assert float(logp.grad) == pytest.approx(-adv * rho)


@pytest.mark.parametrize("name", sorted(PG_LOSSES))
def test_on_policy_gradient_is_reinforce(name):
    """rho = 1: the gradient equals that of REINFORCE, -sum_i c_i A_i sum_t logp_it, with the same aggregation."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3, 5, 1, 4])
    mask = (torch.arange(5)[None] < lengths[:, None]).double()
    logp = (-torch.rand(4, 5, generator=g, dtype=torch.float64) * 3).requires_grad_()
    adv = torch.randn(4, generator=g, dtype=torch.float64)
    x = TokenInputs(logp=logp, behaviour_logp=logp.detach().clone(), mask=mask, advantage=adv,
                    weight=torch.ones(4, dtype=torch.float64))
    total, m = PG_LOSSES[name](x)
    (total / 4).backward()  # the trainer's denominator: 4 examples of weight 1
    scale = {"grpo": 1 / lengths.double() / 4, "dr-grpo": torch.full((4,), 1 / 5 / 4, dtype=torch.float64),
             "dapo": torch.full((4,), 1 / float(lengths.sum()), dtype=torch.float64)}[name]
    expected = -(scale * adv)[:, None] * mask
    assert torch.allclose(logp.grad, expected, atol=1e-12)
    assert float(m["clip/high"]) == 0 and float(m["clip/low"]) == 0 and float(m["ratio/mean"]) == pytest.approx(1.0)


def test_k3_kl_by_hand():
    """ref - logp = ln 2 on every token: k3 = 2 - ln 2 - 1, added with its coefficient to every token."""
    x = _inputs()
    x.ref_logp = (x.logp.detach() + L2)
    k3 = 2 - L2 - 1
    u, s, m = clipped_pg(x, aggregation="token", eps_low=0.2, eps_high=0.2, kl_coef=0.1)
    assert float(_value(u, s, x.weight)) == pytest.approx((-2.7 + 2.3 + 5 * 0.1 * k3) / 5, abs=1e-12)
    assert float(m["kl"]) == pytest.approx(k3)
    x2 = _inputs()
    with pytest.raises(UserError, match="reference"):
        clipped_pg(x2, aggregation="token", eps_low=0.2, eps_high=0.2, kl_coef=0.1)


def _cat(a: TokenInputs, b: TokenInputs) -> TokenInputs:
    f = lambda n: torch.cat([getattr(a, n), getattr(b, n)])
    return TokenInputs(logp=f("logp"), behaviour_logp=f("behaviour_logp"), mask=f("mask"), advantage=f("advantage"),
                       weight=f("weight"))


def _pick(x: TokenInputs, rows: list[int]) -> TokenInputs:
    return TokenInputs(logp=x.logp[rows], behaviour_logp=x.behaviour_logp[rows], mask=x.mask[rows],
                       advantage=x.advantage[rows], weight=torch.ones(len(rows), dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(PG_LOSSES))
def test_weight_zero_is_absent_and_weight_two_is_twice(name):
    x = _inputs(weight=(2.0, 0.0))
    weighted, m = PG_LOSSES[name](x, **({"max_tokens": 3} if name == "dr-grpo" else {}))
    (gw,) = torch.autograd.grad(weighted, x.logp)
    y = _inputs()
    twice = _cat(_pick(y, [0]), _pick(y, [0]))
    plain, m2 = PG_LOSSES[name](twice, **({"max_tokens": 3} if name == "dr-grpo" else {}))
    (gp,) = torch.autograd.grad(plain, y.logp)
    assert float(weighted.detach()) == pytest.approx(float(plain.detach()), abs=1e-12)
    assert torch.allclose(gw, gp, atol=1e-12)  # the absent row gets no gradient, the doubled one the same
    for k in ("loss", "clip/high", "clip/low", "ratio/mean", "ratio/std", "advantage/mean", "entropy_estimate"):
        assert float(m[k]) == pytest.approx(float(m2[k]), abs=1e-12), k


def test_zero_weight_row_with_nan_contributes_nothing():
    x = _inputs(weight=(1.0, 0.0))
    x.behaviour_logp = x.behaviour_logp.clone()
    x.behaviour_logp[1, 0] = float("nan")
    u, s, _ = clipped_pg(x, aggregation="sequence", eps_low=0.2, eps_high=0.2, kl_coef=0.0)
    assert float(_value(u, s, x.weight)) == pytest.approx(-0.9)


@pytest.mark.parametrize("name, expected", [("grpo", -0.9 + 1.15), ("dr-grpo", -2.7 / 4 + 2.3 / 4),
                                            ("dapo", (-2.7 + 2.3) / 2.5)])
def test_registered_losses_return_the_weighted_sum_for_the_trainer(name, expected):
    """S = sum_i w_i u_i (DAPO: over the mean answer length, 2.5 tokens here); divided by the trainer's
    denominator (2 examples of weight 1) it is the batch loss; metrics["loss"] is that batch loss."""
    x = _inputs()
    x.logp = x.logp.detach()
    kw = {"dr-grpo": {"max_tokens": 4, "eps_high": 0.2}, "dapo": {"eps_high": 0.2}}.get(name, {})
    total, m = PG_LOSSES[name](x, **kw)
    assert float(total) == pytest.approx(expected, abs=1e-12)
    assert float(m["loss"]) == pytest.approx(expected / 2, abs=1e-12)
    if name == "dapo":  # the dataset's mean answer length instead of the batch's
        total, _ = PG_LOSSES[name](x, eps_high=0.2, mean_tokens=5.0)
        assert float(total) == pytest.approx((-2.7 + 2.3) / 5, abs=1e-12)
