"""Reference log-probs with the numerics of training: a reference cached by build-batches is computed as train
computes the policy's for the same --dtype (bfloat16: autocast over float32 weights; batch by stored batch),
so with policy = reference the first DPO step's loss is log 2; a stored reference made otherwise is noted in
one line at start and recorded in train's manifest."""
from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import cli, ok
from test_train import losses_of, make_batches, pairs

from alignpipe.data.manifest import read_manifest
from alignpipe.models import logprobs
from alignpipe.training import micro_batches as td

# prompts and answers of varied lengths, so batches are padded and shards cut batches
PREFERENCE = [{"prompt": f"Question {i}: " + "why " * (i % 5), "chosen": "Because " + "it is so. " * (1 + i % 3),
               "rejected": "No" + "!" * (i % 4)} for i in range(10)]
NEEDS = "needs request 2 of /tmp/coord/requests-gpu.md (build-batches / train patches)"


def _applied() -> bool:
    import inspect

    from alignpipe.stages import build_batches

    return "batch_logps" in inspect.getsource(build_batches)


needs_patch = pytest.mark.xfail(not _applied(), strict=True, reason=NEEDS)


@pytest.fixture(scope="module")
def pref(tmp_path_factory):
    root = tmp_path_factory.mktemp("numerics")
    (root / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PREFERENCE))
    ok("import", root / "pref.jsonl", "--out", root / "pref")
    return root / "pref"


def _batches(pref, out, lm, dtype, *extra):
    ok("build-batches", pref, "--task", "pairwise", "--tokenizer", lm, "--reference", lm, "--dtype", dtype,
       "--device", "cpu", "--batch-size", 3, "--shard-size", 4, "--out", out, *extra)
    return out


# ------------------------------------------------------------------------------------------- the CLI
@needs_patch
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_first_dpo_loss_is_log2_with_a_cached_reference(dtype, pref, tmp_path, tiny_lm_dir):
    b = _batches(pref, tmp_path / "b", tiny_lm_dir, dtype)
    assert read_manifest(b)["report"]["reference_numerics"] == {
        "dtype": dtype, "autocast": dtype == "bfloat16", "device_type": "cpu", "layout": "concatenated",
        "processes": 1}
    result = ok("train", b, "--policy", tiny_lm_dir, "--loss", "dpo", "--dtype", dtype, "--device", "cpu",
                "--max-steps", 1, "--out", tmp_path / "p")
    assert "note:" not in result.output
    assert abs(losses_of(tmp_path / "p")[0] - math.log(2)) <= 1e-6
    report = read_manifest(tmp_path / "p")["report"]
    assert report["reference"] == "stored" and report["reference_numerics"]["match"] is True


@needs_patch
def test_a_reference_made_otherwise_is_noted_in_one_line_and_in_the_manifest(pref, tmp_path, tiny_lm_dir):
    b = _batches(pref, tmp_path / "b", tiny_lm_dir, "float32")
    result = ok("train", b, "--policy", tiny_lm_dir, "--loss", "dpo", "--dtype", "bfloat16", "--device", "cpu",
                "--max-steps", 1, "--out", tmp_path / "p")
    notes = [line for line in result.output.splitlines() if "note:" in line]
    assert len(notes) == 1 and "computed with dtype float32 (this run: bfloat16)" in notes[0], result.output
    numerics = read_manifest(tmp_path / "p")["report"]["reference_numerics"]
    assert numerics["match"] is False and numerics["stored"]["dtype"] == "float32"
    assert numerics["train"]["dtype"] == "bfloat16" and numerics["note"] in notes[0]


