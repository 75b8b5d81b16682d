"""alignpipe.training.losses: hand-computed values, paper-formula re-implementations, properties over the table."""
from __future__ import annotations

import math

import pytest
import torch

from alignpipe.training.losses import (
    LOSSES,
    LossInputs,
    compute_loss,
    hyperparameters,
    weighted_mean,
    weighted_sum,
)

D = torch.float64


def T(*v):
    return torch.tensor(v, dtype=D)


def sp(z):  # softplus; -log sigmoid(z) == sp(-z)
    return math.log1p(math.exp(z))


def sig(z):
    return 1 / (1 + math.exp(-z))


def close(a, b, tol=1e-10):
    a, b = (v.detach() if torch.is_tensor(v) else v for v in (a, b))
    return abs(float(a) - float(b)) <= tol


# A small pairwise batch used by several hand-computed tests (B=2, weights 1 and 3):
# log-ratios lr1 = logp1 - ref1 = [1, -1], lr2 = logp2 - ref2 = [-1, 1]  ->  lr1 - lr2 = [2, -2]
PAIR = {"logp1": T(-1, -3), "len1": T(2, 1), "logp2": T(-4, -2), "len2": T(1, 2),
        "ref_logp1": T(-2, -2), "ref_logp2": T(-3, -3), "weight": T(1, 3)}


# ------------------------------------------------------------------------------------ hand-computed values
def test_sft_by_hand():
    x = LossInputs(logp1=T(-2, -6), len1=T(2, 3), weight=T(1, 3))
    loss, m = compute_loss("sft", x)
    assert close(loss, 1 * 1.0 + 3 * 2.0)  # per-token NLL 2/2 = 1 and 6/3 = 2: the weighted sum
    assert close(m["loss"], (1 * 1.0 + 3 * 2.0) / 4)  # the weighted mean
    assert close(m["logps/chosen"], (-2 - 18) / 4)


def test_reward_by_hand_with_and_without_margin():
    base = {"logp1": T(1.0, 0.5), "logp2": T(0.0, 1.0), "len1": T(1, 1), "weight": T(2, 1)}
    loss, m = compute_loss("reward", LossInputs(**base))
    assert close(loss, 2 * sp(-1.0) + sp(0.5)) and close(m["loss"], (2 * sp(-1.0) + sp(0.5)) / 3)
    assert close(m["rewards/accuracy"], 2 / 3)
    loss, m = compute_loss("reward", LossInputs(**base, margin=T(0.5, 0.0)))
    assert close(loss, 2 * sp(-0.5) + sp(0.5))  # -log sigmoid(1 - 0 - 0.5), -log sigmoid(0.5 - 1 - 0)
    assert close(m["loss"], (2 * sp(-0.5) + sp(0.5)) / 3)


def test_dpo_by_hand():
    loss, m = compute_loss("dpo", LossInputs(**PAIR), beta=0.5)  # h = 0.5 * [2, -2] = [1, -1]
    assert close(loss, sp(-1.0) + 3 * sp(1.0)) and close(m["loss"], (sp(-1.0) + 3 * sp(1.0)) / 4)
    assert close(m["rewards/chosen"], (0.5 * 1 + 3 * 0.5 * -1) / 4)
    assert close(m["rewards/rejected"], (0.5 * -1 + 3 * 0.5 * 1) / 4)
    assert close(m["rewards/margin"], (1 - 3) / 4)
    assert close(m["rewards/accuracy"], 1 / 4)
    assert close(m["logratio"], 0.0)
    assert close(m["logps/chosen"], (-1 - 9) / 4) and close(m["logps/rejected"], (-4 - 6) / 4)


def test_logratio_by_hand_is_no_kl():
    """DPO-family `logratio`: the weighted mean of (lr1 + lr2) / 2, below zero when the policy makes both answers
    less likely than the reference does (a KL never is)."""
    x = {"logp1": T(-3, -5), "len1": T(1, 1), "logp2": T(-4, -6), "len2": T(1, 1),
         "ref_logp1": T(-2, -2), "ref_logp2": T(-3, -3), "weight": T(1, 3)}  # lr1 = lr2 = [-1, -3]
    for name in ("dpo", "cdpo", "robust-dpo", "ipo"):
        _, m = compute_loss(name, LossInputs(**x))
        assert close(m["logratio"], (1 * -1 + 3 * -3) / 4) and "kl" not in m, name
    _, m = compute_loss("ipo", LossInputs(**x), length_normalize=True)  # lengths 1: the same number
    assert close(m["logratio"], -2.5)


