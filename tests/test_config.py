"""One config file for a whole loop: `--config FILE.yaml` holds one section per command (`generate:`,
`annotate:`, `build-batches:`, `train:` ...); each command reads its own, a flat file (keys = option names)
still works, flags win; the recipes pass CONFIG= to every stage, and pipelines/configs/rl-demo.yaml gives
every stage of rl.mk's demo exactly the options the demo's defaults give it."""
from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest
from helpers import cli, pair, rows_of, write_dataset, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
LOOP = """\
import:
  split: test
reweight:
  strategy: ['abs-margin:clip=2']
  normalize: mean
build_batches:
  batch-size: 4
train:
  lr: 0.1
  scheduler: constant
"""


def _config(tmp_path, text: str) -> Path:
    path = tmp_path / "loop.yaml"
    path.write_text(text)
    return path


def test_each_command_reads_its_own_section_and_flags_win(tmp_path):
    cfg = _config(tmp_path, LOOP)
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    assert cli("import", src, "--out", tmp_path / "i", "--config", cfg).exit_code == 0
    assert [r["split"] for r in rows_of(tmp_path / "i")] == ["test"]
    assert cli("import", src, "--out", tmp_path / "j", "--config", cfg, "--split", "dev").exit_code == 0
    assert [r["split"] for r in rows_of(tmp_path / "j")] == ["dev"]
    rows = [pair(prompt_id=f"p{i}", response1_reward=r, response2_reward=0.0) for i, r in enumerate((1.0, 3.0))]
    ann = write_dataset(tmp_path / "ann", "annotations", rows)
    result = cli("reweight", ann, "--out", tmp_path / "w", "--config", cfg)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "w" / "manifest.json").read_text())["config"]
    assert config["strategy"] == ["abs-margin:clip=2"] and config["normalize"] == "mean"
    # abs-margin 1 and 2 (3 clipped to 2), normalised to mean 1
    assert [r["response1_weight"] for r in rows_of(tmp_path / "w")] == pytest.approx([2 / 3, 4 / 3])


def test_a_command_without_a_section_keeps_its_defaults(tmp_path):
    cfg = _config(tmp_path, "train:\n  lr: 0.1\n")
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    assert cli("import", src, "--out", tmp_path / "i", "--config", cfg).exit_code == 0
    assert [r["split"] for r in rows_of(tmp_path / "i")] == ["train"]


@pytest.mark.parametrize("text, needle", [
    ("trian:\n  lr: 0.1\n", "unknown section 'trian' (known: "),
    ("import:\n  split: test\ntrain:\n  lrr: 0.1\n", "section 'train': unknown key 'lrr' (known: "),
    ("split: test\ntrain:\n  lr: 0.1\n", "'split' is an option value beside command sections"),
    ("import:\n  split: [a, b]\n", "key 'split' must be a single value"),
])
def test_sectioned_config_errors_are_one_line_and_write_nothing(tmp_path, text, needle):
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    result = cli("import", src, "--out", tmp_path / "i", "--config", _config(tmp_path, text))
    assert result.exit_code == 2 and needle in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "i").exists()


def _stage_lines(*variables: str, recipe: str = "rl.mk run") -> list[list[str]]:
    mk, target = recipe.split()
    out = subprocess.run(["make", "-n", "-f", f"pipelines/{mk}", target, "MODEL=m",
                          "DATA=pipelines/data/prompts.jsonl", *variables],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    lines = [shlex.split(line) for line in out.replace("\\\n", " ").splitlines()]
    return [args[args.index("alignpipe") + 1:] for args in lines if "alignpipe" in args]


def _resolved(args: list[str]) -> dict:
    """What the command would run with: its options after config file and flags (click's own parsing)."""
    from typer.main import get_command

    from alignpipe.cli import app
    from alignpipe.core.command import resolved_config

    group = get_command(app)
    root = group.make_context("alignpipe", list(args))
    with group.commands[args[0]].make_context(args[0], list(args[1:]), parent=root) as ctx:
        return {**resolved_config(ctx, drop=("force", "config")), "inputs": ctx.params.get("inputs")}


def test_rl_recipe_passes_config_to_every_stage_and_the_demo_config_is_the_demo():
    plain, configured = _stage_lines(), _stage_lines("CONFIG=pipelines/configs/rl-demo.yaml")
    stages = [a for a in configured if a[0] != "report"]
    assert len(stages) > 10 and all("--config" in a for a in stages)
    assert not any("--lr" in a or "--num-samples" in a for a in configured if a[0] in ("train", "build-batches"))
    assert [a[0] for a in plain] == [a[0] for a in configured]
    for before, after in zip(plain, configured):
        assert _resolved(before) == _resolved(after), before
    overridden = _stage_lines("CONFIG=pipelines/configs/rl-demo.yaml", "LR=0.1", "EVAL_ANNOTATOR=length")
    train = [_resolved(a) for a in overridden if a[0] == "train"]
    assert {t["lr"] for t in train} == {0.1} and {t["loss"] for t in train} == {"grpo"}
    assert {tuple(_resolved(a)["annotator"]) for a in overridden if a[0] == "evaluate"} == {("length",)}


@pytest.mark.parametrize("recipe", ["online.mk run", "offline.mk dpo", "offline.mk kto", "offline.mk sft"])
def test_every_recipe_passes_config_to_every_stage_and_its_defaults_give_way(recipe):
    plain, configured = _stage_lines(recipe=recipe), _stage_lines("CONFIG=c.yaml", "BETA=0.2", recipe=recipe)
    assert [a[0] for a in plain] == [a[0] for a in configured]
    assert all("--config" in a for a in configured if a[0] != "report")
    assert any("--lr" in a for a in plain) and not any("--lr" in a for a in configured)
    assert all("--beta" in a and "0.2" in a for a in configured if a[0] == "train" and "sft" not in a)
