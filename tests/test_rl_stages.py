"""The RL stages on the tiny model: generate keeps per-token behaviour log-probs, annotate carries them with the
reference, build-batches --task group keeps the sampled tokens and their log-probs and counts equal groups,
train takes clipped policy-gradient steps (with a stored per-token reference for the KL term)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alignpipe.cli import app

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def load(path):
    from alignpipe.data.io import _load

    return _load(Path(path))


@pytest.fixture(scope="module")
def annotated(tmp_path_factory, tiny_lm_dir):
    d = tmp_path_factory.mktemp("rl")
    rows = [json.loads(x) for x in (ROOT / "pipelines/data/arithmetic.jsonl").read_text().splitlines()]
    src = d / "p.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in [r for r in rows if r["split"] == "train"][:6]))
    run("import", src, "--out", d / "prompts")
    run("generate", d / "prompts", "--policy", tiny_lm_dir, "--out", d / "gen", "--num-samples", 4,
        "--max-new-tokens", 6, "--device", "cpu")
    run("annotate", d / "gen", "--annotator", "length", "--annotator", "exact-answer,weight=0", "--pairing",
        "pointwise", "--out", d / "ann")
    return d


def test_generate_and_annotate_carry_per_token_logps_and_reference(annotated):
    gen, ann = load(annotated / "gen"), load(annotated / "ann")
    for row in gen:
        assert len(row["response_token_logps"]) == len(row["response_token_ids"]) == row["num_tokens"]
        assert math.isclose(sum(row["response_token_logps"]), row["behaviour_logp"], abs_tol=1e-3)
    by_key = {(r["prompt_id"], r["sample_index"]): r for r in gen}
    for row in ann:
        g = by_key[(row["prompt_id"], row["response1_sample_index"])]
        assert row["reference"] == g["reference"] and row["response1_token_logps"] == g["response_token_logps"]
    report = json.loads((annotated / "ann/manifest.json").read_text())["report"]
    unparsed = sum(r["name"] == "exact-answer" and r["reason"] == "no answer found" for row in ann for r in row["raw"])
    assert report["unparsed"] == {"exact-answer": unparsed} and unparsed > 0  # the tiny model writes no numbers


def test_group_batches_keep_sampled_tokens_and_count_equal_groups(annotated, tiny_lm_dir):
    out = annotated / "batches"
    run("build-batches", annotated / "ann", "--task", "group", "--advantage", "dr-grpo", "--tokenizer", tiny_lm_dir,
        "--reference", tiny_lm_dir, "--batch-size", 8, "--out", out)
    ds, ann = load(out), load(annotated / "ann")
    by_key = {f"{r['prompt_id']}/0.{r['response1_sample_index']}": r for r in ann}
    groups: dict = {}
    for ex in ds:
        a = by_key[ex["example_id"]]
        assert ex["response1_input_ids"] == a["response1_token_ids"]  # exactly as sampled, not re-tokenised
        assert ex["response1_behaviour_logps"] == pytest.approx(a["response1_token_logps"])
        assert len(ex["response1_ref_logps"]) == len(ex["response1_input_ids"])
        groups.setdefault(ex["prompt_id"], []).append((a["response1_reward"], ex["response1_advantage"]))
    for members in groups.values():  # Dr. GRPO: r - mean of the group
        mean = sum(r for r, _ in members) / len(members)
        assert all(math.isclose(adv, r - mean, abs_tol=1e-9) for r, adv in members)
    info = json.loads((out / "manifest.json").read_text())["report"]["inputs"][0]
    assert info["groups"] == 6 and info["equal_groups_dropped"] == info["equal_groups"] == 6 - len(groups)


def test_train_group_losses_with_and_without_kl(annotated, tiny_lm_dir):
    for loss in ("grpo", "dapo,kl_coef=0.05", "gspo", "cispo", "grpo,tis_cap=2"):
        out = annotated / f"policy-{loss.replace(',', '-').replace('=', '')}"
        run("train", annotated / "batches", "--policy", tiny_lm_dir, "--loss", loss, "--lora-r", 4, "--lr", 1e-3,
            "--epochs", 2, "--device", "cpu", "--out", out)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
        assert rows and all(math.isfinite(r["loss"]) for r in rows)
        assert {"clip/low", "clip/high", "ratio/mean", "ratio/std", "entropy", "advantage/mean"} <= set(rows[0])
        assert abs(rows[0]["ratio/mean"] - 1) < 1e-3  # the first step is on-policy
        assert ("kl" in rows[-1]) == ("kl_coef" in loss)
        assert ("tis/mean" in rows[-1]) == ("tis_cap" in loss)  # TIS: its weights' mean and truncated fraction