def test_cdpo_by_hand():
    def per(h):
        return 0.8 * sp(-h) + 0.2 * sp(h)
    loss, m = compute_loss("cdpo", LossInputs(**PAIR), beta=0.5, label_smoothing=0.2)
    assert close(loss, per(1.0) + 3 * per(-1.0)) and close(m["loss"], (per(1.0) + 3 * per(-1.0)) / 4)


def test_robust_dpo_by_hand():
    def per(h):
        return (0.8 * sp(-h) - 0.2 * sp(h)) / (1 - 2 * 0.2)
    loss, m = compute_loss("robust-dpo", LossInputs(**PAIR), beta=0.5, label_smoothing=0.2)
    assert close(loss, per(1.0) + 3 * per(-1.0)) and close(m["loss"], (per(1.0) + 3 * per(-1.0)) / 4)
    with pytest.raises(ValueError):
        compute_loss("robust-dpo", LossInputs(**PAIR), label_smoothing=0.5)


def test_ipo_by_hand_sum_and_length_normalized():
    loss, m = compute_loss("ipo", LossInputs(**PAIR), tau=0.25)  # target 1/(2 tau) = 2; h = [2, -2]
    assert close(loss, 1 * (2 - 2) ** 2 + 3 * (-2 - 2) ** 2) and close(m["loss"], (0 + 3 * 16) / 4)
    # per-token: h = [1/2 - (-1)/1, (-1)/1 - 1/2] = [1.5, -1.5]
    loss, m = compute_loss("ipo", LossInputs(**PAIR), tau=0.25, length_normalize=True)
    assert close(loss, 1 * (1.5 - 2) ** 2 + 3 * (-1.5 - 2) ** 2)
    assert close(m["loss"], (0.25 + 3 * 12.25) / 4)


def test_slic_by_hand():
    loss, m = compute_loss("slic", LossInputs(**PAIR), delta=1.0, lam=0.5)
    l0 = max(0.0, 1.0 - (-1 - -4)) + 0.5 * (1 / 2)  # hinge 0, NLL 0.5
    l1 = max(0.0, 1.0 - (-3 - -2)) + 0.5 * (3 / 1)  # hinge 2, NLL 3
    assert close(loss, l0 + 3 * l1) and close(m["loss"], (l0 + 3 * l1) / 4)
    assert close(m["rewards/accuracy"], 1 / 4)  # logp/len: -0.5 > -4 yes, -3 > -1 no


def test_kto_by_hand():
    base = {"logp1": T(-1, -2, -3), "ref_logp1": T(-3, -2, -1), "len1": T(1, 1, 1), "weight": T(2, 1, 1),
            "label": torch.tensor([True, False, True])}  # r = [2, 0, -2]
    z0 = (2 * 2 + 0 - 2) / 4  # weighted mean of r = 0.5 > 0
    hp = {"beta": 0.5, "desirable_weight": 1.0, "undesirable_weight": 2.0}
    loss, m = compute_loss("kto", LossInputs(**base), **hp)
    per = [1 - sig(0.5 * (2 - z0)), 2 * (1 - sig(0.5 * (z0 - 0))), 1 - sig(0.5 * (-2 - z0))]
    assert close(loss, 2 * per[0] + per[1] + per[2])
    assert close(m["loss"], (2 * per[0] + per[1] + per[2]) / 4)
    assert close(m["z0"], z0)
    # KL from mismatched pairs: weighted mean of [-1, 1, 0] = -0.25 -> clamped to z0 = 0
    kl = {"kl_logp": T(-5, -5, -5), "ref_kl_logp": T(-4, -6, -5)}
    loss, m = compute_loss("kto", LossInputs(**base, **kl), **hp)
    per = [1 - sig(0.5 * 2), 2 * (1 - sig(0.0)), 1 - sig(0.5 * -2)]
    assert close(loss, 2 * per[0] + per[1] + per[2]) and close(m["z0"], 0.0)
    assert close(m["loss"], (2 * per[0] + per[1] + per[2]) / 4)


