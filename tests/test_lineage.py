"""alignpipe lineage: the chain of manifests of an output back to its sources, as text and JSON; recorded
command lines rerun from the recorded directory (and find the output up to date); secrets never in argv."""
from __future__ import annotations

import itertools
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from helpers import child_env, cli, manifest, ok, run_child, write_jsonl
from report_fixtures import make_run

from alignpipe.core.secrets import register_secret, scrub_argv
from alignpipe.data.lineage import lineage, sources, stages
from alignpipe.data.manifest import command_argv


def test_chain_of_a_policy_back_to_import(tmp_path):
    run = make_run(tmp_path / "run", iters=2, prompts=3, payload=False)
    nodes = lineage(run / "iter-2" / "policy")
    assert nodes[0].path == str(run / "iter-2" / "policy") and nodes[0].stage == "train"
    assert stages(nodes) == ["train", "reweight", "annotate", "generate", "import"]
    assert {n.path for n in nodes} >= {str(run / "iter-1" / "policy"), str(run / "prompts")}
    assert len({n.path for n in nodes}) == len(nodes)  # each output once (prompts feed both iterations)
    assert all(i.status in ("ok", "source") for n in nodes for i in n.inputs)
    assert {Path(i.path).name for i in sources(nodes)} == {"prompts.jsonl", "model"}
    for n in nodes:
        assert n.rerun.startswith(f"cd {shlex.quote(os.getcwd())} && alignpipe {n.stage} ")
        assert n.seconds is not None and n.started_at and n.fingerprint
    weighted = next(n for n in nodes if n.stage == "reweight")
    assert weighted.num_rows == 2 and weighted.config == {"strategy": ["confidence"]} and weighted.depth == 1


def test_lineage_command_text_json_and_changed_inputs(tmp_path):
    run = make_run(tmp_path / "run", iters=1, prompts=3, payload=False)
    as_json = json.loads(ok("lineage", run / "iter-1" / "weighted", "--json").stdout)
    assert [n["stage"] for n in as_json] == ["reweight", "annotate", "generate", "import"]
    assert as_json[0]["inputs"][0] == {"path": str(run / "iter-1" / "annotations"),
                                       "resolved": str(run / "iter-1" / "annotations"),
                                       "fingerprint": manifest(run / "iter-1" / "annotations")["fingerprint"],
                                       "status": "ok"}
    out = ok("lineage", run / "iter-1" / "policy").stdout
    assert "[train]" in out and "rerun: cd " in out and "alignpipe import" in out and "(source)" in out
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "changed since"}\n')
    assert "(changed)" in ok("lineage", run / "prompts").stdout
    r = cli("lineage", tmp_path / "nowhere")
    assert r.exit_code == 2 and "no such file or folder" in r.output
    r = cli("lineage", tmp_path)
    assert r.exit_code == 2 and "no manifest.json" in r.output


def test_recorded_commands_rerun_from_their_directory(tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}
                                                  for i in range(4)])
    for args in (["import", data, "--out", tmp_path / "data"],
                 ["reweight", tmp_path / "data", "--strategy", "constant", "--out", tmp_path / "weighted"]):
        done = run_child(args)
        assert done.returncode == 0, done.stderr
    before = {p: manifest(tmp_path / p) for p in ("data", "weighted")}
    nodes = lineage(tmp_path / "weighted")
    assert [n.stage for n in nodes] == ["reweight", "import"]
    assert nodes[0].command == shlex.join(["alignpipe", "reweight", str(tmp_path / "data"), "--strategy", "constant",
                                           "--out", str(tmp_path / "weighted")])
    env = child_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for n in nodes:  # the recorded line, as is, in a shell: the output is up to date, nothing rewritten
        again = subprocess.run(["bash", "-c", n.rerun], env=env, capture_output=True, text=True, timeout=240,
                               check=False)
        assert again.returncode == 0 and "up to date" in again.stderr, again.stderr
    assert {p: manifest(tmp_path / p) for p in ("data", "weighted")} == before