@needs_patch
def test_the_reference_pass_resumes_to_the_same_values_when_shards_cut_batches(pref, tmp_path, tiny_lm_dir):
    """Shards of 4 rows over batches of 3 pairs: a cut batch is computed whole in both shards."""
    a = _batches(pref, tmp_path / "a", tiny_lm_dir, "bfloat16")
    b = _batches(pref, tmp_path / "b", tiny_lm_dir, "bfloat16", "--shard-size", 1000)
    from alignpipe.data.io import read_input

    ra, rb = (read_input(x, "batches-pairwise", stage="t")[0].to_list() for x in (a, b))
    assert ra == rb


def test_train_refuses_nothing_and_notes_nothing_without_a_stored_reference(pref, tmp_path, tiny_lm_dir):
    ok("build-batches", pref, "--task", "pairwise", "--tokenizer", tiny_lm_dir, "--batch-size", 3, "--out",
       tmp_path / "b")
    result = cli("train", tmp_path / "b", "--policy", tiny_lm_dir, "--loss", "dpo", "--dtype", "bfloat16",
                 "--device", "cpu", "--max-steps", 1, "--out", tmp_path / "p")
    assert result.exit_code == 0 and "note:" not in result.output, result.output
    assert abs(losses_of(tmp_path / "p")[0] - math.log(2)) <= 1e-6  # live reference: the policy's own forward


# ----------------------------------------------------------------------------- the functions (logprobs)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shared", [False, True])
def test_batch_logps_equal_trainings_forward_bit_for_bit(dtype, shared, tiny_lm_dir, monkeypatch):
    """The reference pass (eval, inference mode) and train's policy forward (train mode, gradients on) under the
    same autocast, on the same collated batch: identical floats, with pairs concatenated or prompt-shared."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(logprobs, "SHARED_PROMPT_MIN_WIDTH", 0 if shared else 10**9)
    ds = make_batches("pairwise", pairs(9), tiny_lm_dir, batch_size=4)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    assert logprobs.use_shared_prompt(model) is shared
    for _, rows in td.batch_groups(ds):
        batch = td.collate_group(td.read_group(ds, rows, "pairwise", False), "pairwise", 3, "cpu")
        ref = logprobs.batch_logps(model.eval(), batch, dtype=dtype, device="cpu")
        tensors = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                   "response_mask": batch.response_mask}
        with logprobs.autocast("cpu", dtype):
            policy, _ = logprobs.summed_logps(model.train(), tensors, batch.shared, logprobs.use_shared_prompt(model))
        assert policy.requires_grad and policy.dtype == torch.float32
        assert torch.equal(policy.detach(), ref)


def test_bfloat16_autocast_and_bfloat16_weights_differ(tiny_lm_dir):
    """Why the weights' dtype matters: bfloat16 weights round every parameter, autocast only matmul outputs;
    the summed log-probs differ by far more than the 2e-5 that would keep the first DPO loss within 1e-6."""
    from transformers import AutoModelForCausalLM

    ds = make_batches("pairwise", pairs(6), tiny_lm_dir, batch_size=6)
    batch = td.collate_group(td.read_group(ds, td.batch_groups(ds)[0][1], "pairwise", False), "pairwise", 3, "cpu")
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    autocast = logprobs.batch_logps(model, batch, dtype="bfloat16", device="cpu")
    weights = logprobs.batch_logps(model.to(torch.bfloat16), batch, dtype="float32", device="cpu")
    assert float((autocast - weights).abs().max()) > 2e-5


def test_numerics_record_and_mismatch_line():
    used = logprobs.reference_numerics("bfloat16", "cuda:0", True, 1)
    assert used == {"dtype": "bfloat16", "autocast": True, "device_type": "cuda", "layout": "shared prompt",
                    "processes": 1}
    assert logprobs.numerics_mismatch(dict(used), used) is None
    line = logprobs.numerics_mismatch(logprobs.reference_numerics("float32", "cpu", True), used)
    assert "\n" not in line
    assert "dtype float32 (this run: bfloat16), autocast False (this run: True), device_type cpu (this run: cuda)" in line
    assert "no record" in logprobs.numerics_mismatch(None, used)