def test_simpo_by_hand():
    loss, m = compute_loss("simpo", LossInputs(**PAIR), beta=2.0, gamma=0.5)
    z0 = 2 * (-1 / 2) - 2 * (-4 / 1) - 0.5  # 6.5
    z1 = 2 * (-3 / 1) - 2 * (-2 / 2) - 0.5  # -4.5
    assert close(loss, sp(-z0) + 3 * sp(-z1)) and close(m["loss"], (sp(-z0) + 3 * sp(-z1)) / 4)
    assert close(m["rewards/chosen"], (2 * -0.5 + 3 * 2 * -3) / 4)


def test_orpo_by_hand():
    def log_odds(a):
        return a - math.log(1 - math.exp(a))
    loss, m = compute_loss("orpo", LossInputs(**PAIR), lam=0.5)
    a1, a2 = [-1 / 2, -3 / 1], [-4 / 1, -2 / 2]
    per = [-a1[i] + 0.5 * sp(-(log_odds(a1[i]) - log_odds(a2[i]))) for i in range(2)]
    assert close(loss, per[0] + 3 * per[1]) and close(m["loss"], (per[0] + 3 * per[1]) / 4)


# --------------------------------------------------------------------- paper formulas on random inputs
def rand_fields(B=16, seed=0):
    g = torch.Generator().manual_seed(seed)

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(B, generator=g, dtype=D)
    len1, len2 = torch.randint(1, 20, (B,), generator=g).to(D), torch.randint(1, 20, (B,), generator=g).to(D)
    logp1, logp2 = -len1 * u(0.5, 3.0), -len2 * u(0.5, 3.0)  # mean token log-prob in [-3, -0.5]
    return {
        "logp1": logp1, "len1": len1, "logp2": logp2, "len2": len2,
        "ref_logp1": logp1 + torch.randn(B, generator=g, dtype=D),
        "ref_logp2": logp2 + torch.randn(B, generator=g, dtype=D),
        "weight": u(0.2, 2.0), "label": torch.rand(B, generator=g) < 0.5, "margin": u(0.0, 1.0),
        "kl_logp": -u(5.0, 20.0), "ref_kl_logp": -u(5.0, 20.0),
        # the group task (token-level policy-gradient losses): per-token log-probs of answers of 1..6 tokens,
        # behaviour log-probs 0.3 nats around them (some ratios outside the clip band), advantages
        "tok_logp": -3 * torch.rand(B, 6, generator=g, dtype=D),
        "tok_shift": 0.3 * torch.randn(B, 6, generator=g, dtype=D),
        "tok_mask": (torch.arange(6)[None] < torch.randint(1, 7, (B, 1), generator=g)).to(D),
        "advantage": torch.randn(B, generator=g, dtype=D),
    }


_LOSS_FIELDS = set(LossInputs.__dataclass_fields__)


def _pointwise_inputs(fields):
    return LossInputs(**{k: v for k, v in fields.items() if k in _LOSS_FIELDS})


def loss_inputs(name, fields):
    """LossInputs, or TokenInputs for the group task, from rand_fields-style fields."""
    from alignpipe.training.policy_gradient import TokenInputs
    from alignpipe.training.value_loss import ValueInputs

    if LOSSES[name].meta.get("model") == "value":  # PPO's critic: tok_logp stands for its values V
        v = fields["tok_logp"]
        return ValueInputs(values=v, old_values=v.detach() + fields["tok_shift"],
                           returns=v.detach() - 2 * fields["tok_shift"], mask=fields["tok_mask"], weight=fields["weight"])
    if LOSSES[name].task == "group":
        return TokenInputs(logp=fields["tok_logp"], behaviour_logp=fields["tok_logp"].detach() + fields["tok_shift"],
                           mask=fields["tok_mask"], advantage=fields["advantage"], weight=fields["weight"])
    return LossInputs(**{k: v for k, v in fields.items() if k in _LOSS_FIELDS})


