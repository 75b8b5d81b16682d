"""Per-response training weights: the STRATEGIES table, their composition and post-processing.

A *table* is a dataset in columns, ``t[column][row]`` (``Dataset.to_dict()`` of an annotations dataset).
A row is a *pair* when ``response2`` is set, else *pointwise*. Every strategy is one function
``fn(t, **hyperparameters) -> (w1, w2)``: one weight per response, ``w2[i]`` None on pointwise rows, every
weight finite and >= 0. A pair's example weight (what train uses) is the mean of its two weights.

Spec syntax (the `--strategy` flag): the registry's grammar ``NAME[:ARG][,key=value...]`` (alignpipe.core.registry);
ARG is the first hyperparameter (``margin:2``, ``function:pkg.module:fn``, ``importance:MODEL``), and
``margin:temperature=2`` reads as ``margin,temperature=2``. Several strategies multiply (``product``) or add
(``sum``) per response. Post-processing then runs in this order, each step optional:

    strategies -> combine -> clip [LO, HI] -> normalise (mean 1 over the dataset or per prompt) -> drop < X

Clip comes before normalise so that `--normalize mean` keeps its promise (mean example weight exactly 1
before dropping); normalising is a rescale, so the spread clip bounds (max/min <= HI/LO) survives it.
Clip bounds are therefore in the strategies' own units (e.g. importance ratios). Drop comes last so its
threshold is in normalised units ("below 5% of the average") and the count is reported.

Every strategy accepts an empty table: parsing calls it once, so bad hyperparameters fail before any work
(model loading, forward passes) starts.
"""
from __future__ import annotations

import math
from collections.abc import Callable

from alignpipe.core.errors import UserError
from alignpipe.core.registry import Registry, load_function

Weights = tuple[list[float], list]  # (w1, w2); w2[i] is None on pointwise rows


# ---------------------------------------------------------------------------------------------- helpers
def num_rows(t: dict) -> int:
    return len(t["response1"])


def is_pair(t: dict, i: int) -> bool:
    return t["response2"][i] is not None


def _same(t: dict, per_row: list[float]) -> Weights:
    """One weight per row, given to both responses of a pair."""
    return list(per_row), [w if is_pair(t, i) else None for i, w in enumerate(per_row)]


def _per_response(t: dict, fn: Callable[[int, int], float]) -> Weights:
    """fn(row, k) for k = 1, and k = 2 on pair rows."""
    n = num_rows(t)
    return [fn(i, 1) for i in range(n)], [fn(i, 2) if is_pair(t, i) else None for i in range(n)]


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise UserError(msg)


def _exp(x: float) -> float:
    return math.exp(x) if x < 709.0 else math.inf  # inf is reported by check_weights, naming the row


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


# ------------------------------------------------------------------------------------------- strategies
def constant(t, *, value: float = 1.0) -> Weights:
    """w = value for every response."""
    _require(value >= 0, f"strategy constant: value must be >= 0, got {value}")
    return _same(t, [value] * num_rows(t))


def margin(t, *, temperature: float = 1.0) -> Weights:
    """w = sigmoid(|r1 - r2| / temperature) for both responses of a pair (r: their rewards).

    The absolute margin because annotation pairs are unordered. Range [0.5, 1): a tie keeps half the weight
    (a noisy near-tie is down-weighted, never discarded); use abs-margin to give ties weight 0."""
    _require(temperature > 0, f"strategy margin: temperature must be > 0, got {temperature}")
    r1, r2 = t["response1_reward"], t["response2_reward"]
    return _same(t, [1 / (1 + math.exp(-abs(a - b) / temperature)) for a, b in zip(r1, r2)])


def abs_margin(t, *, clip: float | None = None) -> Weights:
    """w = min(|r1 - r2|, clip) for both responses of a pair (no clip when not given)."""
    _require(clip is None or clip > 0, f"strategy abs-margin: clip must be > 0, got {clip}")
    cap = math.inf if clip is None else clip
    return _same(t, [min(abs(a - b), cap) for a, b in zip(t["response1_reward"], t["response2_reward"])])


