"""One run across iterations: K `train --continue-from` calls over batches B1..BK equal one `train` over
B1..BK in the same order (parameters within 1e-6 relative in float32 on CPU, every step's metrics equal apart
from timing and position-in-this-dataset keys), for full fine-tuning, LoRA, gradient accumulation, a group
(RL) loss, a pairwise loss and 2 processes under torchrun; a kill during an iteration, then a rerun, gives the
same parameters; the bad inputs of --continue-from are one line and exit 2.

Every part holds the same number of equal-weight stored batches of equal size, so the dataset weight rule's
D (total weight / steps per epoch) is the same for each part as for the whole.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import pairs, task_examples, train, write_batches

from alignpipe.training.metrics import TIMING_KEYS, read_metrics

ROOT = Path(__file__).resolve().parents[1]
LOCAL_KEYS = ("step", "epoch", "batch_index")  # positions within one train call's dataset
PARTS = 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Children run with one thread; so do the in-process runs, so that every float is computed alike."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write_parts(tmp: Path, task: str, examples: list[dict], tokenizer_dir, per_part: int,
                 count: int = PARTS) -> tuple[Path, list]:
    """The whole dataset and its `count` consecutive parts (batch_index from 0 in each), batches of 2."""
    whole = write_batches(tmp / "whole", task, examples, tokenizer_dir, batch_size=2)
    parts = [write_batches(tmp / f"b{k}", task, examples[k * per_part:(k + 1) * per_part], tokenizer_dir,
                           batch_size=2) for k in range(count)]
    return whole, parts


def _chain(tmp: Path, parts: list[Path], policy, common: list, runner=None) -> Path:
    """train over each part in turn, each continuing the previous policy's optimiser."""
    runner = runner or (lambda args: train(*args))
    prev = Path(policy)
    for k, part in enumerate(parts):
        out = tmp / f"p{k}"
        more = ["--continue-from", prev] if k else []
        code, text = runner([part, "--out", out, "--policy", prev, *common, *more])
        assert code == 0, text
        prev = out
    return prev


def _weights(folder: Path) -> dict:
    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(folder / name)


def _metrics(*folders: Path) -> list[dict]:
    rows = [r for f in folders for r in read_metrics(f / "metrics.jsonl")]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS + LOCAL_KEYS} for r in rows]


def assert_same_run(chained: list[Path], one: Path, one_parts: list[Path] | None = None) -> None:
    """The last of `chained` has the weights of `one`; the metrics of `chained` are those of `one_parts`
    (default: `one` alone)."""
    wa, wb = _weights(chained[-1]), _weights(one)
    assert set(wa) == set(wb)
    for k in wa:
        rel = float((wa[k] - wb[k]).norm() / wb[k].norm().clamp_min(1e-30))
        assert rel <= 1e-6, (k, rel)
    ma, mb = _metrics(*chained), _metrics(*(one_parts or [one]))
    assert len(ma) == len(mb) and [r["global_step"] for r in ma] == list(range(1, len(mb) + 1))
    assert ma == mb
    moved = [k for k in wb if not torch.equal(wb[k], _weights(chained[0])[k])]
    assert moved, "the later iterations trained nothing"