def test_secrets_never_reach_the_recorded_command(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-1234567890")
    register_secret("registered-secret-value")
    argv = ["alignpipe", "annotate", "in", "--annotator", "http:http://h/v1,model=m,api_key=abc123,key_env=MY_KEY",
            "--api-key", "plain", "--hf-token=hf_abcdefghijklmnopqrstu", "--key-env", "OPENAI_API_KEY",
            "sk-proj-abcdefghijklmnopqrstuvwx", "tok-1234567890", "x=registered-secret-value", "--out", "o"]
    clean = scrub_argv(argv)
    assert clean == ["alignpipe", "annotate", "in", "--annotator", "http:http://h/v1,model=m,api_key=***,key_env=MY_KEY",
                     "--api-key", "***", "--hf-token=***", "--key-env", "OPENAI_API_KEY", "***", "***", "x=***",
                     "--out", "o"]
    assert command_argv(["/venv/bin/alignpipe", "train", "a b"]) == ["alignpipe", "train", "a b"]
    assert command_argv(["/x/alignpipe/__main__.py", "report", "r"]) == ["alignpipe", "report", "r"]


def _header(lines: list[str], path: Path) -> int:
    """The index of the one line that writes out `path` (its other mentions are references)."""
    found = [i for i, line in enumerate(lines) if line.lstrip().removeprefix("<- ").startswith(f"{path}  [")
             and "(written out" not in line and "  ..." not in line]
    assert len(found) == 1, (path, found)
    return found[0]


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _last_evaluation(run: Path) -> Path:
    """The evaluate output with the longest chain behind it (the last policy's), whatever the run's layout."""
    outs = [m.parent for m in run.rglob("manifest.json") if manifest(m.parent).get("stage") == "evaluate"]
    return max(outs, key=lambda p: len(lineage(p)))


def test_lineage_text_is_a_tree_of_whose_input_each_output_is_each_written_once(tmp_path):
    target = _last_evaluation(make_run(tmp_path / "run", iters=6, prompts=3, payload=False))
    nodes = lineage(target)
    lines = ok("lineage", target).stdout.splitlines()
    at = {n.path: _header(lines, Path(n.path)) for n in nodes}  # every output written out exactly once
    for n in nodes[1:]:  # each one under an output whose input it is: the nearest shallower header above it
        parent = next(lines[i] for i in range(at[n.path] - 1, -1, -1)
                      if _indent(lines[i]) < _indent(lines[at[n.path]]) and "rerun:" not in lines[i])
        parent_path = parent.lstrip().removeprefix("<- ").split("  [")[0]
        assert n.path in {i.resolved for m in nodes if m.path == parent_path for i in m.inputs}, (n.path, parent)
    # a chain of iterations nests one level per iteration: each policy right under the one trained from it
    policies = sorted(_indent(lines[at[n.path]]) for n in nodes if n.stage == "train")
    assert len(policies) == 6 and {b - a for a, b in itertools.pairwise(policies)} == {3}
    assert sum("(written out above)" in line for line in lines) >= 6  # the prompts feed every generate
    assert len(lines) < 2 * len(nodes) + 20  # was 155 lines for these 28 outputs
    assert lines[2].startswith("   config: ") and sum("config: " in line for line in lines) == 1


def test_lineage_depth_limits_text_and_json(tmp_path):
    target = _last_evaluation(make_run(tmp_path / "run", iters=2, prompts=3, payload=False))
    nodes = lineage(target)
    lines = ok("lineage", target, "--depth", "1").stdout.splitlines()
    written = [line.split("  [")[0].removeprefix("   <- ") for line in lines
               if line.startswith(("   <- ", str(target))) and "(source)" not in line and "  ..." not in line]
    assert written == [n.path for n in nodes if n.depth <= 1]
    assert all(_indent(line) <= 6 for line in lines[:-1])
    hidden = {n.path for n in nodes if n.depth == 2}
    assert lines[-1].startswith(f"({len(hidden)} output(s) not written out below depth 1: --depth N for more")
    assert len(ok("lineage", target, "--depth", "0").stdout.splitlines()) == 3 + len(nodes[0].inputs) + 1
    as_json = json.loads(ok("lineage", target, "--depth", "1", "--json").stdout)
    assert [n["path"] for n in as_json] == [n.path for n in nodes if n.depth <= 1]
    bad = cli("lineage", target, "--depth", "-1")
    assert bad.exit_code == 2 and "Traceback" not in bad.output