def confidence(t) -> Weights:
    """w = |2p - 1| for both responses of a pair, p = preference (P(response1 preferred))."""
    return _same(t, [abs(2 * p - 1) for p in t["preference"]])


def _vote(a: dict) -> int | None:
    """An annotator's direction: sign(preference - 1/2), else sign(score1 - score2); None if it abstained."""
    if a.get("abstained"):
        return None
    if a.get("preference") is not None:
        return _sign(a["preference"] - 0.5)
    if a.get("score1") is not None and a.get("score2") is not None:
        return _sign(a["score1"] - a["score2"])
    return None


def agreement(t) -> Weights:
    """w = (annotators in `raw` agreeing with the combined direction) / (annotators that voted).

    Direction = sign(p - 1/2) with p the combined `preference`; an annotator's is sign(its preference - 1/2),
    or sign(score1 - score2) when it gave scores only. Abstentions are not votes. A tie agrees with a tie."""
    weights = []
    for i, (p, raw) in enumerate(zip(t["preference"], t["raw"])):
        votes = [v for v in map(_vote, raw or []) if v is not None]
        _require(bool(votes), f"row {i}: column 'raw' has no annotator votes (empty or all abstained); "
                              f"strategy agreement needs per-annotator outputs from `alignpipe annotate`")
        weights.append(sum(v == _sign(p - 0.5) for v in votes) / len(votes))
    return _same(t, weights)


def length_norm(t, *, alpha: float = 1.0, by: str = "tokens") -> Weights:
    """w = (mean length / length)^alpha per response, the mean over every response of the dataset.

    by=tokens uses response{k}_num_tokens (from generate; imported rows have 0, so use by=chars there),
    by=chars the text length (an empty response counts as length 1). alpha=0 gives 1, alpha=1 makes every
    response's weight x length equal (a per-token rather than per-sequence weighting)."""
    _require(by in ("tokens", "chars"), f"strategy length-norm: by must be tokens or chars, got {by!r}")

    def length(i: int, k: int) -> float:
        if by == "chars":
            return max(len(t[f"response{k}"][i]), 1)
        n = t[f"response{k}_num_tokens"][i]
        _require(n is not None and n > 0, f"row {i}: column 'response{k}_num_tokens' is {n}; "
                                          f"use length-norm:by=chars for data without token counts")
        return n

    lengths = _per_response(t, length)
    flat = [x for x in lengths[0] + lengths[1] if x is not None]
    mean = sum(flat) / len(flat) if flat else 1.0
    return _per_response(t, lambda i, k: (mean / lengths[k - 1][i]) ** alpha)


def recency(t, *, decay: float = 0.5, current: int | None = None) -> Weights:
    """w = decay^(current - iteration); current defaults to the newest iteration in the data."""
    _require(0 < decay <= 1, f"strategy recency: decay must be in (0, 1], got {decay}")
    its = t["iteration"]
    k = max(its, default=0) if current is None else current
    for i, it in enumerate(its):
        _require(it <= k, f"row {i}: column 'iteration' is {it}, newer than recency:current={k}")
    return _same(t, [decay ** (k - it) for it in its])


def importance(t, *, policy: str, clip: float | None = None, truncate: float | None = None) -> Weights:
    """w = pi_current(y|x) / pi_behaviour(y|x) = exp(current_logp - behaviour_logp), per response.

    current_logp{k} is response k's summed log-prob under `policy` (a forward pass the stage runs) and
    behaviour_logp the column response{k}_behaviour_logp written by generate (required: imported data has
    none). clip=c bounds the ratio to [1/c, c] (c >= 1); truncate=c caps it at c (min(ratio, c), truncated
    importance sampling); both may be given, clip first. Computed in log space; the stage reports the
    effective sample size (sum w)^2 / sum w^2."""
    _require(clip is None or clip >= 1, f"strategy importance: clip must be >= 1 (ratio in [1/c, c]), got {clip}")
    _require(truncate is None or truncate > 0, f"strategy importance: truncate must be > 0, got {truncate}")
    _require("current_logp1" in t, "strategy importance: the current policy's log-probs were not computed")

    def ratio(i: int, k: int) -> float:
        lr = t[f"current_logp{k}"][i] - t[f"response{k}_behaviour_logp"][i]
        if clip is not None:
            lr = max(min(lr, math.log(clip)), -math.log(clip))
        if truncate is not None:
            lr = min(lr, math.log(truncate))
        return _exp(lr)

    return _per_response(t, ratio)


