"""Identical runs, identical bytes: a model folder's fingerprint depends on its content only (weights and a
canonical form of its config; PEFT's per-process `target_modules` order and the trainer state left out), two
trainings of the same adapter in processes with different hash seeds write the same bytes, a retrained but
identical policy leaves what was made from it up to date, and two runs of the tiny RL and online recipes
write byte-identical outputs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_generate import write_prompts
from test_train import pairs, train, write_batches
from typer.testing import CliRunner

from alignpipe.cli import app

ROOT = Path(__file__).resolve().parents[1]
# written per run whatever it computes: timings, TensorBoard event files (named by time and pid), the report
VOLATILE = ("manifest.json", "metrics.jsonl", "trackers.json")


def _adapter(folder: Path, targets: list[str], indent: int, weight: float = 1.0) -> Path:
    folder.mkdir(parents=True)
    config = {"r": 4, "target_modules": targets, "base_model_name_or_path": "/m", "peft_type": "LORA"}
    if indent == 0:
        config = dict(reversed(list(config.items())))
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=indent or None))
    save_file({"a": torch.full((2, 2), weight)}, str(folder / "adapter_model.safetensors"))
    return folder


def test_a_fingerprint_depends_on_the_content_only(tmp_path):
    from alignpipe.data.manifest import fingerprint_files
    from alignpipe.models.loading import model_fingerprint

    a = _adapter(tmp_path / "a", ["q_proj", "v_proj", "o_proj"], indent=2)
    b = _adapter(tmp_path / "b", ["v_proj", "o_proj", "q_proj"], indent=0)  # other order, key order, spacing
    (b / "trackers.json").write_text('{"tensorboard": "/elsewhere/tb"}')
    (b / "trainer_state").mkdir()
    (b / "trainer_state" / "state.json").write_text('{"step": 3}')
    save_file({"x": torch.ones(1)}, str(b / "trainer_state" / "extra.safetensors"))
    assert fingerprint_files(a) == fingerprint_files(b)
    assert model_fingerprint(a) == model_fingerprint(b)
    assert fingerprint_files(_adapter(tmp_path / "c", ["q_proj"], indent=2)) != fingerprint_files(a)
    assert fingerprint_files(_adapter(tmp_path / "d", ["q_proj", "v_proj", "o_proj"], 2, 2.0)) != fingerprint_files(a)


def _train_in_child(batches: Path, out: Path, policy, hash_seed: str, *more) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": hash_seed}
    args = [batches, "--out", out, "--policy", policy, "--loss", "dpo", "--lr", "1e-2", "--lora-r", "4", *more]
    p = subprocess.run([sys.executable, "-m", "alignpipe", "train", *map(str, args)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-2000:]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*"))
            if f.is_file() and f.name not in VOLATILE and "tb" not in f.relative_to(folder).parts
            and "report" not in f.relative_to(folder).parts}


def test_the_same_adapter_trained_in_two_processes_is_the_same_bytes(tmp_path, tiny_lm_dir):
    """PEFT lists target_modules (a set) in an order that depends on the process's string hash seed."""
    b = write_batches(tmp_path / "b", "pairwise", pairs(8), tiny_lm_dir)
    _train_in_child(b, tmp_path / "one", tiny_lm_dir, "1")
    _train_in_child(b, tmp_path / "two", tiny_lm_dir, "2")
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert "trainer_state/optimizer.pt" in one and one == two
    config = json.loads((tmp_path / "one" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(config["target_modules"])
    fp = [json.loads((tmp_path / n / "manifest.json").read_text())["fingerprint"] for n in ("one", "two")]
    assert fp[0] == fp[1]
    # and continuing from each gives the same bytes again
    _train_in_child(b, tmp_path / "three", tmp_path / "one", "3", "--continue-from", tmp_path / "one")
    _train_in_child(b, tmp_path / "four", tmp_path / "two", "4", "--continue-from", tmp_path / "two")
    assert _files(tmp_path / "three") == _files(tmp_path / "four")


def test_a_retrained_identical_policy_leaves_what_was_made_from_it_up_to_date(tmp_path, tiny_lm_dir):
    runner = CliRunner()
    b = write_batches(tmp_path / "b", "pairwise", pairs(4), tiny_lm_dir)
    args = [b, "--out", tmp_path / "p", "--policy", tiny_lm_dir, "--loss", "dpo", "--lr", "1e-2", "--lora-r", "4"]
    assert train(*args)[0] == 0
    prompts = write_prompts(tmp_path / "prompts", [{"prompt": "Hi"}, {"prompt": "Why?"}])
    gen = ["generate", str(prompts), "--policy", str(tmp_path / "p"), "--out", str(tmp_path / "g"),
           "--max-new-tokens", "4"]
    first = runner.invoke(app, gen)
    assert first.exit_code == 0, first.output
    before = json.loads((tmp_path / "p" / "manifest.json").read_text())["fingerprint"]
    code, out = train(*args, "--force")  # retrained: a new folder, the same content
    assert code == 0, out
    assert json.loads((tmp_path / "p" / "manifest.json").read_text())["fingerprint"] == before
    again = runner.invoke(app, gen)
    assert again.exit_code == 0 and "up to date" in again.output, again.output
    # the output's manifest is newer than its input's again: make does not run the stage a third time
    assert (tmp_path / "g" / "manifest.json").stat().st_mtime_ns >= (tmp_path / "p" / "manifest.json").stat().st_mtime_ns


# ------------------------------------------------------------------------------------------ recipes
RECIPES = {
    "rl": ["-f", "pipelines/rl.mk", "ITERS=2", "ANNOTATOR=length", "EVAL_ANNOTATOR=exact-answer",
           "PROMPTS_PER_ITER=4", "NUM_SAMPLES=4", "EVAL_PROMPTS=4", "EVAL_SAMPLES=2", "MAX_NEW_TOKENS=8", "LORA_R=4",
           "BATCH=8"],
    "online": ["-f", "pipelines/online.mk", "ITERS=2", "ANNOTATOR=length", "PROMPTS_PER_ITER=8", "EVAL_PROMPTS=4",
               "MAX_NEW_TOKENS=8", "LORA_R=4", "EPOCHS=1", "BATCH=4"],
}


def run_recipe(name: str, run: Path, model: Path, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = ["make", "-s", *RECIPES[name], "run", f"PY={sys.executable}", f"RUN={run}", f"MODEL={model}", *extra]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr[-2000:]


def outputs(run: Path) -> dict[str, bytes]:
    """Every file the stages wrote, but for what is written per run whatever it computes."""
    return _files(run)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_two_runs_of_a_recipe_write_identical_bytes(name, tmp_path, tiny_lm_dir):
    """Both runs in the same folder (rows name their policy by path): the first is moved aside."""
    run = tmp_path / "run"
    run_recipe(name, run, tiny_lm_dir)
    shutil.move(run, tmp_path / "first")
    run_recipe(name, run, tiny_lm_dir)
    first, second = outputs(tmp_path / "first"), outputs(run)
    assert first.keys() == second.keys() and any(k.endswith(".arrow") for k in first)
    policies = sorted(run.glob("iter-*/policy"))
    assert f"{policies[-1].relative_to(run)}/trainer_state/optimizer.pt" in first
    report = json.loads((policies[-1] / "manifest.json").read_text())["report"]
    assert report["continued_from"]["path"] == str(policies[-2])  # the recipe continues the optimiser
    differ = sorted(k for k in first if first[k] != second[k])
    assert not differ, differ