CASES = {  # name: (task, examples, loss options); 12 examples = 6 batches of 2, 2 per part (4 with accumulation)
    "full-sft": ("sft", task_examples("sft", 12), ["--loss", "sft"]),
    "lora-dpo": ("pairwise", pairs(12), ["--loss", "dpo", "--lora-r", "4"]),
    "grad-accum-sft": ("sft", task_examples("sft", 24), ["--loss", "sft", "--grad-accum", "2"]),
    "grpo": ("group", task_examples("group", 12), ["--loss", "grpo"]),
    "full-dpo": ("pairwise", pairs(12, seed=3), ["--loss", "dpo", "--reference", "stored"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_k_continued_trains_equal_one_train(case, tmp_path, tiny_lm_dir):
    task, examples, loss = CASES[case]
    kw = {}
    if "--reference" in loss:  # reference log-probs of policy 0, stored in the batches as build-batches does
        from alignpipe.models.loading import load_causal_lm

        kw["ref_model"] = load_causal_lm(tiny_lm_dir)
    per_part = len(examples) // PARTS
    whole = write_batches(tmp_path / "whole", task, examples, tiny_lm_dir, batch_size=2, **kw)
    parts = [write_batches(tmp_path / f"b{k}", task, examples[k * per_part:(k + 1) * per_part], tiny_lm_dir,
                           batch_size=2, **kw) for k in range(PARTS)]
    steps = len(examples) // 2 // (2 if "--grad-accum" in loss else 1)
    common = [*loss, "--lr", "1e-2", "--warmup-steps", "1", "--schedule-steps", steps, "--device", "cpu"]
    code, out = train(whole, "--out", tmp_path / "one", "--policy", tiny_lm_dir, *common)
    assert code == 0, out
    _chain(tmp_path, parts, tiny_lm_dir, common)
    assert_same_run([tmp_path / f"p{k}" for k in range(PARTS)], tmp_path / "one")
    state = json.loads((tmp_path / "p2" / "trainer_state" / "state.json").read_text())
    assert state["step"] == steps and state["settings"]["schedule_steps"] == steps
    report = json.loads((tmp_path / "p2" / "manifest.json").read_text())["report"]
    assert report["continued_from"] == {"path": str(tmp_path / "p1"), "global_step": 2 * steps // PARTS,
                                        "changed": {}}


# ------------------------------------------------------------------------------------ several processes
def _torchrun(args: list) -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]
    p = subprocess.run([*launcher, "-m", "alignpipe", "train", *map(str, args)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    return p.returncode, p.stderr


@pytest.mark.skipif(not (Path(sys.executable).parent / "torchrun").exists(), reason="torchrun not installed")
def test_two_processes_continued_equal_one_run_under_torchrun(tmp_path, tiny_lm_dir):
    whole, parts = _write_parts(tmp_path, "pairwise", pairs(8), tiny_lm_dir, per_part=4, count=2)
    common = ["--loss", "dpo", "--lora-r", "4", "--lr", "1e-2", "--schedule-steps", "4", "--device", "cpu",
              "--sharding", "none"]
    code, err = _torchrun([whole, "--out", tmp_path / "one", "--policy", tiny_lm_dir, *common])
    assert code == 0, err
    _chain(tmp_path, parts, tiny_lm_dir, common, runner=_torchrun)
    assert_same_run([tmp_path / "p0", tmp_path / "p1"], tmp_path / "one")
    saved = sorted(p.name for p in (tmp_path / "p1" / "trainer_state").iterdir())
    assert saved == ["optimizer.pt", "rng-0.pt", "rng-1.pt", "scheduler.pt", "state.json"]


# ------------------------------------------------------------------------------------------ a kill
def test_a_kill_during_an_iteration_then_a_rerun_equals_the_uninterrupted_run(tmp_path, tiny_lm_dir):
    _, parts = _write_parts(tmp_path, "sft", task_examples("sft", 24), tiny_lm_dir, per_part=8)
    common = ["--loss", "sft", "--lr", "1e-2", "--schedule-steps", "12", "--device", "cpu"]
    straight = _chain(tmp_path / "straight", parts, tiny_lm_dir, common)
    # iteration 2 (of 3) killed after its first checkpoint, then the chain run again from the start
    (tmp_path / "k").mkdir()
    _chain(tmp_path / "k", parts[:1], tiny_lm_dir, common)
    args = [parts[1], "--out", tmp_path / "k" / "p1", "--policy", tmp_path / "k" / "p0", "--continue-from",
            tmp_path / "k" / "p0", *common, "--save-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "alignpipe", "train", *map(str, args)], env=env,
                            stderr=subprocess.DEVNULL)
    partial, deadline = tmp_path / "k" / ".p1.partial", time.time() + 120
    while not list(partial.glob("checkpoint-00000[12]")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "k" / "p1").exists()
    code, out = train(*args)  # resumes inside the continued iteration
    assert code == 0 and "resuming after step" in out, out
    killed = _chain(tmp_path / "k", parts, tiny_lm_dir, common)  # p0, p1 up to date; p2 trains
    assert_same_run([tmp_path / "k" / f"p{k}" for k in range(PARTS)], straight,
                    [tmp_path / "straight" / f"p{k}" for k in range(PARTS)])
    assert killed == tmp_path / "k" / "p2"


# ------------------------------------------------------------------------------ settings and bad inputs
def test_changed_settings_are_said_and_recorded_and_apply_from_the_next_step(tmp_path, tiny_lm_dir):
    _, parts = _write_parts(tmp_path, "sft", task_examples("sft", 12), tiny_lm_dir, per_part=4)
    code, out = train(parts[0], "--out", tmp_path / "p0", "--policy", tiny_lm_dir, "--loss", "sft", "--lr", "1e-2",
                      "--scheduler", "constant")
    assert code == 0, out
    code, out = train(parts[1], "--out", tmp_path / "p1", "--policy", tmp_path / "p0", "--continue-from",
                      tmp_path / "p0", "--loss", "sft", "--lr", "5e-3", "--adam-beta2", "0.99", "--scheduler",
                      "constant")
    assert code == 0, out
    said = [x for x in out.splitlines() if "optimiser settings changed" in x]
    assert len(said) == 1 and "lr 0.01 -> 0.005" in said[0] and "betas [0.9, 0.999] -> [0.9, 0.99]" in said[0]
    assert "schedule_steps 2 -> 4" in said[0]
    changed = json.loads((tmp_path / "p1" / "manifest.json").read_text())["report"]["continued_from"]["changed"]
    assert changed["lr"] == [0.01, 0.005] and changed["betas"] == [[0.9, 0.999], [0.9, 0.99]]
    rows = read_metrics(tmp_path / "p1" / "metrics.jsonl")
    assert [r["lr"] for r in rows] == [0.005, 0.005] and [r["global_step"] for r in rows] == [3, 4]
    from alignpipe.training.checkpoint import _torch_load

    groups = _torch_load(tmp_path / "p1" / "trainer_state", "optimizer.pt")["param_groups"]
    assert all(tuple(g["betas"]) == (0.9, 0.99) and g["lr"] == 0.005 for g in groups)


def _error(code: int, out: str) -> str:
    lines = [x for x in out.splitlines() if x.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in out, out
    return lines[0]


def test_bad_continuations_are_one_line_and_exit_2(tmp_path, tiny_lm_dir):
    _, parts = _write_parts(tmp_path, "pairwise", pairs(12), tiny_lm_dir, per_part=4)
    base = ["--loss", "dpo", "--lr", "1e-2"]
    assert train(parts[0], "--out", tmp_path / "lora", "--policy", tiny_lm_dir, *base, "--lora-r", "4")[0] == 0
    assert train(parts[0], "--out", tmp_path / "full", "--policy", tiny_lm_dir, *base)[0] == 0
    assert train(parts[0], "--out", tmp_path / "merged", "--policy", tiny_lm_dir, *base, "--lora-r", "4",
                 "--merge")[0] == 0
    assert not (tmp_path / "merged" / "trainer_state").exists()

    def attempt(prev, *more, policy=None):
        return _error(*train(parts[1], "--out", tmp_path / "next", "--policy", policy or prev, *base,
                             "--continue-from", prev, *more))

    assert "has no trainer_state/" in attempt(tmp_path / "merged")
    assert "has no trainer_state/" in attempt(tiny_lm_dir)
    assert "no such policy folder" in attempt(tmp_path / "nowhere", policy=tiny_lm_dir)
    line = attempt(tmp_path / "lora", "--lora-r", "8", policy=tiny_lm_dir)  # another LoRA shape
    assert "other trainable parameters" in line and "[4," in line and "[8," in line
    assert "other trainable parameters" in attempt(tmp_path / "lora", policy=tiny_lm_dir)  # full vs LoRA
    assert "--schedule-steps 3: shorter than the run (2 steps before" in attempt(tmp_path / "full",
                                                                                 "--schedule-steps", "3")
    state = tmp_path / "full" / "trainer_state"
    shutil.copy(state / "optimizer.pt", tmp_path / "optimizer.pt")
    data = (state / "optimizer.pt").read_bytes()
    (state / "optimizer.pt").write_bytes(data[: len(data) // 2])
    line = attempt(tmp_path / "full")
    assert "optimizer.pt is truncated" in line and str(state) in line and "--continue-from" in line
    (state / "state.json").unlink()
    assert "has no state.json" in attempt(tmp_path / "full")
    assert not (tmp_path / "next").exists()
