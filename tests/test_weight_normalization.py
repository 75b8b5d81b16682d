"""What a weight means across steps (`train --weight-normalization`), on the trainer core with the tiny model.

The rules (alignpipe.training.loop's docstring): a step's objective is sum_{i in step} w_i l_i / D with

    dataset (default)  D = (total example weight of the batches) / (steps per epoch), the same in every step
    step               D = the step's own total weight W

and what holds, for the gradients at fixed parameters:

    halving every weight of one batch   dataset: halves that step's gradient, so plain SGD's update
                                        (with D unchanged: the weight taken away is put on another batch;
                                        otherwise the update is scaled by 1/2 * D_old / D_new);
                                        step: changes nothing
    weight 0 == the example absent      both rules, step by step
    weight 2 == the example written twice, the copy in ANOTHER step
                                        dataset: the epoch's summed gradient is the same
                                        step: it differs (each copy is divided by its own step's W)
    (the copy in the same step: both rules, step by step: tests/test_train.py)
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_train import make_batches, pairs

LR = 0.5


def _run(model_dir, ds, rule: str):
    from alignpipe.training import loop as tr
    from alignpipe.training.checkpoint import frozen_copy, load_policy
    from alignpipe.training.micro_batches import batch_groups, dataset_scale

    module, tok = load_policy(model_dir, "pairwise")
    module.double()  # float64 parameters: an update is read back without float32 rounding
    groups = batch_groups(ds)
    norm = tr.Normalization(rule, dataset_scale(ds, "pairwise", len(groups)))
    run = tr.prepare(module, reference=tr.Reference("model", frozen_copy(module)), task="pairwise", loss="dpo",
                     hparams={}, pad_id=tok.pad_token_id, dist=tr.Dist(), normalization=norm, lr=LR,
                     weight_decay=0.0, scheduler="constant", warmup_steps=0, total_steps=len(groups),
                     max_grad_norm=0.0)
    run.optimizer = torch.optim.SGD(tr.trainable(module), lr=LR)  # update = -lr * gradient, exactly
    run.scheduler = tr.build_scheduler(run.optimizer, "constant", 0, len(groups))
    return run, groups


def _params(run) -> torch.Tensor:
    return torch.cat([p.detach().flatten().double() for p in run.module.parameters()])


def first_update(model_dir, ds, rule: str) -> torch.Tensor:
    """Parameters after minus before the first SGD step (the first stored batch)."""
    from alignpipe.training import loop as tr

    run, groups = _run(model_dir, ds, rule)
    before = _params(run)
    tr.train_step(run, ds, groups[:1], False, 1)
    return _params(run) - before


def step_gradients(model_dir, ds, rule: str) -> list[torch.Tensor]:
    """The gradient of every step's objective at the initial parameters (no step taken)."""
    from alignpipe.training import loop as tr
    from alignpipe.training.micro_batches import micro_batches

    run, groups = _run(model_dir, ds, rule)
    out = []
    for g in groups:
        tr.accumulate_gradients(run, micro_batches(ds, [g], "pairwise", False, run.pad_id, "cpu"))
        out.append(torch.cat([p.grad.flatten().double() for p in tr.trainable(run.module)]))
        run.optimizer.zero_grad(set_to_none=True)
    return out


def batches(weights: list[list[float]], tiny_lm_dir, which=None):
    """Stored batch b holds the pairs `which[b]` (default 2b, 2b+1) with the given weights."""
    ex = pairs(6)
    which = which or [[2 * b, 2 * b + 1] for b in range(len(weights))]
    rows = [{**ex[i], "w1": w, "w2": w, "batch_index": b} for b, (idx, ws) in enumerate(zip(which, weights))
            for i, w in zip(idx, ws)]
    return make_batches("pairwise", rows, tiny_lm_dir)


def _close(a, b):
    """Equal up to float rounding (1e-5 of the largest entry: the tiny model keeps some float32 buffers)."""
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


