"""The batches dataset as training micro-batches: groups by `batch_index`, checks, rank slices, tensors.

One optimisation step consumes one stored `batch_index` group (or `--grad-accum` consecutive groups);
build-batches decides what goes into a group. Under several processes, rank r takes the examples
r::world of every group, so the processes together see exactly the global batch of one process.

Per-example weight: the batches' `weight` column (build-batches writes one per example: a pair's is the mean
of its two responses' weights, the weighted schema's rule).

Pairs go through the model in ONE forward: the collated sequences are the B chosen rows followed by the B
rejected rows (2B sequences), built with `alignpipe.models.logprobs.collate`. Pairs of log-prob losses also carry
the shared-prompt layout (`alignpipe.models.logprobs.collate_shared`): the prompt once, then both answers.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from pathlib import Path

from alignpipe.core.errors import UserError

PAIRED = ("reward", "pairwise")  # tasks whose examples are (chosen, rejected) pairs


def _columns(task: str, stored_reference: bool) -> list[str]:
    cols = ["example_id", "batch_index", "prompt_input_ids", "response1_input_ids", "weight"]
    if task in PAIRED:
        cols += ["response2_input_ids"]
    if task == "reward":
        cols.append("margin")
    if task == "pointwise":
        cols.append("response1_label")
    if task == "group":
        cols += ["response1_advantage", "response1_behaviour_logps", "response1_token_advantages", "response1_values",
                 "response1_returns"]  # the last three: --advantage gae (PPO), else null
    if stored_reference:
        cols += _ref_columns(task)
    return cols


def batch_groups(ds) -> list[tuple[int, list[int]]]:
    """(batch_index, row indices) of each group, in ascending batch_index, rows in stored order."""
    groups: dict[int, list[int]] = {}
    for row, b in enumerate(ds.with_format("arrow")[:]["batch_index"].to_pylist()):
        groups.setdefault(int(b), []).append(row)
    return [(b, groups[b]) for b in sorted(groups)]


def _ref_columns(task: str) -> list[str]:
    return {"pointwise": ["response1_ref_logp"], "group": ["response1_ref_logps"],
            "pairwise": ["response1_ref_logp", "response2_ref_logp"]}.get(task, [])


def _arrow(ds):
    return ds.with_format("arrow")[:]


def stored_reference_state(ds, task: str, where: str) -> str:
    """'all' when every row carries its reference log-probs, 'none' when no row does; a mix is an error."""
    import numpy as np

    cols = _ref_columns(task)
    if not cols:
        return "none"
    table = _arrow(ds.select_columns(cols))
    present = np.logical_and.reduce([~table[c].is_null().to_numpy(zero_copy_only=False) for c in cols])
    if present.all():
        return "all"
    if not present.any():
        return "none"
    raise UserError(f"{where} row {int(np.argmin(present))}: reference log-probs are null here but cached in "
                    f"other rows (partially cached batches); rebuild them with `alignpipe build-batches`, or "
                    f"pass --reference MODEL to recompute all of them live")


def _first_bad(ok, where: str, message: str) -> None:
    import numpy as np

    if not ok.all():
        raise UserError(f"{where} row {int(np.argmin(ok))}: {message}")


def check_rows(ds, task: str, where: str, vocab_size: int, stored_reference: bool) -> None:
    """One-line UserError naming the first row with an unusable weight, label, reference or token id."""
    import numpy as np
    import pyarrow.compute as pc

    table = _arrow(ds.select_columns(_columns(task, stored_reference)))

    def floats(c):
        return table[c].to_numpy(zero_copy_only=False).astype(float)  # nulls become nan

    w = floats("weight")
    _first_bad(np.isfinite(w) & (w >= 0), where, "column 'weight' must be a finite number >= 0")
    scalar_refs = _ref_columns(task) if stored_reference and task != "group" else []
    for c in scalar_refs + (["margin"] if task == "reward" else []):
        _first_bad(np.isfinite(floats(c)), where, f"column '{c}' must be a finite number")
    if task == "pointwise":
        _first_bad(~table["response1_label"].is_null().to_numpy(zero_copy_only=False), where,
                   "column 'response1_label' is null; KTO needs desirable/undesirable labels")
    ids = ["prompt_input_ids", "response1_input_ids"] + (["response2_input_ids"] if task in PAIRED else [])
    for c in ids[1:]:
        lengths = pc.list_value_length(table[c]).to_numpy(zero_copy_only=False)
        _first_bad(lengths > 0, where, f"column '{c}' is empty; every response needs at least one token")
    for c in ids:
        top = pc.max(pc.list_flatten(table[c])).as_py()
        if top is not None and top >= vocab_size:
            raise UserError(f"{where}: column '{c}' holds token id {top} >= the policy's vocabulary size "
                            f"{vocab_size}; the batches were built with another tokenizer")


_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # dataset -> {columns: arrow table}


def read_group(ds, rows: list[int], task: str, stored_reference: bool) -> dict[str, list]:
    """The columns train needs, for the given rows, as a dict of lists. The columns are selected once per
    dataset as an arrow table (memory-mapped), so a step only takes its rows (no per-step dataset copy)."""
    cols = tuple(_columns(task, stored_reference))
    views = _VIEWS.setdefault(ds, {})
    if cols not in views:
        views[cols] = _arrow(ds.select_columns(list(cols)))
    return views[cols].take(rows).to_pydict()


def rank_slice(group: dict[str, list], rank: int, world: int) -> dict[str, list]:
    """Rank r's examples r::world of a global batch; an empty slice becomes one copy of the first
    example with weight 0 (so every rank runs the same collective ops and contributes nothing)."""
    n = len(group["example_id"])
    part = {k: v[rank::world] for k, v in group.items()}
    if rank < n:
        return part
    pad = {k: v[:1] for k, v in group.items()}
    pad["weight"] = [0.0]
    return pad


def example_weights(group: dict[str, list], task: str) -> list[float]:
    return list(group["weight"])


@dataclass
class Batch:
    """One micro-batch as tensors. Sequences: B rows (sft, pointwise) or 2B rows (chosen then rejected)."""

    input_ids: object  # (N, T) long, right-padded prompt + response
    attention_mask: object  # (N, T) long
    response_mask: object  # (N, T) bool, True at response tokens
    weight: object  # (B,) float32
    label: object = None  # (B,) bool, pointwise
    margin: object = None  # (B,) float32, reward
    ref1: object = None  # (B,) float32 stored reference log-probs of response 1
    ref2: object = None
    num_examples: int = 0  # real examples (weight-0 padding of an empty rank slice excluded)
    num_tokens: int = 0  # non-pad tokens in the forward
    shared: dict | None = None  # pairwise: the same sequences as prompt once + 2B answers (collate_shared)
    weight_sum: float = 0.0  # sum of `weight`, as a Python number (no host read in the step)
    group: dict | None = None  # group task: advantage (B,), behaviour / ref_tokens (B, R) (token_logps)

    @property
    def paired(self) -> bool:
        return self.input_ids.shape[0] == 2 * self.weight.shape[0]


def collate_group(group: dict[str, list], task: str, pad_id: int, device, real: bool = True) -> Batch:
    """Tensors of one micro-batch; pairs concatenated (chosen rows, then rejected rows) for one forward."""
    import torch

    from alignpipe.models.logprobs import collate, collate_shared

    prompts, responses = list(group["prompt_input_ids"]), list(group["response1_input_ids"])
    shared = None
    if task in PAIRED:
        if task == "pairwise":
            shared = collate_shared(prompts, responses + list(group["response2_input_ids"]), pad_id, device)
        prompts, responses = prompts + prompts, responses + list(group["response2_input_ids"])
    t = collate(prompts, responses, pad_id, device)

    def f32(values):
        return torch.tensor(values, dtype=torch.float32, device=device)

    weights = example_weights(group, task)
    batch = Batch(t["input_ids"], t["attention_mask"], t["response_mask"], f32(weights),
                  num_examples=len(group["example_id"]) if real else 0,
                  num_tokens=sum(map(len, prompts)) + sum(map(len, responses)), shared=shared,
                  weight_sum=math.fsum(weights))
    if task == "pointwise":
        batch.label = torch.tensor(group["response1_label"], dtype=torch.bool, device=device)
    if task == "reward":
        batch.margin = f32(group["margin"])
    if task == "group":
        batch.group = group_batch_fields(group, max(map(len, responses)), device)
    if "response1_ref_logp" in group:
        batch.ref1 = f32(group["response1_ref_logp"])
        if "response2_ref_logp" in group:
            batch.ref2 = f32(group["response2_ref_logp"])
    return batch


@dataclass
class Step:
    """This rank's micro-batches of one optimisation step and the step's GLOBAL totals (Python numbers:
    every rank reads the whole global batch, so none of these needs a device read or a collective)."""

    micro: list[Batch]
    weight: float  # W: the sum of the example weights of the whole step
    examples: int
    tokens: int  # non-pad tokens of the whole step


def _tokens(group: dict[str, list], task: str) -> int:
    prompt = sum(map(len, group["prompt_input_ids"]))
    if task in PAIRED:
        return 2 * prompt + sum(map(len, group["response1_input_ids"])) + sum(map(len, group["response2_input_ids"]))
    return prompt + sum(map(len, group["response1_input_ids"]))


def micro_batches(ds, groups: list[tuple[int, list[int]]], task: str, stored_reference: bool, pad_id: int,
                  device, rank: int = 0, world: int = 1) -> Step:
    """This rank's micro-batches of one optimisation step, with the step's global totals."""
    out, weights, examples, tokens = [], [], 0, 0
    for _, rows in groups:
        group = read_group(ds, rows, task, stored_reference)
        weights += example_weights(group, task)
        examples, tokens = examples + len(rows), tokens + _tokens(group, task)
        part = rank_slice(group, rank, world)
        out.append(collate_group(part, task, pad_id, device, real=rank < len(rows)))
    return Step(out, math.fsum(weights), examples, tokens)


def mean_answer_tokens(ds) -> float:
    """sum_i w_i |o_i| / sum_i w_i over a batches dataset: the token normaliser of DAPO's dataset-level loss."""
    table = _arrow(ds.select_columns(["weight", "response1_input_ids"]))
    import pyarrow.compute as pc

    w = table["weight"].to_pylist()
    n = pc.list_value_length(table["response1_input_ids"]).to_pylist()
    total = math.fsum(w)
    return math.fsum(a * b for a, b in zip(w, n)) / total if total > 0 else 1.0