def class_balance(t, *, threshold: float | None = None) -> Weights:
    """w = n / (2 n_desirable) on desirable rows, n / (2 n_undesirable) on undesirable ones.

    Pointwise rows only. The label is response1_label, or (where null) response1_reward >= threshold. Both
    classes then carry half the total weight, as KTO's desirable/undesirable balance needs; the mean is 1."""
    labels = []
    for i, (lab, r) in enumerate(zip(t["response1_label"], t["response1_reward"])):
        if lab is None:
            _require(threshold is not None and r is not None,
                     f"row {i}: column 'response1_label' is null; give class-balance:threshold=R to label "
                     f"rows by response1_reward >= R")
            lab = r >= threshold
        labels.append(bool(lab))
    n, n_good = len(labels), sum(labels)
    if n and n_good in (0, n):
        raise UserError(f"strategy class-balance: all {n} rows are {'desirable' if n_good else 'undesirable'}; "
                        f"there is nothing to balance")
    return _same(t, [n / (2 * n_good) if lab else n / (2 * (n - n_good)) for lab in labels])


def function(t, *, target: str) -> Weights:
    """w = fn(table) for a user function `pkg.module:fn` given explicitly (never discovered).

    fn receives the table (dict of column -> list) and returns one weight per row (given to both responses)
    or a pair (w1, w2) of per-response lists (w2 ignored on pointwise rows); checked by `check_weights`."""
    fn = load_function(target, "strategy function")
    if not num_rows(t):
        return [], []
    n = num_rows(t)
    try:
        out = fn(dict(t))
    except Exception as e:  # noqa: BLE001 -- the user's code: one line naming the function
        first = (str(e).splitlines() or [""])[0][:160]
        raise UserError(f"strategy function {target} raised {type(e).__name__}: {first}")
    if isinstance(out, tuple) and len(out) == 2 and all(hasattr(x, "__len__") for x in out):
        w1, w2 = _floats(out[0], target, n), _floats(out[1], target, n)
        return w1, [w if is_pair(t, i) else None for i, w in enumerate(w2)]
    return _same(t, _floats(out, target, n))


def _floats(seq, target: str, n: int) -> list[float]:
    try:
        out = [float(x) for x in seq]
    except (TypeError, ValueError) as e:
        raise UserError(f"strategy function {target}: must return one number per row ({type(e).__name__}: {e})")
    _require(len(out) == n, f"strategy function {target}: returned {len(out)} weights for {n} rows")
    return out


# ------------------------------------------------------------------------------------------------ table
def _validate(spec) -> None:
    """Every strategy accepts an empty table: bad hyperparameter values fail here, before any work."""
    spec.component.fn(empty_table(), **spec.kwargs)


# One row per strategy: rows it accepts (pair | pointwise | any), the columns it needs non-null (response2_*
# only on pair rows), whether it needs the current policy's log-probs (the stage runs a forward pass), the
# parameter an ARG fills (`margin:2`), and one line per hyperparameter.
STRATEGIES = Registry("strategy", "--strategy", validate=_validate,
                      doc="Per-response training weights (alignpipe/feedback/weights.py); `reweight --strategy`.")
_R = ("response1_reward", "response2_reward")
STRATEGIES.add("constant", constant, rows="any", needs=(), forward=False, arg="value",
               docs={"value": "the weight, >= 0"}, ranges={"value": ">=0"})
STRATEGIES.add("margin", margin, rows="pair", needs=_R, forward=False, arg="temperature",
               docs={"temperature": "scale of the reward margin, > 0"}, ranges={"temperature": ">0"})
STRATEGIES.add("abs-margin", abs_margin, rows="pair", needs=_R, forward=False, arg="clip",
               docs={"clip": "upper bound of the weight (none: unbounded)"}, ranges={"clip": ">0"})
