"""Advantage estimators vs numbers computed by hand, properties of every registered estimator, and the
equal-reward-group rule (DAPO dynamic sampling: dropped and counted, or kept)."""
from __future__ import annotations

import math

import pytest

from alignpipe.batches.advantages import ESTIMATORS, advantages, split_equal_groups

S3 = math.sqrt(1 / 3)  # Bessel std of [1, 0, 0, 1]


@pytest.mark.parametrize("name, groups, hp, expected", [
    ("grpo", [[1, 0, 0, 1]], {"eps": 0.0}, [[0.5 / S3, -0.5 / S3, -0.5 / S3, 0.5 / S3]]),
    ("grpo", [[1, 0, 0, 1]], {}, [[0.5 / (S3 + 1e-4), -0.5 / (S3 + 1e-4), -0.5 / (S3 + 1e-4), 0.5 / (S3 + 1e-4)]]),
    ("grpo", [[2, 0]], {"eps": 0.0}, [[1 / math.sqrt(2), -1 / math.sqrt(2)]]),  # std of [2, 0] = sqrt(2)
    ("dr-grpo", [[1, 0, 0]], {}, [[2 / 3, -1 / 3, -1 / 3]]),
    ("dr-grpo", [[3, 1], [5, 5]], {}, [[1, -1], [0, 0]]),
    ("rloo", [[1, 0, 0]], {}, [[1.0, -0.5, -0.5]]),  # r_i - mean of the others
    ("rloo", [[4, 2, 0]], {}, [[3.0, 0.0, -3.0]]),  # = N/(N-1) (r - mean) = 1.5 * [2, 0, -2]
    ("rloo", [[7]], {}, [[0.0]]),
    ("reinforce++", [[1, 0], [1, 1]], {"eps": 0.0}, [[0.5, -1.5], [0.5, 0.5]]),  # batch mean .75, std .5
    ("reinforce++-baseline", [[1, 0], [1, 1]], {"eps": 0.0},  # a = [.5, -.5, 0, 0], std sqrt(1/6)
     [[0.5 / math.sqrt(1 / 6), -0.5 / math.sqrt(1 / 6)], [0.0, 0.0]]),
])
def test_estimator_matches_hand_computed(name, groups, hp, expected):
    got = ESTIMATORS[name](groups, **hp)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, abs=1e-12)


GROUPS = [[1.0, 0.0, 0.5, 0.0], [0.2, 0.9, 0.9, 0.1], [3.0, -1.0, 0.0, 2.0]]


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_estimator_shape_and_shift_invariance(name):
    """Same shape as the rewards; adding a constant to every reward changes no advantage."""
    base = ESTIMATORS[name](GROUPS)
    shifted = ESTIMATORS[name]([[r + 7.0 for r in g] for g in GROUPS])
    assert [len(g) for g in base] == [len(g) for g in GROUPS]
    for a, b in zip(base, shifted):
        assert a == pytest.approx(b, abs=1e-9)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_estimator_orders_answers_like_their_rewards(name):
    for g, a in zip(GROUPS, ESTIMATORS[name](GROUPS)):
        for i in range(len(g)):
            for j in range(len(g)):
                if g[i] > g[j]:
                    assert a[i] > a[j]


@pytest.mark.parametrize("name", ["grpo", "dr-grpo", "rloo", "reinforce++-baseline"])
def test_group_relative_estimators_give_zero_to_an_equal_group(name):
    assert ESTIMATORS[name]([[0.5, 0.5, 0.5], [1.0, 0.0, 0.0]])[0] == pytest.approx([0, 0, 0], abs=1e-12)


def test_equal_groups_dropped_and_counted():
    groups = [[1, 1, 1], [1, 0, 0], [0, 0, 0], [0.5, 0.25, 0]]
    assert split_equal_groups(groups, "drop") == ([1, 3], 2)
    assert split_equal_groups(groups, "keep") == ([0, 1, 2, 3], 2)
    adv, keep, equal = advantages("dr-grpo", groups, "drop")
    assert keep == [1, 3] and equal == 2
    assert adv == [pytest.approx([2 / 3, -1 / 3, -1 / 3]), pytest.approx([0.25, 0.0, -0.25])]
    adv, keep, equal = advantages("dr-grpo", groups, "keep")
    assert keep == [0, 1, 2, 3] and equal == 2 and adv[0] == [0, 0, 0] and adv[2] == [0, 0, 0]


def test_every_group_equal_leaves_nothing():
    assert advantages("grpo", [[1, 1], [0, 0]], "drop") == ([], [], 2)


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="choose from"):
        advantages("ppo", [[1, 0]])
    with pytest.raises(ValueError, match="drop, keep"):
        split_equal_groups([[1, 0]], "skip")


def test_estimator_specs_parse_through_the_registry():
    from alignpipe.batches.advantages import estimator
    from alignpipe.core.errors import UserError

    # eps must be > 0 (0 divides by zero on an all-equal group); 1e-300 vanishes next to the std
    assert estimator("grpo,eps=1e-300")([[1, 0, 0, 1]])[0] == pytest.approx([0.5 / S3, -0.5 / S3, -0.5 / S3, 0.5 / S3])
    assert estimator("rloo")([[1, 0, 0]]) == [[1.0, -0.5, -0.5]]
    with pytest.raises(UserError, match="unknown advantage estimator 'ppo'"):
        estimator("ppo")
    with pytest.raises(UserError, match="has no parameter 'beta'"):
        estimator("grpo,beta=1")