def dataset_scale(ds, task: str, steps_per_epoch: int) -> float:
    """D of the 'dataset' weight normalisation: the nominal examples per step (N / steps per epoch) times the
    mean example weight over the dataset, i.e. the total example weight divided by the steps per epoch."""
    w = _arrow(ds.select_columns(["weight"]))["weight"].to_pylist()
    return math.fsum(w) / max(1, steps_per_epoch)


@dataclass
class Plan:
    """Which stored batches each optimisation step reads."""

    num_batches: int
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int | None = None

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.num_batches // self.grad_accum)

    @property
    def total_steps(self) -> int:
        total = self.epochs * self.steps_per_epoch
        return min(total, self.max_steps) if self.max_steps else total

    def groups(self, step: int) -> slice:
        """Positions (in batch_index order) of the stored batches of 0-based `step`."""
        start = (step % self.steps_per_epoch) * self.grad_accum
        return slice(start, min(start + self.grad_accum, self.num_batches))


def describe(path: Path, ds, groups: list[tuple[int, list[int]]]) -> str:
    sizes = [len(rows) for _, rows in groups]
    return f"{path}: {len(ds)} examples in {len(groups)} batches (sizes {min(sizes)}..{max(sizes)})"


def pad_lists(lists, width: int, device, dtype=None):
    """A (B, width) float tensor from ragged lists of floats, zero padded (or cut to width)."""
    import torch

    out = torch.zeros((len(lists), width), dtype=dtype or torch.float32)
    for i, values in enumerate(lists):
        values = list(values)[:width]
        if values:
            out[i, : len(values)] = torch.tensor(values, dtype=out.dtype)
    return out.to(device)


def group_batch_fields(group: dict, widths: int, device) -> dict:
    """The group task's per-answer tensors of a micro-batch (train_data.collate_group): advantage (B,),
    behaviour per-token log-probs (B, R) and, when stored, reference per-token log-probs (B, R); with GAE
    (--advantage gae) the advantage per token (B, R) and the critic's stored values and returns (B, R)."""
    import torch

    out = {"advantage": torch.tensor(group["response1_advantage"], dtype=torch.float32, device=device),
           "behaviour": pad_lists(group["response1_behaviour_logps"], widths, device)}
    if group.get("response1_ref_logps") is not None:
        out["ref_tokens"] = pad_lists(group["response1_ref_logps"], widths, device)
    if (group.get("response1_token_advantages") or [None])[0] is not None:  # GAE: (B, R) per token
        out["advantage"] = pad_lists(group["response1_token_advantages"], widths, device)
        out["old_values"] = pad_lists(group["response1_values"], widths, device)
        out["returns"] = pad_lists(group["response1_returns"], widths, device)
    return out