STRATEGIES.add("confidence", confidence, rows="pair", needs=("preference",), forward=False)
STRATEGIES.add("agreement", agreement, rows="pair", needs=("preference",), forward=False)
STRATEGIES.add("length-norm", length_norm, rows="any", needs=(), forward=False, arg="alpha",
               docs={"alpha": "exponent: 0 gives 1, 1 a per-token weighting", "by": "tokens | chars"},
               ranges={"alpha": "any", "by": "tokens|chars"})
STRATEGIES.add("recency", recency, rows="any", needs=(), forward=False, arg="decay",
               docs={"decay": "factor per iteration of age, in (0, 1]",
                     "current": "the newest iteration (default: the newest in the data)"},
               ranges={"decay": "(0,1]", "current": ">=0"})
STRATEGIES.add("importance", importance, rows="any", needs=("response1_behaviour_logp", "response2_behaviour_logp"),
               forward=True, arg="policy", docs={"policy": "the current policy's model folder",
                                                 "clip": "bound the ratio to [1/c, c], c >= 1",
                                                 "truncate": "cap the ratio at c"},
               ranges={"clip": ">=1", "truncate": ">0"})
STRATEGIES.add("class-balance", class_balance, rows="pointwise", needs=(), forward=False, arg="threshold",
               docs={"threshold": "label rows by response1_reward >= threshold where the label is null"},
               ranges={"threshold": "any"})
STRATEGIES.add("function", function, rows="any", needs=(), forward=False, arg="target", metavar="MODULE:FN",
               docs={"target": "your fn(table) -> weights, as pkg.module:fn"})


def empty_table() -> dict:
    from alignpipe import schemas

    cols = [c.name for c in schemas.columns("annotations")] + ["current_logp1", "current_logp2"]
    return {c: [] for c in cols}


# ---------------------------------------------------------------------------------------------- checks
_FINITE = ("response1_reward", "response2_reward", "response1_behaviour_logp", "response2_behaviour_logp",
           "preference")
_PAIR_ONLY = ("response2_sample_index", "response2_num_tokens", "response2_behaviour_logp", "response2_reward",
              "response2_label", "preference")
_HINTS = {"behaviour_logp": "imported data has none; importance needs samples from `alignpipe generate`",
          "reward": "score the responses with `alignpipe annotate`",
          "preference": "pairs need a preference from `alignpipe annotate`"}


def validate_table(t: dict) -> None:
    """Refuse non-finite numbers, preferences outside [0, 1] and pairs whose two responses don't match."""
    for i in range(num_rows(t)):
        for c in _FINITE:
            v = t[c][i]
            _require(v is None or math.isfinite(v), f"row {i}: column '{c}' is {v} (not a finite number)")
        p = t["preference"][i]
        _require(p is None or 0 <= p <= 1, f"row {i}: column 'preference' is {p}, outside [0, 1]")
        if is_pair(t, i):
            for c in ("response2_sample_index", "response2_num_tokens"):
                _require(t[c][i] is not None, f"row {i}: column '{c}' is null but 'response2' is set")
            s = t["response1_sample_index"][i]
            _require(t["response2_sample_index"][i] != s,
                     f"row {i}: columns 'response1_sample_index' and 'response2_sample_index' are both {s}: "
                     f"a pair must hold two different samples of prompt {t['prompt_id'][i]!r}")
        else:
            for c in _PAIR_ONLY:
                _require(t[c][i] is None, f"row {i}: column '{c}' is set but 'response2' is null "
                                          f"(a pointwise row has one response)")


def check_rows(name: str, t: dict) -> None:
    """The rows fit the strategy: pairs or pointwise rows as it needs, its columns non-null."""
    s = STRATEGIES[name]
    for i in range(num_rows(t)):
        pair = is_pair(t, i)
        _require(s.rows != "pair" or pair, f"row {i}: column 'response2' is null (a pointwise row) but "
                                           f"strategy {name} needs pairs")
        _require(s.rows != "pointwise" or not pair, f"row {i}: column 'response2' is set (a pair) but "
                                                    f"strategy {name} is for pointwise rows")
        for c in s.needs:
            if t[c][i] is None and (pair or not c.startswith("response2")):
                hint = next((h for k, h in _HINTS.items() if c.endswith(k)), "")
                hint = f" ({hint})" if hint else ""
                raise UserError(f"row {i}: column '{c}' is null; strategy {name} needs it{hint}")


