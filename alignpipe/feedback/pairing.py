"""Pairings: which two generations of one prompt form a pair. One implementation, shared by `annotate`
(`--pairing`, unordered pairs to judge) and `build-batches` (`--pairs`, then ordered chosen/rejected by reward).

A pairing is a function `fn(rewards, rng, *, hyperparameters) -> [(i, j), ...]` over ONE prompt's
generations in sample-index order (`rewards[k]` the combined reward of generation k, None when unscored;
`rng = rng_for(seed, prompt_id)`, so a choice depends only on the seed and the data, never on sharding).

One tie rule: among equal rewards the earlier generation (lower sample index) ranks higher, so best-worst
pairs the FIRST of the highest with the LAST of the lowest. A pair whose two rewards are equal is a tie:
`annotate` keeps it (its judges decide the preference), `build-batches` drops and counts it (no order).
"""
from __future__ import annotations

import random
from itertools import combinations

from alignpipe.core.registry import Registry


def rng_for(seed: int, prompt_id: str) -> random.Random:
    return random.Random(f"{seed}:{prompt_id}")


def all_pairs(rewards: list, rng: random.Random) -> list[tuple[int, int]]:
    """Every pair i < j of a prompt's generations: n(n-1)/2."""
    return list(combinations(range(len(rewards)), 2))


def random_pair(rewards: list, rng: random.Random) -> list[tuple[int, int]]:
    """One pair of two different generations (i < j) drawn at random; none from fewer than two."""
    if len(rewards) < 2:
        return []
    i, j = sorted(rng.sample(range(len(rewards)), 2))
    return [(i, j)]


def best_worst(rewards: list, rng: random.Random) -> list[tuple[int, int]]:
    """The highest against the lowest reward, the best first (ties: the first of the highest against the
    last of the lowest); unscored generations take no part; none from fewer than two scored."""
    scored = [k for k, r in enumerate(rewards) if r is not None]
    if len(scored) < 2:
        return []
    best = max(scored, key=lambda k: (rewards[k], -k))
    worst = min(scored, key=lambda k: (rewards[k], -k))
    return [(best, worst)]


def margin(rewards: list, rng: random.Random, *, at_least: float = 0.0) -> list[tuple[int, int]]:
    """Every pair i < j of scored generations whose rewards differ by at least `at_least`."""
    return [(i, j) for i, j in combinations(range(len(rewards)), 2)
            if rewards[i] is not None and rewards[j] is not None and abs(rewards[i] - rewards[j]) >= at_least]


PAIRINGS = Registry("pairing", "--pairing",
                    doc="Which generations of one prompt form pairs (annotate --pairing, build-batches --pairs). "
                        "`annotate --pairing pointwise`, its default when no annotator is pairwise, forms none: "
                        "one row per generation (response2 null) with its reward, for pointwise and group batches "
                        "(KTO, reward-weighted SFT, RL); a pairwise annotator needs one of the pairings below.")
PAIRINGS.add("all", all_pairs, needs_rewards=False)
PAIRINGS.add("random", random_pair, needs_rewards=False)
PAIRINGS.add("best-worst", best_worst, needs_rewards=True)
PAIRINGS.add("margin", margin, arg="at_least", metavar="X", needs_rewards=True,
             docs={"at_least": "smallest reward difference of a pair"}, ranges={"at_least": ">=0"})


def pairs(spec, rewards: list, seed: int, prompt_id: str) -> list[tuple[int, int]]:
    """The index pairs of one prompt's generations (sample-index order) under a pairing spec (parsed, or
    its text)."""
    spec = PAIRINGS.parse(spec) if isinstance(spec, str) else spec
    return spec.component.fn(rewards, rng_for(seed, prompt_id), **spec.kwargs)
