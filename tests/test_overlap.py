"""Overlapped iterations: the lag of the answers a train reads (how many policies before --policy sampled
them, from the manifests), `train --max-staleness`, and the recipes' OFF_POLICY=K (iteration K' samples with
policy K'-1-K; K = 0 is the sequential run, command for command; K = 1 runs under make -j2, its lags recorded,
and a kill then `make` again gives the same bytes as an uninterrupted K = 1 run)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import set_manifest
from test_identical_runs import RECIPES, outputs
from test_train import pairs, train, write_batches

from alignpipe.data.manifest import fingerprint
from alignpipe.training import staleness

ROOT = Path(__file__).resolve().parents[1]


def _folder(path: Path, **manifest) -> Path:
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def _chain(tmp: Path) -> dict[str, Path]:
    """policy 0 -> A -> B (train manifests), and answers sampled by A: generations -> annotations -> batches."""
    p0 = _folder(tmp / "p0", stage="import", fingerprint="fp0", inputs=[])
    a = _folder(tmp / "A", stage="train", fingerprint="fpA",
                inputs=[{"path": str(tmp / "b0"), "fingerprint": "x"}, {"path": str(p0), "fingerprint": "fp0"}])
    b = _folder(tmp / "B", stage="train", fingerprint="fpB",
                inputs=[{"path": str(tmp / "b1"), "fingerprint": "y"}, {"path": str(a), "fingerprint": "fpA"}])
    gen = _folder(tmp / "gen", stage="generate", fingerprint="g", num_rows=8,
                  inputs=[{"path": str(tmp / "prompts"), "fingerprint": "pr"}, {"path": str(a), "fingerprint": "fpA"}])
    ann = _folder(tmp / "ann", stage="annotate", fingerprint="an", inputs=[{"path": str(gen), "fingerprint": "g"}])
    bat = _folder(tmp / "bat", stage="build-batches", fingerprint="ba",
                  inputs=[{"path": str(ann), "fingerprint": "an"}, {"path": str(p0), "fingerprint": "fp0"}])
    return {"p0": p0, "A": a, "B": b, "batches": bat}


def test_the_lag_is_the_number_of_policies_between_the_sampler_and_the_trained_policy(tmp_path):
    c = _chain(tmp_path)
    assert staleness.policy_chain(c["B"]) == ["fpB", "fpA", "fp0"]
    assert staleness.lags(c["batches"], c["A"], 6) == {0: 6}  # on-policy
    assert staleness.lags(c["batches"], c["B"], 6) == {1: 6}  # one iteration behind (OFF_POLICY=1)
    assert staleness.lags(c["batches"], c["p0"], 6) == {None: 6}  # sampled by a descendant: unknown
    assert staleness.summary({1: 6, 0: 2, None: 1}) == {"0": 2, "1": 6, "unknown": 1}
    staleness.check({1: 6}, 1, c["batches"])
    staleness.check({None: 6}, None, c["batches"])  # no bound: anything goes
    from alignpipe.core.errors import UserError

    with pytest.raises(UserError, match=r"6 rows were sampled 1 policies before --policy \(lag 1 > --max-staleness 0\)"):
        staleness.check({1: 6}, 0, c["batches"])
    with pytest.raises(UserError, match="unknown lag"):
        staleness.check({None: 6, 0: 1}, 3, c["batches"])


def test_train_refuses_stale_answers_and_records_the_lag(tmp_path, tiny_lm_dir):
    """Answers sampled by policy 0 trained into policy 2 from policy 1: lag 1."""
    b0 = write_batches(tmp_path / "b0", "pairwise", pairs(4), tiny_lm_dir)
    assert train(b0, "--out", tmp_path / "p1", "--policy", tiny_lm_dir, "--loss", "dpo", "--lora-r", "4")[0] == 0
    gen = _folder(tmp_path / "gen", stage="generate", fingerprint="g", num_rows=4,
                  inputs=[{"path": str(tmp_path / "prompts"), "fingerprint": "pr"},
                          {"path": str(tiny_lm_dir), "fingerprint": fingerprint(tiny_lm_dir)}])
    b1 = write_batches(tmp_path / "b1", "pairwise", pairs(4, seed=1), tiny_lm_dir)
    set_manifest(b1, inputs=[{"path": str(gen), "fingerprint": "g"}])
    args = [b1, "--out", tmp_path / "p2", "--policy", tmp_path / "p1", "--loss", "dpo", "--continue-from",
            tmp_path / "p1"]
    code, out = train(*args, "--max-staleness", "0")
    lines = [x for x in out.splitlines() if x.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "4 rows were sampled 1 policies before --policy" in lines[0], out
    assert not (tmp_path / "p2").exists()
    code, out = train(*args, "--max-staleness", "1")
    assert code == 0, out
    report = json.loads((tmp_path / "p2" / "manifest.json").read_text())["report"]
    assert report["staleness"] == {"1": 4}
    code, out = train(*args, "--max-staleness", "2")  # the bound is not part of what the output is
    assert code == 0 and "up to date" in out, out


# ------------------------------------------------------------------------------------------ recipes
def _commands(name: str, *extra: str) -> list[str]:
    p = subprocess.run(["make", "-n", *RECIPES[name], "run", "PY=python", "RUN=/r", "MODEL=/m", "ITERS=3", *extra],
                       cwd=ROOT, capture_output=True, text=True, check=True)
    return p.stdout.splitlines()


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_off_policy_samples_iteration_k_with_policy_k_minus_1_minus_K(name):
    sequential, zero, one = _commands(name), _commands(name, "OFF_POLICY=0"), _commands(name, "OFF_POLICY=1")
    assert zero == sequential  # K = 0 is the sequential run, command for command
    sampler = {int(c.split("--iteration ")[1].split()[0]): c.split("--policy ")[1].split()[0]
               for c in one if "alignpipe generate " in c and "/eval/" not in c}
    trains = [c for c in one if "alignpipe train " in c and "/critic" not in c]
    first_policy = trains[0].split("--out ")[1].split()[0]
    assert [sampler[k] for k in sorted(sampler)] == ["/m", "/m", first_policy]
    assert len(trains) == 3 and all("--max-staleness 1" in c for c in trains)


def _make(name: str, run: Path, model: Path, *extra: str) -> list[str]:
    return ["make", "-s", "-j2", *RECIPES[name], "run", f"PY={sys.executable}", f"RUN={run}", f"MODEL={model}",
            "OFF_POLICY=1", *extra]


def test_rl_recipe_off_policy_1_under_make_j2_is_killed_then_resumed_to_the_same_bytes(tmp_path, tiny_lm_dir):
    """The uninterrupted run first, moved aside (rows name their policy by path), then the killed one."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = tmp_path / "run"
    whole = subprocess.run(_make("rl", run, tiny_lm_dir), cwd=ROOT, env=env, capture_output=True, text=True,
                           check=False)
    assert whole.returncode == 0, whole.stderr[-2000:]
    last = max(run.glob("iter-*/policy"))  # the second iteration: answers of policy 0, trained from 1
    report = json.loads((last / "manifest.json").read_text())["report"]
    assert list(report["staleness"]) == ["1"] and report["continued_from"]["global_step"] > 0
    page = (run / "report" / "report.html").read_text()
    assert "by lag" in page and "<th>lag 1</th>" in page and "<th>lag 0</th>" in page  # iteration 1: policy 0's own
    run.rename(tmp_path / "clean")
    proc = subprocess.Popen(_make("rl", run, tiny_lm_dir), cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while len(list(run.glob("iter-*/generations/manifest.json"))) < 2 and time.time() < deadline \
            and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole make tree, with two stages in flight
    proc.wait()
    done = subprocess.run(_make("rl", run, tiny_lm_dir), cwd=ROOT, env=env, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed, straight = outputs(run), outputs(tmp_path / "clean")
    assert resumed.keys() == straight.keys()
    differ = sorted(k for k in resumed if resumed[k] != straight[k])
    assert not differ, differ
