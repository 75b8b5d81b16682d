"""The RL recipe (pipelines/rl.mk) end to end on the tiny model: a full run; a SIGKILL anywhere then `make`
again finishes with the same manifests as an uninterrupted run (no finished stage redone), and a rerun of a
finished run does nothing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _make(run: Path, model: Path, *extra: str) -> list[str]:
    return ["make", "-s", "-f", "pipelines/rl.mk", "run", f"PY={sys.executable}", f"RUN={run}", f"MODEL={model}",
            "ITERS=2", "ANNOTATOR=length", "EVAL_ANNOTATOR=exact-answer", "PROMPTS_PER_ITER=4", "NUM_SAMPLES=4",
            "EVAL_PROMPTS=4", "EVAL_SAMPLES=2", "MAX_NEW_TOKENS=8", "LORA_R=4", "BATCH=8", *extra]


def _manifests(run: Path) -> dict[str, str]:
    out = {}
    for p in run.rglob("manifest.json"):
        if "part-" in str(p):
            continue
        m = json.loads(p.read_text())
        out[str(p.relative_to(run))] = m["finished_at"] + m["fingerprint"]
    return out


def _contents(run: Path) -> dict[str, object]:
    """What each stage wrote, independent of the run folder's path: dataset rows (the policy's path and its
    fingerprint, which hashes the run's manifest, left out), adapter weights rounded to 5 decimals."""
    from safetensors.torch import load_file

    from alignpipe.data.io import _load

    out = {}
    for m in sorted(run.rglob("manifest.json")):
        folder, name = m.parent, str(m.parent.relative_to(run))
        if "part-" in name or name.startswith(("report", "prompts")):
            continue
        if (folder / "adapter_model.safetensors").exists():
            out[name] = {k: [round(x, 5) for x in v.flatten().tolist()]
                         for k, v in load_file(folder / "adapter_model.safetensors").items()}
        elif (folder / "dataset_info.json").exists() or any(folder.glob("*.arrow")) or any(folder.glob("part-*")):
            ds = _load(folder)
            out[name] = ds.remove_columns([c for c in ds.column_names if c in ("policy", "policy_fingerprint")]).to_list()
    return out


@pytest.mark.parametrize("marker", ["iter-1/annotations", "iter-2/generations"])
def test_rl_recipe_killed_anywhere_then_resumed_equals_uninterrupted(tmp_path, tiny_lm_dir, marker):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = tmp_path / "run"
    proc = subprocess.Popen(_make(run, tiny_lm_dir), cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (run / marker / "manifest.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole make tree, mid-recipe
    proc.wait()
    before = _manifests(run)
    assert f"{marker}/manifest.json" in before and "report/summary.md" not in before

    done = subprocess.run(_make(run, tiny_lm_dir), cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    after = _manifests(run)
    assert all(after[k] == v for k, v in before.items()), "a finished stage was redone"
    assert (run / "iter-2/policy/adapter_config.json").exists() and not (run / "iter-0").exists()
    for k in range(3):
        assert (run / f"eval/policy-{k}/greedy-scores/manifest.json").exists()
    table = (run / "report/rl-table.md").read_text()
    assert table.count("\n| ") >= 3 and "greedy_accuracy" in table

    clean = tmp_path / "clean"
    whole = subprocess.run(_make(clean, tiny_lm_dir), cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert whole.returncode == 0, whole.stderr[-2000:]
    resumed, whole_run = _contents(run), _contents(clean)
    assert resumed.keys() == whole_run.keys() and len(resumed) >= 12
    for k in resumed:
        assert resumed[k] == whole_run[k], f"{k} differs between the resumed and the uninterrupted run"

    again = subprocess.run(_make(run, tiny_lm_dir), cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert again.returncode == 0 and _manifests(run) == after  # a finished run: nothing redone
