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
    token_mean = torch.full((4,), 1 / float(lengths.sum()), dtype=torch.float64)
    scale = {"grpo": 1 / lengths.double() / 4, "dr-grpo": torch.full((4,), 1 / 5 / 4, dtype=torch.float64),
             "dapo": token_mean, "gspo": 1 / lengths.double() / 4, "cispo": token_mean, "ppo": token_mean}[name]
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


# ------------------------------------------------------------------------------------------------ GSPO
# _inputs(): answer 1 (A = +1) token ratios [1, 1.5, 0.5], answer 2 (A = -1) [1.5, 0.5]: each product is 0.75,
# so s_1 = 0.75^(1/3) (three tokens) and s_2 = 0.75^(1/2) (two tokens).
S1, S2 = 0.75 ** (1 / 3), 0.75 ** 0.5


def test_gspo_sequence_ratio_by_hand_inside_the_band():
    """eps 0.2: both s_i inside [0.8, 1.2]: L = (-s_1 + s_2) / 2; d L / d logp_{i,t} = -A_i s_i / (|o_i| 2)."""
    from alignpipe.training.policy_gradient import gspo_loss

    x = _inputs()
    total, m = gspo_loss(x, eps_low=0.2, eps_high=0.2)
    (total / 2).backward()
    assert float(m["loss"]) == pytest.approx((-S1 + S2) / 2, abs=1e-12)
    assert float(total.detach()) == pytest.approx(-S1 + S2, abs=1e-12)
    expected = [[-S1 / 3 / 2] * 3, [S2 / 2 / 2, S2 / 2 / 2, 0.0]]
    assert torch.allclose(x.logp.grad, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert float(m["ratio/mean"]) == pytest.approx((3 * S1 + 2 * S2) / 5)
    assert float(m["clip/low"]) == 0 and float(m["clip/high"]) == 0


def test_gspo_paper_clip_range_clips_whole_answers():
    """The paper's 3e-4 / 4e-4: answer 2 (A < 0, s_2 = 0.866 < 1 - 3e-4) is clipped as a whole, its tokens get
    no gradient and its term is -(1 - 3e-4) A = 0.9997; answer 1 (A > 0, s_1 < 1) keeps its gradient."""
    from alignpipe.training.policy_gradient import gspo_loss

    x = _inputs()
    total, m = gspo_loss(x)
    (total / 2).backward()
    assert float(m["loss"]) == pytest.approx((-S1 + (1 - 3e-4)) / 2, abs=1e-12)
    expected = [[-S1 / 3 / 2] * 3, [0.0, 0.0, 0.0]]
    assert torch.allclose(x.logp.grad, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert float(m["clip/low"]) == pytest.approx(2 / 5)  # answer 2's two tokens


def test_gspo_equals_trl_sequence_level_loss_on_random_batches():
    """TRL's _compute_loss with importance_sampling_level="sequence", loss_type="grpo", beta=0, written out:
    coef_1 = exp(sum(m log_ratio) / sum(m)), per_token_loss = -min(coef_1 A, clamp(coef_1) A), the mean over
    answers of the token means. Value and gradient equal ours."""
    from alignpipe.training.policy_gradient import gspo_loss

    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([4, 2, 6, 1, 5])
    mask = (torch.arange(6)[None] < lengths[:, None]).double()
    base = -torch.rand(5, 6, generator=g, dtype=torch.float64) * 2
    old = base + 0.01 * torch.randn(5, 6, generator=g, dtype=torch.float64)
    adv = torch.randn(5, generator=g, dtype=torch.float64)
    ours_logp, trl_logp = base.clone().requires_grad_(), base.clone().requires_grad_()
    x = TokenInputs(logp=ours_logp, behaviour_logp=old, mask=mask, advantage=adv, weight=torch.ones(5, dtype=torch.float64))
    total, _ = gspo_loss(x, eps_low=3e-3, eps_high=4e-3)
    (total / 5).backward()
    log_w = (((trl_logp - old) * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_w)
    coef_2 = torch.clamp(coef_1, 1 - 3e-3, 1 + 4e-3)
    per_token = -torch.min(coef_1 * adv[:, None], coef_2 * adv[:, None])
    trl = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    trl.backward()
    assert float(total.detach() / 5) == pytest.approx(float(trl.detach()), abs=1e-12)
    assert torch.allclose(ours_logp.grad, trl_logp.grad, atol=1e-12)
    assert int((ours_logp.grad.abs() > 0).sum()) not in (0, int(mask.sum()))  # some answers clipped, some not


# ----------------------------------------------------------------------------------------------- CISPO
def test_cispo_by_hand_clipped_weights_keep_every_gradient():
    """eps 0.2: weights clip(rho) = [1, 1.2, 0.8] (A = +1) and [1.2, 0.8] (A = -1), no gradient through them;
    l = -w A logp; one mean over the 5 tokens; d / d logp = -w A / 5 on every token, the clipped ones too."""
    from alignpipe.training.policy_gradient import cispo_loss

    x = _inputs()
    total, m = cispo_loss(x, eps_low=0.2, eps_high=0.2)
    (total / 2).backward()  # S / (2 examples) = sum / (2 * 2.5 tokens)
    lp = x.logp.detach()
    by_hand = -(1.0 * lp[0, 0] + 1.2 * lp[0, 1] + 0.8 * lp[0, 2]) + (1.2 * lp[1, 0] + 0.8 * lp[1, 1])
    assert float(m["loss"]) == pytest.approx(float(by_hand) / 5, abs=1e-12)
    expected = [[-1.0 / 5, -1.2 / 5, -0.8 / 5], [1.2 / 5, 0.8 / 5, 0.0]]
    assert torch.allclose(x.logp.grad, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert float(m["clip/high"]) == pytest.approx(2 / 5) and float(m["clip/low"]) == pytest.approx(2 / 5)


def test_cispo_defaults_no_lower_bound_upper_bound_five():
    """Defaults eps_low = 1, eps_high = 4: weights in [0, 5]: the ratios 1.5 and 0.5 pass; a ratio 9 is cut at 5."""
    from alignpipe.training.policy_gradient import cispo_loss

    x = _inputs()
    total, m = cispo_loss(x)
    (total / 2).backward()
    expected = [[-1.0 / 5, -1.5 / 5, -0.5 / 5], [1.5 / 5, 0.5 / 5, 0.0]]
    assert torch.allclose(x.logp.grad, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    one = torch.tensor([[math.log(9.0) - 1.0]], dtype=torch.float64, requires_grad=True)
    y = TokenInputs(logp=one, behaviour_logp=torch.tensor([[-1.0]], dtype=torch.float64),
                    mask=torch.ones(1, 1, dtype=torch.float64), advantage=torch.tensor([2.0], dtype=torch.float64),
                    weight=torch.ones(1, dtype=torch.float64))
    total, m = cispo_loss(y)
    total.backward()
    assert float(one.grad) == pytest.approx(-5.0 * 2.0) and float(m["clip/high"]) == 1.0


# ------------------------------------------------------------------------------------------------- TIS
def test_tis_without_a_recomputed_old_policy_by_hand():
    """tis_cap 1.2, no old_logp: pi_old = sg(logp), so rho = 1 and the token weights are min(pi/mu, 1.2):
    [1, 1.2, 0.5] (A = +1) and [1.2, 0.5] (A = -1); GRPO's token means -2.7/3 and 1.7/2."""
    from alignpipe.training.policy_gradient import grpo_loss

    x = _inputs()
    total, m = grpo_loss(x, tis_cap=1.2)
    (total / 2).backward()
    assert float(m["loss"]) == pytest.approx((-0.9 + 0.85) / 2, abs=1e-12)
    expected = [[-1.0 / 3 / 2, -1.2 / 3 / 2, -0.5 / 3 / 2], [1.2 / 2 / 2, 0.5 / 2 / 2, 0.0]]
    assert torch.allclose(x.logp.grad, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert float(m["tis/mean"]) == pytest.approx((1 + 1.2 + 0.5 + 1.2 + 0.5) / 5)
    assert float(m["tis/capped"]) == pytest.approx(2 / 5) and float(m["ratio/mean"]) == pytest.approx(1.0)


def test_tis_with_a_recomputed_old_policy_by_hand():
    """One answer, A = +1, two tokens: pi_old/mu = [2, 0.5], pi/pi_old = [1.1, 1.5], C = 1.5, eps 0.2.
    Weights min([2, 0.5], 1.5) = [1.5, 0.5]; surrogate [-1.1, -1.2 (clipped)]; l = [-1.65, -0.6], mean -1.125;
    gradient -1.1 * 1.5 / 2 on token 1, none on the clipped token 2. No gradient flows into the weights."""
    from alignpipe.training.policy_gradient import grpo_loss

    mu = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    old = mu + torch.tensor([[2.0, 0.5]], dtype=torch.float64).log()
    logp = (old + torch.tensor([[1.1, 1.5]], dtype=torch.float64).log()).requires_grad_()
    x = TokenInputs(logp=logp, behaviour_logp=mu, mask=torch.ones(1, 2, dtype=torch.float64),
                    advantage=torch.tensor([1.0], dtype=torch.float64), weight=torch.ones(1, dtype=torch.float64),
                    old_logp=old)
    total, m = grpo_loss(x, tis_cap=1.5)
    total.backward()
    assert float(m["loss"]) == pytest.approx(-1.125, abs=1e-12)
    assert torch.allclose(logp.grad, torch.tensor([[-1.1 * 1.5 / 2, 0.0]], dtype=torch.float64), atol=1e-12)
    assert float(m["tis/capped"]) == pytest.approx(0.5) and float(m["clip/high"]) == pytest.approx(0.5)


@pytest.mark.parametrize("name", ["grpo", "dr-grpo", "dapo", "gspo", "cispo"])
def test_tis_off_is_the_loss_without_it_and_on_policy_tis_changes_nothing(name):
    """tis_cap 0 is the plain loss; on-policy (mu = pi) with any cap >= 1, TIS leaves value and gradient as they
    were (weights 1)."""
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    base = -torch.rand(2, 3, generator=g, dtype=torch.float64)
    grads = []
    for cap in (0.0, 2.0):
        logp = base.clone().requires_grad_()
        x = TokenInputs(logp=logp, behaviour_logp=base.clone(), mask=mask,
                        advantage=torch.tensor([1.0, -0.5], dtype=torch.float64), weight=torch.ones(2, dtype=torch.float64))
        total, _ = PG_LOSSES[name](x, tis_cap=cap, **({"max_tokens": 3} if name == "dr-grpo" else {}))
        grads.append((float(total.detach()), torch.autograd.grad(total, logp)[0]))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-12) and torch.allclose(grads[0][1], grads[1][1])
