"""The README's command blocks run as written.

Every fenced block is `bash` or `text`. A `bash` block runs, in order, in a scratch folder that has the
repository's `pipelines/` and a `.venv/bin/activate` putting this interpreter's `alignpipe` first on PATH, with
huggingface_hub's cache filled by the tiny test model under the Hub id the README uses
(HuggingFaceTB/SmolLM2-135M-Instruct, which `make setup` fills with the real SmolLM2), on the CPU.
A block preceded by `<!-- readme-test: make-targets ... -->` names make targets: each must be a target of
the Makefile (they take minutes, or are this suite).
"""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<mark>[\w-]+)[^>]*-->\n)?^```(?P<lang>[\w-]*)\n(?P<body>.*?)^```",
                   re.DOTALL | re.MULTILINE)


def blocks() -> list[dict]:
    text = (ROOT / "README.md").read_text()
    return [{**m.groupdict(), "line": text[:m.start("body")].count("\n") + 1} for m in BLOCK.finditer(text)]


def test_every_block_is_bash_or_text_and_bash_is_checked():
    found = blocks()
    assert found, "no fenced blocks found in README.md"
    for b in found:
        assert b["lang"] in ("bash", "text"), f"README.md:{b['line']}: a block must be ```bash or ```text"
        assert b["mark"] in (None, "make-targets"), f"README.md:{b['line']}: unknown readme-test mark {b['mark']}"
        assert b["lang"] == "bash" or b["mark"] is None, f"README.md:{b['line']}: a mark on a text block"


def test_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w.-]+):", makefile, re.MULTILINE))
    for b in (b for b in blocks() if b["mark"] == "make-targets"):
        for line in b["body"].splitlines():
            words = line.split("#")[0].split()
            if words[:1] == ["make"]:
                named = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
                assert named and set(named) <= targets, f"README.md:{b['line']}: {line.strip()}: not in Makefile"


@pytest.fixture
def scratch(tmp_path, tiny_lm_dir) -> tuple[Path, dict]:
    from alignpipe.data import hub

    hub.put(tiny_lm_dir, SMOLLM2, cache=tmp_path / "hub")
    work = tmp_path / "work"
    (work / ".venv" / "bin").mkdir(parents=True)
    (work / "pipelines").symlink_to(ROOT / "pipelines")
    bin_ = work / ".venv" / "bin"
    (bin_ / "activate").write_text(f'export PATH="{bin_}:$PATH"\n')
    (bin_ / "alignpipe").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m alignpipe "$@"\n')
    (bin_ / "alignpipe").chmod(stat.S_IRWXU)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "PYTHONPATH": str(ROOT),
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "ALIGNPIPE_CACHE": str(tmp_path / "no-smollm")}
    env.pop("HF_HUB_OFFLINE", None)  # the README exports it itself
    return work, env


def test_bash_blocks_run_as_written(scratch):
    from alignpipe.data import hub

    work, env = scratch
    runnable = [b for b in blocks() if b["lang"] == "bash" and b["mark"] is None]
    assert runnable, "the README has no runnable bash block"
    for b in runnable:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", b["body"]], cwd=work, env=env, text=True,
                              capture_output=True, timeout=600, check=False)
        assert proc.returncode == 0, f"README.md:{b['line']} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    # the worked loop: two policies, the Hub id's commit recorded where it was used
    commit = (Path(env["HF_HUB_CACHE"]) / f"models--{SMOLLM2.replace('/', '--')}" / "refs" / "main").read_text()
    assert hub.snapshot_info(next((Path(env["HF_HUB_CACHE"])).rglob(commit))) == (SMOLLM2, commit)
    for k in (1, 2):
        assert (work / f"runs/my/iter-{k}/policy/manifest.json").is_file()
        assert (work / f"runs/rl/iter-{k}/policy/manifest.json").is_file()
    assert (work / "runs/rl/eval/2-vs-0/manifest.json").is_file()
    from alignpipe.data.io import read_input

    gens, _ = read_input(work / "runs/my/iter-1/generations", "generations", stage="test")
    assert set(gens["policy"]) == {SMOLLM2} and set(gens["policy_fingerprint"]) == {commit}
    manifest = json.loads((work / "runs/my/iter-1/batches/manifest.json").read_text())
    assert manifest["config"]["reference"] == SMOLLM2