def py(t):  # tensors -> python lists, for the independent per-element re-implementations
    return {k: v.tolist() for k, v in t.items()}


def wsum(vals, w):
    return sum(a * b for a, b in zip(vals, w, strict=True))


def wmean(vals, w):
    return wsum(vals, w) / sum(w)


def test_dpo_matches_paper_formula():
    t = rand_fields(seed=1)
    p, beta = py(t), 0.3
    per = [-math.log(sig(beta * ((p["logp1"][i] - p["ref_logp1"][i]) - (p["logp2"][i] - p["ref_logp2"][i]))))
           for i in range(16)]
    assert close(compute_loss("dpo", _pointwise_inputs(t), beta=beta)[0], wsum(per, p["weight"]), 1e-6)


@pytest.mark.parametrize("length_normalize", [False, True])
def test_ipo_matches_paper_formula(length_normalize):
    t = rand_fields(seed=2)
    p, tau = py(t), 0.5
    n1, n2 = (p["len1"], p["len2"]) if length_normalize else ([1.0] * 16, [1.0] * 16)
    per = [((p["logp1"][i] - p["ref_logp1"][i]) / n1[i] - (p["logp2"][i] - p["ref_logp2"][i]) / n2[i]
            - 1 / (2 * tau)) ** 2 for i in range(16)]
    loss, _ = compute_loss("ipo", _pointwise_inputs(t), tau=tau, length_normalize=length_normalize)
    assert close(loss, wsum(per, p["weight"]), 1e-6)


@pytest.mark.parametrize("with_kl", [False, True])
def test_kto_matches_paper_formula(with_kl):
    t = rand_fields(seed=3)
    if with_kl:  # shift references so that z0 > 0 (not clamped) and gradients could flow through it
        t["ref_kl_logp"], t["kl_logp"] = t["ref_kl_logp"] - 5.0, t["kl_logp"].requires_grad_()
    else:  # z0 from r itself
        t["kl_logp"] = t["ref_kl_logp"] = None
        t["ref_logp1"] = t["ref_logp1"] - 2.0
    p, beta, lam_d, lam_u = py({k: v for k, v in t.items() if v is not None}), 0.2, 1.3, 0.7
    r = [p["logp1"][i] - p["ref_logp1"][i] for i in range(16)]
    kl = [p["kl_logp"][i] - p["ref_kl_logp"][i] for i in range(16)] if with_kl else r
    z0 = max(0.0, wmean(kl, p["weight"]))
    assert z0 > 0
    per = [lam_d * (1 - sig(beta * (r[i] - z0))) if p["label"][i] else lam_u * (1 - sig(beta * (z0 - r[i])))
           for i in range(16)]
    hp = {"beta": beta, "desirable_weight": lam_d, "undesirable_weight": lam_u}
    loss, m = compute_loss("kto", _pointwise_inputs(dict(t, logp1=t["logp1"].requires_grad_())), **hp)
    assert close(loss, wsum(per, p["weight"]), 1e-6) and close(m["z0"], z0, 1e-6)
    # z0 is a detached constant: d l_i / d r_i = -lambda_D beta s(1-s) or +lambda_U beta s(1-s)
    s = [sig(beta * (r[i] - z0) if p["label"][i] else beta * (z0 - r[i])) for i in range(16)]
    grad = [w * beta * s[i] * (1 - s[i]) * (-lam_d if p["label"][i] else lam_u)
            for i, w in enumerate(p["weight"])]
    g = torch.autograd.grad(loss, [t["logp1"], t["kl_logp"]] if with_kl else [t["logp1"]], allow_unused=True)
    assert torch.allclose(g[0], T(*grad), atol=1e-10) and (not with_kl or g[1] is None or (g[1] == 0).all())


def test_simpo_matches_paper_formula():
    t = rand_fields(seed=4)
    p, beta, gamma = py(t), 2.5, 1.4
    per = [-math.log(sig(beta / p["len1"][i] * p["logp1"][i] - beta / p["len2"][i] * p["logp2"][i] - gamma))
           for i in range(16)]
    loss, _ = compute_loss("simpo", _pointwise_inputs(t), beta=beta, gamma=gamma)
    assert close(loss, wsum(per, p["weight"]), 1e-6)


