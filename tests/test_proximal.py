"""`train --proximal` (decoupled PPO, alignpipe/training/proximal.py): on answers the starting policy sampled it
is PPO (pi_prox = mu); on stale answers the first step's ratio is exactly 1 (the clip is taken around the policy
being trained) and the staleness goes into the TIS weight; a kill and a rerun give the weights of an
uninterrupted run (pi_prox is kept beside the checkpoints); a loss without tis_cap is refused in one line."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import cli, ok, run_killed
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stale(tmp_path_factory, tiny_lm_dir) -> dict:
    """Group batches sampled by the tiny model (policy 0), and policy 1 trained on them: the same batches are
    one policy old for policy 1."""
    d = tmp_path_factory.mktemp("proximal")
    rows = [json.loads(x) for x in (ROOT / "pipelines/data/arithmetic.jsonl").read_text().splitlines()]
    src = d / "p.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in [r for r in rows if r["split"] == "train"][:6]))
    ok("import", src, "--out", d / "prompts")
    ok("generate", d / "prompts", "--policy", tiny_lm_dir, "--out", d / "gen", "--num-samples", 4,
       "--max-new-tokens", 6, "--device", "cpu", "--seed", 1)
    ok("annotate", d / "gen", "--annotator", "length", "--pairing", "pointwise", "--out", d / "ann")
    ok("build-batches", d / "ann", "--task", "group", "--tokenizer", tiny_lm_dir, "--batch-size", 8,
       "--out", d / "batches")
    ok(*train_args(d, tiny_lm_dir, "grpo", d / "policy1"))
    return {"dir": d, "batches": d / "batches", "policy1": d / "policy1"}


def train_args(d: Path, policy: Path, loss: str, out: Path, *extra) -> list:
    return ["train", d / "batches", "--policy", policy, "--loss", loss, "--lora-r", 4, "--lr", 2e-3, "--epochs", 2,
            "--device", "cpu", "--seed", 0, *extra, "--out", out]


def rows(policy: Path) -> list[dict]:
    return [json.loads(x) for x in (policy / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_on_policy_answers_decoupled_ppo_is_ppo(stale, tiny_lm_dir, tmp_path):
    """pi_prox is the starting policy, which sampled the answers: pi_prox = mu up to the sampler's numerics, the
    TIS weight is 1 and every step's loss, clip fractions and gradient norm are PPO's."""
    d = stale["dir"]
    ok(*train_args(d, tiny_lm_dir, "grpo", tmp_path / "ppo"))
    ok(*train_args(d, tiny_lm_dir, "grpo,tis_cap=2", tmp_path / "decoupled", "--proximal"))
    ppo, dec = rows(tmp_path / "ppo"), rows(tmp_path / "decoupled")
    assert len(ppo) == len(dec) >= 2
    for a, b in zip(ppo, dec):
        for key in ("loss", "grad_norm", "ratio/mean", "clip/low", "clip/high"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-6), (a["step"], key, a[key], b[key])
        assert abs(b["tis/mean"] - 1) < 1e-4
    report = json.loads((tmp_path / "decoupled/manifest.json").read_text())["report"]
    assert report["proximal"] is True and set(report["staleness"]) == {"0"}


def test_stale_answers_clip_around_the_trained_policy_and_weight_the_lag(stale, tmp_path):
    """Answers of policy 0 trained from policy 1 (lag 1): with --proximal the first step's ratio is exactly 1 and
    nothing is clipped, the TIS weight carries pi_1 / pi_0; without it the first ratio is pi_1 / pi_0."""
    d, p1 = stale["dir"], stale["policy1"]
    ok(*train_args(d, p1, "grpo", tmp_path / "plain", "--max-staleness", 1))
    ok(*train_args(d, p1, "grpo,tis_cap=2", tmp_path / "decoupled", "--max-staleness", 1, "--proximal"))
    plain, dec = rows(tmp_path / "plain")[0], rows(tmp_path / "decoupled")[0]
    assert abs(dec["ratio/mean"] - 1) < 1e-6 and dec["clip/low"] == dec["clip/high"] == 0
    assert abs(plain["ratio/mean"] - 1) > 1e-3  # the lag shows in the plain ratio ...
    assert abs(dec["tis/mean"] - plain["ratio/mean"]) < 0.05 * abs(plain["ratio/mean"] - 1) + 1e-4  # ... and here
    report = json.loads((tmp_path / "decoupled/manifest.json").read_text())["report"]
    assert set(report["staleness"]) == {"1"}


def test_kill_then_rerun_gives_the_uninterrupted_weights(stale, tmp_path):
    d, p1 = stale["dir"], stale["policy1"]
    args = lambda out: train_args(d, p1, "grpo,tis_cap=2", out, "--max-staleness", 1, "--proximal",
                                  "--save-every", 1)
    ok(*args(tmp_path / "whole"))
    run_killed(args(tmp_path / "killed"), "after:checkpoint-*:1")
    assert (tmp_path / ".killed.partial" / "proximal-rank0.safetensors").is_file()
    rerun = ok(*args(tmp_path / "killed"))
    assert "resuming after step 1" in rerun.output
    # the killed child and this process may differ in the last float32 bits (as in test_train's resume test)
    killed, whole = rows(tmp_path / "killed"), rows(tmp_path / "whole")
    assert [r["step"] for r in killed] == [r["step"] for r in whole]
    for a, b in zip(killed, whole):
        for key in ("loss", "grad_norm", "tis/mean", "ratio/mean"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-6), (a["step"], key, a[key], b[key])
    for f in (tmp_path / "whole").glob("*.safetensors"):
        x, y = load_file(f), load_file(tmp_path / "killed" / f.name)
        assert x.keys() == y.keys() and all(torch.allclose(x[k], y[k], atol=1e-6) for k in x)


@pytest.mark.parametrize("loss", ["grpo", "dr-grpo"])
def test_proximal_needs_a_group_loss_with_tis_cap(stale, tiny_lm_dir, tmp_path, loss):
    result = cli(*train_args(stale["dir"], tiny_lm_dir, loss, tmp_path / "out", "--proximal"))
    assert result.exit_code == 2 and "--proximal: needs a policy-gradient loss with tis_cap" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
