"""Host reads inside a training step: at most ONE per step, made by alignpipe's own code.

A host read (on a GPU: a synchronisation that stalls the launch queue) is any call of Tensor.item / tolist /
__float__ / __int__ / __bool__ / cpu / numpy. The counter below wraps those methods while one optimisation
step of a tiny model runs on the CPU (the calls are the same on a GPU; only their cost differs) and counts
each call by the file it comes from:

    alignpipe's code   <= SYNCS_PER_STEP = 1: the metrics and the gradient norm are read together by one
                       `tolist()` (trainer.optimizer_step), whatever the number of micro-batches
                       (--grad-accum), the loss or the weight normalisation. Weights, example and token
                       counts and the normalising constant are Python numbers from the batch lists.
    everything else    (transformers' mask helpers, torch's optimizer) is reported, not bounded here: it is
                       not ours to change, and differs between library versions.
"""
from __future__ import annotations

import contextlib
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_train import make_batches, pairs, task_examples

SYNCS_PER_STEP = 1
METHODS = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy")
PACKAGE = str(Path(__file__).resolve().parents[1] / "alignpipe")


@contextlib.contextmanager
def host_reads():
    """Count calls of the host-read methods of torch.Tensor: {"alignpipe": n, "other": m, (method, file): k}."""
    counts: Counter = Counter()
    saved = {m: getattr(torch.Tensor, m) for m in METHODS}

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            counts["alignpipe" if caller.startswith(PACKAGE) else "other"] += 1
            counts[(name, caller)] += 1
            return original(self, *args, **kwargs)
        return counted

    for name, original in saved.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield counts
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


def _run(model_dir, loss: str, ds, rule: str):
    from alignpipe.training import loop as tr
    from alignpipe.training.checkpoint import frozen_copy, load_policy
    from alignpipe.training.losses import LOSSES
    from alignpipe.training.micro_batches import batch_groups, dataset_scale

    task = LOSSES[loss].task
    module, tok = load_policy(model_dir, task)
    ref = tr.Reference("model", frozen_copy(module)) if LOSSES[loss].needs_reference else tr.Reference("none")
    groups = batch_groups(ds)
    run = tr.prepare(module, reference=ref, task=task, loss=loss, hparams={}, pad_id=tok.pad_token_id,
                     dist=tr.Dist(), normalization=tr.Normalization(rule, dataset_scale(ds, task, 1)), lr=1e-3,
                     weight_decay=0.0, scheduler="cosine", warmup_steps=0, total_steps=2)
    return run, groups


@pytest.mark.parametrize("loss,rule", [("dpo", "dataset"), ("dpo", "step"), ("kto", "dataset"),
                                       ("sft", "dataset"), ("reward", "step")])
def test_one_host_read_per_step_with_gradient_accumulation(loss, rule, tiny_lm_dir, tiny_rm_dir):
    """Two steps of two stored batches each (--grad-accum 2): the second step (past any first-call set-up)
    makes at most SYNCS_PER_STEP host reads from alignpipe's code."""
    from alignpipe.training import loop as tr
    from alignpipe.training.losses import LOSSES

    task = LOSSES[loss].task
    ds = make_batches(task, task_examples(task, 8), tiny_lm_dir, batch_size=2)
    run, groups = _run(tiny_rm_dir if task == "reward" else tiny_lm_dir, loss, ds, rule)
    tr.train_step(run, ds, groups[:2], False, 1)
    with host_reads() as counts:
        row = tr.train_step(run, ds, groups[2:4], False, 2)
    assert row["examples"] == 4 and row["loss"] > -1e9
    ours = {k: v for k, v in counts.items() if isinstance(k, tuple) and k[1].startswith(PACKAGE)}
    assert counts["alignpipe"] <= SYNCS_PER_STEP, ours


def test_the_counter_sees_host_reads():
    with host_reads() as counts:
        t = torch.ones(3)
        float(t.sum()), t.tolist(), bool(t.any()), t.numpy()
    assert counts["other"] == 4


def test_weights_are_read_without_a_host_read(tiny_lm_dir):
    """Collating a step computes its weight, example and token totals from the lists, not from tensors."""
    from alignpipe.training.micro_batches import batch_groups, micro_batches

    ds = make_batches("pairwise", [{**e, "w1": 1.0, "w2": 0.5} for e in pairs(4)], tiny_lm_dir, batch_size=2)
    with host_reads() as counts:
        step = micro_batches(ds, batch_groups(ds), "pairwise", False, 0, "cpu")
    assert counts["alignpipe"] == 0
    assert step.weight == 4 * 0.75 and step.examples == 4
    assert step.tokens == sum(int(b.attention_mask.sum()) for b in step.micro)
