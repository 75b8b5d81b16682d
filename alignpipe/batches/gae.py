"""PPO's advantages from a critic: per-token values, GAE and returns for the group task (`--advantage gae`).

    alignpipe build-batches ANNOTATIONS --task group --advantage gae,gamma=1,lam=0.95,critic=CRITIC ...

After tokenising (and truncating), each answer y of n tokens gets the critic's values V_t = V(x, y_<t)
(`alignpipe.models.values`), then :func:`gae` with the answer's reward at its last token and no KL term in
the reward (a KL to the reference is the loss's `kl_coef`), then the advantages of every token of every answer
are whitened together (:func:`whiten`, as TRL's PPOTrainer; `whiten=false` keeps them raw). Stored per answer:

    response1_values           V_t, the critic's values when the batches were built (value clipping's V_old)
    response1_returns          R_t = A_t + V_t before whitening (the value loss's target)
    response1_token_advantages A_t after whitening (the policy loss's per-token advantage)
    response1_advantage        the token mean of response1_token_advantages (a summary per answer)

An answer cut at the length budget (finish_reason 'length') ends there too, with its reward and no bootstrap
value, as in TRL's PPOTrainer (which can penalise a missing EOS instead; here that is a reward annotator's job,
e.g. `overlong`). The values are computed shard by shard (resumable, with the reference log-probs); GAE and whitening run on
the whole dataset at the end (they are cheap and whitening needs every token). No torch at import.
"""
from __future__ import annotations

import math


def gae(reward: float, values: list[float], *, gamma: float = 1.0, lam: float = 0.95) -> tuple[list[float], list[float]]:
    """GAE (Schulman et al. 2016, arXiv 1506.02438, eq. 16) over one answer's tokens t = 0..n-1, with the
    reward at the last token (PPO for language models: Ouyang et al. 2022; TRL's PPOTrainer, OpenRLHF):

        r_t = reward if t = n - 1 else 0;   V_n = 0 (the answer ends: nothing to bootstrap from)
        delta_t = r_t + gamma V_{t+1} - V_t
        A_t = sum_{l >= 0} (gamma lam)^l delta_{t+l}  =  delta_t + gamma lam A_{t+1},   A_n = 0
        R_t = A_t + V_t                                (returns: the value target)

    gamma = lam = 1 telescopes to A_t = reward - V_t. Returns (advantages, returns), n each."""
    n = len(values)
    advantages = [0.0] * n
    running = 0.0
    for t in reversed(range(n)):
        following = values[t + 1] if t + 1 < n else 0.0
        delta = (reward if t == n - 1 else 0.0) + gamma * following - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages, [a + v for a, v in zip(advantages, values)]


def whiten(per_answer: list[list[float]], eps: float = 1e-8) -> list[list[float]]:
    """(a - mean) / sqrt(var + eps) over every token of every answer, var Bessel-corrected (TRL's
    `masked_whiten` with shift_mean); a single token is only centred."""
    flat = [a for answer in per_answer for a in answer]
    mean = math.fsum(flat) / len(flat)
    var = math.fsum((a - mean) ** 2 for a in flat) / (len(flat) - 1) if len(flat) > 1 else 0.0
    scale = 1.0 / math.sqrt(var + eps) if len(flat) > 1 else 1.0
    return [[(a - mean) * scale for a in answer] for answer in per_answer]


def gae_estimator(rewards: list[float], values: list[list[float]], *, gamma: float = 1.0, lam: float = 0.95,
                  whiten_advantages: bool = True) -> tuple[list[list[float]], list[list[float]]]:
    """Per-token (advantages, returns) of every answer of a batch: :func:`gae` per answer, then the advantages
    whitened over the whole batch (:func:`whiten`) unless `whiten_advantages` is off."""
    pairs = [gae(r, v, gamma=gamma, lam=lam) for r, v in zip(rewards, values)]
    advantages, returns = [a for a, _ in pairs], [ret for _, ret in pairs]
    return (whiten(advantages) if whiten_advantages and advantages else advantages), returns


def spec_options(spec) -> dict:
    """gamma, lam and whiten of a parsed `--advantage gae,...` spec (critic apart)."""
    o = spec.kwargs
    return {"gamma": o["gamma"], "lam": o["lam"], "whiten_advantages": o["whiten"]}


# ----------------------------------------------------------------------------- the batches dataset pass
def value_shard(part, model, *, pad_id: int, device):
    """`part` of a batches-group dataset with `response1_values`: the critic's per-token values."""
    from alignpipe import schemas
    from alignpipe.models.values import critic_values

    values = critic_values(model, list(part["prompt_input_ids"]), list(part["response1_input_ids"]), pad_id,
                           device=device)
    feature = schemas.features("batches-group")["response1_values"]
    return part.remove_columns("response1_values").add_column("response1_values", values, feature=feature)


def apply_gae(ds, spec) -> tuple[object, dict]:
    """(the dataset with returns and per-token advantages from its stored values, the report's figures)."""
    from alignpipe import schemas

    table = ds.select_columns(["response1_reward", "response1_values"]).to_dict()
    rewards, values = table["response1_reward"], table["response1_values"]
    advantages, returns = gae_estimator(rewards, values, **spec_options(spec))
    features = schemas.features("batches-group")
    for name, column in (("response1_returns", returns), ("response1_token_advantages", advantages),
                         ("response1_advantage", [math.fsum(a) / len(a) for a in advantages])):
        ds = ds.remove_columns(name).add_column(name, column, feature=features[name])
    flat_v = [v for answer in values for v in answer]
    flat_r = [r for answer in returns for r in answer]
    report = {"critic": spec.kwargs["critic"], "gamma": spec.kwargs["gamma"], "lam": spec.kwargs["lam"],
              "whiten": spec.kwargs["whiten"], "value_mean": math.fsum(flat_v) / len(flat_v),
              "return_mean": math.fsum(flat_r) / len(flat_r), "explained_variance": explained_variance(flat_v, flat_r)}
    return ds, report


def explained_variance(values: list[float], returns: list[float]) -> float | None:
    """1 - Var(R - V) / Var(R) over the tokens: how much of the returns the critic predicts (None: Var(R) = 0)."""
    def var(xs):
        m = math.fsum(xs) / len(xs)
        return math.fsum((x - m) ** 2 for x in xs) / len(xs)

    total = var(returns)
    return None if total == 0 else 1.0 - var([r - v for r, v in zip(returns, values)]) / total