@pytest.mark.parametrize("name", ["cdpo", "robust-dpo"])
def test_label_smoothing_zero_is_dpo(name):
    x = _pointwise_inputs(rand_fields(seed=5))
    loss, m = compute_loss(name, x, beta=0.2, label_smoothing=0.0)
    ref, m_ref = compute_loss("dpo", x, beta=0.2)
    assert torch.allclose(loss, ref, atol=1e-12, rtol=0)
    assert all(torch.allclose(m[k], m_ref[k]) for k in m_ref)


# ------------------------------------------------------------------- properties over the whole table
NAMES = sorted(LOSSES)
same = lambda a, b: torch.allclose(a, b, atol=1e-10, rtol=1e-9)
REQUIRED_METRICS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
                    "logps/chosen", "logps/rejected"}


def run(name, t, idx=None, weight=None, **hp):
    """Loss and d loss / d (logp1, logp2) of the B base rows; rows are picked by `idx` (may repeat/omit)."""
    leaves = {k: t[k].clone().requires_grad_() for k in ("logp1", "logp2", "tok_logp")}
    idx = torch.arange(len(t["weight"])) if idx is None else idx
    fields = {k: leaves.get(k, v)[idx] for k, v in t.items()}
    if weight is not None:
        fields["weight"] = weight
    loss, metrics = compute_loss(name, loss_inputs(name, fields), **hp)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves.values())]
    return loss.detach(), torch.cat([g.flatten() for g in grads]), metrics


def test_registry_keys_and_specs():
    assert set(LOSSES) == {"sft", "reward", "dpo", "cdpo", "ipo", "slic", "kto", "simpo", "orpo",
                           "robust-dpo", "grpo", "dr-grpo", "dapo", "gspo", "cispo", "ppo", "value"}
    for spec in LOSSES.values():
        assert spec.task in {"sft", "reward", "pointwise", "pairwise", "group"} and spec.paper


@pytest.mark.parametrize("name", NAMES)
def test_finite_loss_gradients_and_metrics(name):
    loss, grads, m = run(name, rand_fields(seed=6))
    assert torch.isfinite(loss) and torch.isfinite(grads).all() and grads.abs().sum() > 0
    assert "loss" in m and all(v.dim() == 0 and not v.requires_grad and torch.isfinite(v) for v in m.values())
    spec = LOSSES[name]
    if spec.task in ("pairwise", "reward"):
        assert REQUIRED_METRICS <= set(m)
    if spec.needs_reference:
        assert ("z0" if name == "kto" else "logratio") in m and "kl" not in m  # kl: true KL estimates only


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [0, 5])
def test_weight_zero_equals_absent(name, k):
    t = rand_fields(B=8, seed=7)
    w0 = t["weight"].clone()
    w0[k] = 0.0
    keep = torch.tensor([i for i in range(8) if i != k])
    a = run(name, t, weight=w0)
    b = run(name, t, idx=keep, weight=t["weight"][keep])
    assert same(a[0], b[0]) and same(a[1], b[1])
    assert all(same(a[2][key], b[2][key]) for key in a[2])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [0, 5])
def test_weight_two_equals_duplicated_row(name, k):
    t = rand_fields(B=8, seed=8)
    w1 = t["weight"].clone()
    w1[k] = 1.0
    w2 = w1.clone()
    w2[k] = 2.0
    a = run(name, t, weight=w2)
    # the duplicate indexes the same leaves, so autograd sums the gradients of both copies
    b = run(name, t, idx=torch.cat([torch.arange(8), torch.tensor([k])]), weight=torch.cat([w1, T(1.0)]))
    assert same(a[0], b[0]) and same(a[1], b[1])
    assert all(same(a[2][key], b[2][key]) for key in a[2])


@pytest.mark.parametrize("name", NAMES)
def test_uniform_weight_scaling_scales_the_sum_and_leaves_metrics(name):
    """S = sum w l is linear in the weights; the metrics are weighted means, so scale-free."""
    t = rand_fields(B=8, seed=9)
    a = run(name, t)
    b = run(name, t, weight=7.3 * t["weight"])
    assert same(7.3 * a[0], b[0]) and same(7.3 * a[1], b[1])
    assert all(same(a[2][key], b[2][key]) for key in a[2])


