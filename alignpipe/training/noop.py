"""Training that cannot change the policy, said instead of finishing quietly with loss 0.

Two cases, each one sentence in `train`'s summary line and in the manifest (`report.no_op`, a list):

- a policy-gradient loss (task group) on batches whose every counted advantage is 0: groups whose answers all
  got the same reward kept with `build-batches --equal-groups keep` (per answer, `response1_advantage`, or per
  token, `response1_token_advantages`); the surrogate is 0 and so is its gradient, whatever the KL term;
- a gradient norm of 0 at every optimiser step (before clipping), whatever the loss.
"""
from __future__ import annotations

ZERO_ADVANTAGES = ("every advantage is 0 (all-equal groups kept): nothing to learn from; build-batches without "
                   "--equal-groups keep, more samples per prompt, or an easier split")
ZERO_GRADIENT = "the gradient norm was 0 at every step: the policy did not change"


def _all_zero_advantages(ds) -> bool:
    weights = ds["weight"]
    if "response1_token_advantages" in ds.column_names and any(v is not None for v in ds["response1_token_advantages"]):
        rows = ds["response1_token_advantages"]
        return all(w == 0 or not any(rows[i] or []) for i, w in enumerate(weights))
    return all(w == 0 or a == 0 for a, w in zip(ds["response1_advantage"], weights))


def no_op_notes(ds, *, policy_gradient: bool, history: list[dict]) -> list[str]:
    """The sentences that apply (module doc); [] for a run that could learn."""
    notes = []
    if policy_gradient and "response1_advantage" in ds.column_names and _all_zero_advantages(ds):
        notes.append(ZERO_ADVANTAGES)
    norms = [r["grad_norm"] for r in history if "grad_norm" in r]
    if norms and all(n == 0 for n in norms):
        notes.append(ZERO_GRADIENT)
    return notes