def check_weights(w: Weights, t: dict, who: str) -> None:
    """Every weight finite and >= 0, one per response."""
    for i in range(num_rows(t)):
        for k, v in ((1, w[0][i]), (2, w[1][i])):
            if k == 2 and not is_pair(t, i):
                continue
            _require(v is not None and math.isfinite(v) and v >= 0,
                     f"row {i}: {who} gave response{k} weight {v} (weights must be finite and >= 0)")


def run_strategy(spec, t: dict) -> Weights:
    check_rows(spec.name, t)
    w = spec.component.fn(t, **spec.kwargs)
    check_weights(w, t, f"strategy {spec.name}")
    return w


# ------------------------------------------------------------------------------ composition and post-processing
COMBINE = ("product", "sum")
NORMALIZE = ("none", "mean", "per-prompt")


def combine(results: list[Weights], how: str = "product") -> Weights:
    """Per response: the product or the sum of the strategies' weights."""
    _require(how in COMBINE, f"--combine '{how}': unknown (known: {', '.join(COMBINE)})")
    op = math.prod if how == "product" else math.fsum
    w1 = [op(ws) for ws in zip(*(r[0] for r in results))]
    w2 = [None if ws[0] is None else op(ws) for ws in zip(*(r[1] for r in results))]
    return w1, w2


def example_weights(w: Weights) -> list[float]:
    """The weight train gives each row: the mean of a pair's two weights, a pointwise row's only weight."""
    return [a if b is None else (a + b) / 2 for a, b in zip(*w)]


def clip(w: Weights, lo: float | None, hi: float | None) -> Weights:
    """Every weight into [lo, hi] (an omitted bound is open)."""
    lo, hi = -math.inf if lo is None else lo, math.inf if hi is None else hi
    return [min(max(a, lo), hi) for a in w[0]], [None if b is None else min(max(b, lo), hi) for b in w[1]]


def normalize(w: Weights, how: str, prompt_ids: list[str]) -> tuple[Weights, int]:
    """Divide by the mean example weight of the dataset (mean) or of each prompt's rows (per-prompt).

    Returns the weights and the number of prompts left all-zero (per-prompt; their rows keep weight 0)."""
    _require(how in NORMALIZE, f"--normalize '{how}': unknown (known: {', '.join(NORMALIZE)})")
    if how == "none":
        return w, 0
    ex = example_weights(w)
    groups: dict = {}
    for i, pid in enumerate(prompt_ids):
        groups.setdefault(pid if how == "per-prompt" else None, []).append(i)
    scale = [1.0] * len(ex)
    zero = 0
    for rows in groups.values():
        mean = math.fsum(ex[i] for i in rows) / len(rows)
        _require(mean > 0 or how == "per-prompt", "--normalize mean: every weight is 0; nothing to normalise")
        zero += mean == 0
        for i in rows:
            scale[i] = 1 / mean if mean > 0 else 1.0
    return ([a * s for a, s in zip(w[0], scale)], [None if b is None else b * s for b, s in zip(w[1], scale)]), zero


def weight_summary(weights) -> dict:
    """Distribution of weights and the effective sample size ESS = (sum w)^2 / sum w^2 (Kish)."""
    import numpy as np

    w = np.array([x for x in weights if x is not None], dtype=float)
    if not w.size:
        return {}
    ess = float(w.sum() ** 2 / max((w**2).sum(), 1e-300))
    q = np.percentile(w, [5, 50, 95])
    return {"ess": ess, "ess_fraction": ess / w.size, "p5": float(q[0]), "p50": float(q[1]), "p95": float(q[2]),
            "zeros": int((w == 0).sum())}


def keep_rows(w: Weights, below: float | None) -> list[int]:
    """Indices of rows kept by --drop-below X: a row goes when its weight (a pair: both weights) is < X."""
    if below is None:
        return list(range(len(w[0])))
    return [i for i, (a, b) in enumerate(zip(*w)) if not (a < below and (b is None or b < below))]
