"""The online recipe end to end on the tiny model: a full run, a SIGKILL anywhere then `make` again
finishes without redoing finished stages, and a rerun of a finished run does nothing. The run ends with
report.html, and `alignpipe lineage` on its last policy names every stage back to `import` with command lines
that rerun from the recorded directory."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _make(run: Path, model: Path, *extra: str) -> list[str]:
    return ["make", "-s", "-f", "pipelines/online.mk", "run", f"PY={sys.executable}", f"RUN={run}",
            f"MODEL={model}", "ITERS=2", "ANNOTATOR=length", "PROMPTS_PER_ITER=8", "EVAL_PROMPTS=4",
            "MAX_NEW_TOKENS=8", "LORA_R=4", "EPOCHS=1", "BATCH=4", *extra]


def _manifests(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): json.loads(p.read_text())["finished_at"] + json.loads(p.read_text())["fingerprint"]
            for p in run.rglob("manifest.json") if "part-" not in str(p)}


def test_online_recipe_killed_then_resumed_redoes_nothing_finished(tmp_path, tiny_lm_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = tmp_path / "run"
    proc = subprocess.Popen(_make(run, tiny_lm_dir), cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = run / "iter-1" / "weighted" / "manifest.json"
    deadline = time.time() + 600
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole make tree, mid-pipeline
    proc.wait()
    before = _manifests(run)
    assert "iter-1/weighted/manifest.json" in before and not (run / "report" / "report.html").exists()

    done = subprocess.run(_make(run, tiny_lm_dir), cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    after = _manifests(run)
    assert all(after[k] == v for k, v in before.items()), "a finished stage was redone"
    for k in range(3):
        assert (run / f"eval/policy-{k}/scores/manifest.json").exists()
    assert (run / "iter-2/policy/adapter_config.json").exists() and not (run / "iter-0").exists()
    summary = json.loads((run / "report/summary.json").read_text())
    assert [r["policy"] for r in summary] == [0, 1, 2] and summary[1]["train_loss"] is not None
    assert (run / "report/report.png").stat().st_size > 10_000
    html = (run / "report/report.html").read_text()
    assert "<script" not in html and "Answers on held-out prompts" in html and "policy 2:" in html
    _check_lineage(run, env)

    again = subprocess.run(_make(run, tiny_lm_dir), cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert again.returncode == 0 and _manifests(run) == after  # a finished run: nothing redone


def _check_lineage(run: Path, env: dict) -> None:
    lineage = subprocess.run([sys.executable, "-m", "alignpipe", "lineage", str(run / "iter-2/policy"), "--json"],
                             cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert lineage.returncode == 0, lineage.stderr
    nodes = json.loads(lineage.stdout)
    assert nodes[0]["stage"] == "train"
    assert {n["stage"] for n in nodes} == {"train", "build-batches", "reweight", "annotate", "generate", "import"}
    assert all(i["status"] in ("ok", "source") for n in nodes for i in n["inputs"])
    for n in nodes:  # rerunnable: `cd CWD && alignpipe STAGE ...`, nothing hidden that is not a secret
        assert n["rerun"].startswith(f"cd {ROOT} && alignpipe {n['stage']} ") and "***" not in n["rerun"]
    imp = next(n for n in nodes if n["stage"] == "import")
    again = subprocess.run(["bash", "-c", imp["rerun"].replace("&& alignpipe", f"&& {sys.executable} -m alignpipe")],
                           env=env, capture_output=True, text=True, check=False)
    assert again.returncode == 0 and "up to date" in again.stderr, again.stderr