# ------------------------------------------------------------------------------- a weight's size counts
def test_halving_one_batch_halves_its_update_under_the_dataset_rule(tiny_lm_dir):
    """The weight taken from batch 0 goes to batch 1, so the total weight and D stay the same."""
    full = first_update(tiny_lm_dir, batches([[1.0, 1.0], [1.0, 1.0]], tiny_lm_dir), "dataset")
    half = first_update(tiny_lm_dir, batches([[0.5, 0.5], [1.5, 1.5]], tiny_lm_dir), "dataset")
    assert full.abs().max() > 1e-6
    _close(half, 0.5 * full)


def test_halving_one_batch_without_compensation_scales_by_the_ratio_of_the_d(tiny_lm_dir):
    """D = total weight / steps: 4/2 = 2 before, 3/2 = 1.5 after: the update is 1/2 * 2/1.5 = 2/3 of it."""
    full = first_update(tiny_lm_dir, batches([[1.0, 1.0], [1.0, 1.0]], tiny_lm_dir), "dataset")
    half = first_update(tiny_lm_dir, batches([[0.5, 0.5], [1.0, 1.0]], tiny_lm_dir), "dataset")
    _close(half, (0.5 * 2.0 / 1.5) * full)


def test_halving_one_batch_changes_nothing_under_the_step_rule(tiny_lm_dir):
    full = first_update(tiny_lm_dir, batches([[1.0, 1.0], [1.0, 1.0]], tiny_lm_dir), "step")
    half = first_update(tiny_lm_dir, batches([[0.5, 0.5], [1.5, 1.5]], tiny_lm_dir), "step")
    _close(half, full)


def test_the_default_rule_is_dataset_and_recorded():
    import inspect

    from stages.train import command

    assert inspect.signature(command).parameters["weight_normalization"].default == "dataset"


# ------------------------------------------------------------------------- 0 = absent, 2 = twice
@pytest.mark.parametrize("rule", ["dataset", "step"])
def test_weight_zero_equals_the_example_absent_step_by_step(rule, tiny_lm_dir):
    zero = batches([[1.0, 0.0], [1.0, 2.0]], tiny_lm_dir)
    absent = batches([[1.0], [1.0, 2.0]], tiny_lm_dir, which=[[0], [2, 3]])
    for a, b in zip(step_gradients(tiny_lm_dir, zero, rule), step_gradients(tiny_lm_dir, absent, rule)):
        _close(a, b)


def test_weight_two_equals_a_copy_in_another_step_over_an_epoch_under_the_dataset_rule(tiny_lm_dir):
    """Pair 0 with weight 2 in batch 0, or written twice (batch 0 and batch 1) with weight 1: the same total
    weight (5) and steps (2), so the same D, and the epoch's summed gradient is the same."""
    twice_weighted = batches([[2.0, 1.0], [1.0, 1.0]], tiny_lm_dir)
    written_twice = batches([[1.0, 1.0], [1.0, 1.0, 1.0]], tiny_lm_dir, which=[[0, 1], [2, 3, 0]])
    a = sum(step_gradients(tiny_lm_dir, twice_weighted, "dataset"))
    b = sum(step_gradients(tiny_lm_dir, written_twice, "dataset"))
    _close(a, b)


def test_weight_two_differs_from_a_copy_in_another_step_under_the_step_rule(tiny_lm_dir):
    """Per-step rule: the copy in batch 1 is divided by W = 3 there, the weight-2 row by W = 3 in batch 0,
    and every other row's share moves too (batch 0: W 3 -> 2), so the epoch's summed gradients differ."""
    twice_weighted = batches([[2.0, 1.0], [1.0, 1.0]], tiny_lm_dir)
    written_twice = batches([[1.0, 1.0], [1.0, 1.0, 1.0]], tiny_lm_dir, which=[[0, 1], [2, 3, 0]])
    a = sum(step_gradients(tiny_lm_dir, twice_weighted, "step"))
    b = sum(step_gradients(tiny_lm_dir, written_twice, "step"))
    assert (a - b).norm() > 1e-3 * a.norm()