@pytest.mark.parametrize("name", NAMES)
def test_all_zero_weights_give_zero_loss(name):
    t = rand_fields(B=4, seed=10)
    loss, grads, _ = run(name, t, weight=torch.zeros(4, dtype=D))
    assert loss == 0 and (grads == 0).all()


@pytest.mark.parametrize("name", [n for n in NAMES if LOSSES[n].monotone_in_logp1])
def test_monotone_in_logp1(name):
    t = rand_fields(B=8, seed=11)
    base = run(name, t)[0]
    for k in range(8):
        up = dict(t, logp1=t["logp1"].clone())
        up["logp1"][k] += 0.3  # stays < 0: mean token log-probs are <= -0.5
        assert run(name, up)[0] <= base + 1e-12, k


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as e:
        compute_loss("nope", LossInputs(**PAIR))
    assert all(n in str(e.value) for n in LOSSES)
    with pytest.raises(ValueError):
        hyperparameters("nope")


def test_missing_fields_raise():
    with pytest.raises(ValueError, match="ref_logp"):
        compute_loss("dpo", LossInputs(logp1=T(-1), len1=T(1), weight=T(1), logp2=T(-2), len2=T(1)))
    with pytest.raises(ValueError, match="label"):
        compute_loss("kto", LossInputs(logp1=T(-1), len1=T(1), weight=T(1), ref_logp1=T(-2)))


def test_hyperparameters_are_signature_defaults():
    assert {n: hyperparameters(n) for n in NAMES} == {
        "sft": {}, "reward": {}, "dpo": {"beta": 0.1}, "cdpo": {"beta": 0.1, "label_smoothing": 0.1},
        "robust-dpo": {"beta": 0.1, "label_smoothing": 0.1}, "ipo": {"tau": 0.1, "length_normalize": False},
        "slic": {"delta": 1.0, "lam": 0.1}, "simpo": {"beta": 2.0, "gamma": 0.5}, "orpo": {"lam": 0.1},
        "kto": {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
        "grpo": {"eps_low": 0.2, "eps_high": 0.2, "kl_coef": 0.0, "tis_cap": 0.0},
        "dr-grpo": {"eps_low": 0.2, "eps_high": 0.2, "kl_coef": 0.0, "max_tokens": 0, "tis_cap": 0.0},
        "dapo": {"eps_low": 0.2, "eps_high": 0.28, "kl_coef": 0.0, "mean_tokens": 0.0, "tis_cap": 0.0},
        "gspo": {"eps_low": 3e-4, "eps_high": 4e-4, "kl_coef": 0.0, "tis_cap": 0.0},
        "cispo": {"eps_low": 1.0, "eps_high": 4.0, "kl_coef": 0.0, "mean_tokens": 0.0, "tis_cap": 0.0},
        "ppo": {"eps_low": 0.2, "eps_high": 0.2, "kl_coef": 0.0, "mean_tokens": 0.0},
        "value": {"clip": 0.2, "mean_tokens": 0.0},
    }


@pytest.mark.parametrize("name", NAMES)
def test_compute_loss_filters_hparams(name):
    x = loss_inputs(name, rand_fields(B=4, seed=12))
    default = compute_loss(name, x)[0]
    explicit = compute_loss(name, x, **hyperparameters(name))[0]
    ignored = compute_loss(name, x, **dict.fromkeys(hyperparameters(name)), not_a_hparam=3.0)[0]
    assert same(default, explicit) and same(default, ignored)
    if hyperparameters(name):  # and a real change of the first hparam is passed through
        k, v = next(iter(hyperparameters(name).items()))
        assert not same(default, compute_loss(name, x, **{k: (not v) if isinstance(v, bool) else v * 0.05})[0])


def test_weighted_mean_and_sum_helpers():
    assert close(weighted_mean(T(1.0, 4.0, float("inf")), T(1.0, 2.0, 0.0)), 3.0)
    assert close(weighted_sum(T(1.0, 4.0, float("inf")), T(1.0, 2.0, 0.0)), 9.0)
    assert weighted_mean(T(1.0, 2.0), T(0.0, 0.0)) == 0
