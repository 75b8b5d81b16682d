"""The CUDA paths against the CPU: a train step, generate, a build-batches reference pass and an annotate forward
on CUDA give the CPU's results within tolerances that know bfloat16 and TF32 (`alignpipe.testing.logp_tolerance`);
two processes on one GPU stop with one line; a CPU run with sharded weights ignores the machine's GPU.

Every test here carries the `gpu` marker: where no CUDA device is present it is skipped, saying why (see
tests/conftest.py). On a GPU machine: `pytest -m gpu` (or `ALIGNPIPE_TEST_DEVICE=cuda pytest -m gpu`, which fails
instead of skipping when CUDA is missing).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ok
from safetensors.torch import load_file
from test_train import losses_of, pairs, task_examples, write_batches

from alignpipe.data.io import read_input
from alignpipe.testing import logp_tolerance

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]
DEVICES = ("cpu", "cuda")
PREFERENCE = [
    {"prompt": "What is 2+2?", "chosen": "It is 4.", "rejected": "5"},
    {"prompt": "Name a colour.", "chosen": "Blue is a colour that many people like.", "rejected": "Dog"},
    {"prompt": "Say hi", "chosen": "Hi!", "rejected": "Go away, I do not want to talk to you at all."},
    {"prompt": "Explain the for statement.", "chosen": "It loops over a sequence.", "rejected": "No."},
]


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_lm_dir):
    """Imported preference pairs, prompts, and generations of the tiny policy sampled on the CPU."""
    root = tmp_path_factory.mktemp("gpu-data")
    (root / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PREFERENCE))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in PREFERENCE))
    ok("import", root / "pref.jsonl", "--out", root / "pref")
    ok("import", root / "prompts.jsonl", "--out", root / "prompts")
    ok("generate", root / "prompts", "--policy", tiny_lm_dir, "--num-samples", 2, "--max-new-tokens", 12,
       "--device", "cpu", "--out", root / "gens")
    return {"pref": root / "pref", "prompts": root / "prompts", "gens": root / "gens"}


def _worst_excess(a: list[float], b: list[float], bounds: list[float]) -> float:
    """max(|a - b| - bound) over the rows: <= 0 when every row is within its bound."""
    return max(abs(x - y) - t for x, y, t in zip(a, b, bounds))


# ------------------------------------------------------------------------------------------ train
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_train_steps_on_cuda_match_the_cpu(dtype, tmp_path, tiny_lm_dir):
    b = write_batches(tmp_path / "b", "pairwise", pairs(8), tiny_lm_dir)
    lr, steps = 1e-3, 2
    for dev in DEVICES:
        ok("train", b, "--policy", tiny_lm_dir, "--loss", "dpo", "--lr", lr, "--max-steps", steps, "--dtype", dtype,
           "--device", dev, "--out", tmp_path / dev)
    report = json.loads((tmp_path / "cuda" / "manifest.json").read_text())["report"]
    assert report["device"].startswith("cuda")
    cpu, cuda = losses_of(tmp_path / "cpu"), losses_of(tmp_path / "cuda")
    assert cpu[0] == pytest.approx(0.693147, abs=1e-5) and cuda[0] == pytest.approx(0.693147, abs=1e-5)
    # DPO's loss moves by at most beta / 2 per nat of margin; a margin sums 4 log-probs of <= 16 tokens
    assert abs(cpu[1] - cuda[1]) <= 0.1 / 2 * 4 * logp_tolerance(dtype, DEVICES, 16)
    wa, wb = load_file(tmp_path / "cpu" / "model.safetensors"), load_file(tmp_path / "cuda" / "model.safetensors")
    # Adam moves every weight by about lr a step whatever the gradient's size: tiny gradients of either sign
    # may differ across devices, so a weight may differ by up to 2 lr per step (+ one bfloat16 rounding)
    bound = 2 * lr * steps + (2 ** -8 if dtype == "bfloat16" else 0.0)
    assert max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa) <= bound


# ------------------------------------------------------------------------------------------ generate
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_generate_on_cuda_logps_match_a_cpu_forward(dtype, data, tmp_path, tiny_lm_dir):
    """Sampling on CUDA draws other tokens than on the CPU (other rounding of near-uniform logits), so the check
    is that each sampled row's behaviour log-prob is its tokens' log-prob under a float32 CPU forward."""
    from alignpipe.models.loading import load_causal_lm, load_tokenizer
    from alignpipe.models.logprobs import score_responses
    from alignpipe.models.prompting import encode, render_prompt

    ok("generate", data["prompts"], "--policy", tiny_lm_dir, "--num-samples", 2, "--max-new-tokens", 16,
       "--dtype", dtype, "--device", "cuda", "--batch-size", 2, "--out", tmp_path / "g")
    rows = read_input(tmp_path / "g", "generations", stage="test")[0].to_list()
    assert len(rows) == 2 * len(PREFERENCE)
    tok, model = load_tokenizer(tiny_lm_dir), load_causal_lm(tiny_lm_dir).eval()
    prompts = [encode(tok, render_prompt(tok, r["prompt"], r["messages"])) for r in rows]
    cpu = score_responses(model, prompts, [r["response_token_ids"] for r in rows], tok.pad_token_id)
    bounds = [logp_tolerance(dtype, DEVICES, r["num_tokens"]) for r in rows]
    assert _worst_excess([r["behaviour_logp"] for r in rows], cpu, bounds) <= 0
    assert all(len(r["response_token_ids"]) == r["num_tokens"] for r in rows)


# ------------------------------------------------------------------------------- build-batches reference
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_build_batches_reference_on_cuda_matches_the_cpu(dtype, data, tmp_path, tiny_lm_dir):
    got = {}
    for dev in DEVICES:
        ok("build-batches", data["pref"], "--task", "pairwise", "--reference", tiny_lm_dir, "--dtype", dtype,
           "--device", dev, "--batch-size", 2, "--out", tmp_path / dev)
        got[dev] = read_input(tmp_path / dev, "batches-pairwise", stage="test")[0].to_list()
    for k in (1, 2):
        bounds = [logp_tolerance(dtype, DEVICES, len(r[f"response{k}_input_ids"])) for r in got["cpu"]]
        assert _worst_excess([r[f"response{k}_ref_logp"] for r in got["cuda"]],
                             [r[f"response{k}_ref_logp"] for r in got["cpu"]], bounds) <= 0


# ------------------------------------------------------------------------------------------ annotate
def test_annotate_reward_model_on_cuda_matches_the_cpu(data, tmp_path, tiny_rm_dir):
    got = {}
    for dev in DEVICES:
        ok("annotate", data["gens"], "--annotator", f"reward-model:{tiny_rm_dir}", "--batch-size", 3,
           "--device", dev, "--out", tmp_path / dev)
        got[dev] = [r["response1_reward"] for r in read_input(tmp_path / dev, "annotations", stage="t")[0]]
    # a score is one output of a forward over the whole sequence: a few tokens' worth of float32 rounding
    assert _worst_excess(got["cuda"], got["cpu"], [logp_tolerance("float32", DEVICES, 8)] * len(got["cpu"])) <= 0


# ---------------------------------------------------------------------------------- processes and GPUs
def _launch(launcher: list[str], args: list, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, "-m", "alignpipe", "train", *map(str, args)], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_two_processes_on_one_gpu_stop_with_one_line_naming_the_cause(tmp_path, tiny_lm_dir):
    b = write_batches(tmp_path / "b", "pairwise", pairs(4), tiny_lm_dir)
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": first}  # exactly one GPU visible
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]
    result = _launch(torchrun, [b, "--policy", tiny_lm_dir, "--loss", "dpo", "--max-steps", 1, "--device", "cuda",
                                "--out", tmp_path / "p"], env)
    if result.returncode == 0:  # shared correctly: then the policy is whole
        assert (tmp_path / "p" / "model.safetensors").exists()
        return
    assert "invalid device ordinal" not in result.stderr and "internal error" not in result.stderr
    assert ("error: --device cuda: the process with LOCAL_RANK=1 needs a GPU of its own but 1 CUDA device(s) are "
            "visible") in result.stderr
    assert not (tmp_path / "p").exists()


def test_sharded_cpu_run_ignores_the_machines_gpu(tmp_path, tiny_lm_dir):
    """FSDP2's default mesh is the machine's accelerator: a --device cpu run must shard on a CPU mesh."""
    b = write_batches(tmp_path / "b", "pointwise", task_examples("pointwise", 4), tiny_lm_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]
    result = _launch(torchrun, [b, "--policy", tiny_lm_dir, "--loss", "kto", "--max-steps", 1, "--device", "cpu",
                                "--sharding", "full", "--out", tmp_path / "p"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es), sharding full" in result.stderr
