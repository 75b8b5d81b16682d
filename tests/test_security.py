"""Secure defaults: no code runs unless the user names it, no secret is written or printed, and nothing from
the data becomes a path.

- a model folder with custom code (auto_map) runs it only under --trust-remote-code; every other command
  refuses it cleanly without running it;
- pickle weights are refused unless --allow-pickle, and even then (and in checkpoints) they are read by the
  weights-only unpickler, so a malicious pickle runs nothing;
- an API key (from the variable named by key_env=) never reaches an output, a partial folder, the cache, the
  terminal or a --debug traceback, even from an endpoint that echoes it back;
- user code only from an explicit `function:MODULE:FN`; config files are parsed with yaml.safe_load;
  chat templates run in Jinja's sandbox;
- ids from the data never become paths: hostile prompt_ids through the whole recipe create nothing outside
  the output folders.
Each "would run code" fixture creates a marker file when it runs; the tests assert the marker never appears
(and appears when the user does ask for the code, so the fixture is known to be armed).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import (
    GENERATIONS,
    JudgeServer,
    assert_clean_failure,
    cli,
    ok,
    pair,
    prompt,
    rows_of,
    run_child,
    run_killed,
    text_files,
    weighted,
    write_dataset,
    write_jsonl,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_lm_dir):
    d = tmp_path_factory.mktemp("valid")
    paths = {
        "prompts": write_dataset(d / "prompts", "prompts", [prompt(i) for i in range(2)]),
        "generations": write_dataset(d / "generations", "generations", GENERATIONS),
        "annotations": write_dataset(d / "annotations", "annotations", [pair(i) for i in range(2)]),
        "weighted": write_dataset(d / "weighted", "weighted", [weighted(i) for i in range(4)]),
    }
    paths["batches"] = d / "batches"
    ok("build-batches", paths["weighted"], "--task", "pairwise", "--tokenizer", tiny_lm_dir, "--batch-size", 2,
       "--out", paths["batches"])
    return paths


def armed_module(marker: Path, body: str = "") -> str:
    """Python source that creates `marker` when imported."""
    return f"from pathlib import Path\nPath({str(marker)!r}).write_text('code ran')\n{body}"


# ------------------------------------------------------------------------------------ remote code
_CUSTOM = """
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


class CustomConfig(LlamaConfig):
    model_type = "custom-llama"


class CustomModel(LlamaForCausalLM):
    config_class = CustomConfig


class CustomTokenizer(PreTrainedTokenizerFast):
    pass
"""


def custom_code_model(folder: Path, lm: Path, marker: Path, model_type: str = "custom-llama") -> Path:
    """The tiny LM with its classes in the folder's own custom_model.py (config.json auto_map)."""
    shutil.copytree(lm, folder)
    (folder / "custom_model.py").write_text(armed_module(marker, _CUSTOM))
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type=model_type, architectures=["CustomModel"],
               auto_map={"AutoConfig": "custom_model.CustomConfig",
                         "AutoModelForCausalLM": "custom_model.CustomModel"})
    (folder / "config.json").write_text(json.dumps(cfg))
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": [None, "custom_model.CustomTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    return folder


def test_custom_code_in_a_model_folder_runs_only_with_trust_remote_code(data, tmp_path, tiny_lm_dir):
    marker = tmp_path / "MARKER"
    custom = custom_code_model(tmp_path / "custom", tiny_lm_dir, marker)
    gen = ["generate", data["prompts"], "--num-samples", 1, "--max-new-tokens", 3, "--device", "cpu"]
    refusals = {
        "generate": [*gen, "--policy", custom],
        "reward-model": ["annotate", data["generations"], "-a", f"reward-model:{custom}"],
        "pairwise-judge": ["annotate", data["generations"], "-a", f"pairwise-judge:{custom}"],
        "importance": ["reweight", data["annotations"], "-s", f"importance:policy={custom}", "--device", "cpu"],
        "reference": ["build-batches", data["weighted"], "--tokenizer", tiny_lm_dir, "--reference", custom,
                      "--device", "cpu"],
        "train": ["train", data["batches"], "--policy", custom, "--loss", "dpo", "--device", "cpu"],
    }
    for name, args in refusals.items():
        out = tmp_path / f"out-{name}"
        line = assert_clean_failure(cli(*args, "--out", out), out)
        assert "contains custom code" in line and str(custom) in line, (name, line)
        assert not marker.exists(), f"{name} ran the folder's code without --trust-remote-code"
    ok(*gen, "--policy", custom, "--trust-remote-code", "--out", tmp_path / "trusted")
    assert marker.read_text() == "code ran"  # the fixture is armed: asked for, the code runs


def test_auto_map_on_a_known_architecture_is_ignored_without_the_flag(data, tmp_path, tiny_lm_dir):
    marker = tmp_path / "MARKER"
    custom = custom_code_model(tmp_path / "custom", tiny_lm_dir, marker, model_type="llama")
    ok("generate", data["prompts"], "--policy", custom, "--num-samples", 1, "--max-new-tokens", 3, "--device",
       "cpu", "--out", tmp_path / "g")
    ok("build-batches", data["weighted"], "--tokenizer", custom, "--out", tmp_path / "b")
    assert not marker.exists() and len(rows_of(tmp_path / "g")) == 2  # the built-in Llama classes ran


# ------------------------------------------------------------------------------------------ pickle
class _Armed:
    """Unpickling this calls exec, creating the marker (what a malicious .bin does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def _pickle_model(folder: Path, lm: Path, weights) -> Path:
    import torch

    shutil.copytree(lm, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(weights, folder / "pytorch_model.bin")
    return folder


def test_pickle_weights_need_allow_pickle_and_never_run_code(data, tmp_path, tiny_lm_dir):
    from safetensors.torch import load_file

    marker = tmp_path / "MARKER"
    hostile = _pickle_model(tmp_path / "hostile", tiny_lm_dir, {"model.embed_tokens.weight": _Armed(marker)})
    gen = ["generate", data["prompts"], "--num-samples", 1, "--max-new-tokens", 3, "--device", "cpu"]
    line = assert_clean_failure(cli(*gen, "--policy", hostile, "--out", tmp_path / "a"), tmp_path / "a")
    assert "only pickle weights (*.bin)" in line and "--allow-pickle" in line
    line = assert_clean_failure(cli(*gen, "--policy", hostile, "--allow-pickle", "--out", tmp_path / "b"),
                                tmp_path / "b")
    assert f"policy {hostile}: cannot load (UnpicklingError: Weights only load failed" in line
    assert not marker.exists()
    benign = _pickle_model(tmp_path / "benign", tiny_lm_dir, load_file(str(tiny_lm_dir / "model.safetensors")))
    ok(*gen, "--policy", benign, "--allow-pickle", "--out", tmp_path / "c")  # the flag does allow them
    assert len(rows_of(tmp_path / "c")) == 2


def test_a_hostile_pickle_in_a_checkpoint_runs_nothing(data, tmp_path, tiny_lm_dir):
    """train resumes with torch.load(weights_only=True): a checkpoint file swapped for a hostile pickle (sizes
    in state.json updated to match) is refused naming it."""
    import torch

    marker = tmp_path / "MARKER"
    args = ["train", data["batches"], "--policy", tiny_lm_dir, "--loss", "dpo", "--device", "cpu", "--lr", "1e30",
            "--max-grad-norm", "0", "--save-every", 1, "--scheduler", "constant", "--out", tmp_path / "p"]
    assert cli(*args).exit_code == 1  # diverges at step 2, keeping checkpoint-000001 to resume from
    ckpt = tmp_path / ".p.partial" / "checkpoint-000001"
    torch.save({"state": _Armed(marker)}, ckpt / "optimizer.pt")
    state = json.loads((ckpt / "state.json").read_text())
    state["files"]["optimizer.pt"] = (ckpt / "optimizer.pt").stat().st_size
    (ckpt / "state.json").write_text(json.dumps(state))
    line = assert_clean_failure(cli(*args), tmp_path / "p", allow=(".p.partial",))
    assert f"checkpoint {ckpt}: cannot read optimizer.pt (UnpicklingError" in line
    assert not marker.exists()


# ----------------------------------------------------------------------------------------- secrets
SECRETS = {"ALIGNPIPE_TEST_API_KEY": "sk-secret-123456", "MY_JUDGE": "jk-other-654321-abcdef"}


@pytest.fixture
def server():
    s = JudgeServer()
    yield s
    s.close()


def test_api_keys_never_reach_a_file_the_terminal_or_a_traceback(data, tmp_path, server, monkeypatch):
    """Two keys: one in a variable whose name looks secret, one in a plain name (only key_env= says it is a
    key). The endpoint echoes the Authorization header in its replies and in its status line."""
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    cache = tmp_path / "cache"
    printed = []

    def annotate(out: str, mode: str, key_env: str, *extra, code: int = 0):
        server.mode = mode
        args = ["annotate", data["generations"], "-a", server.spec(key_env=key_env), "--cache-dir", cache / out,
                *extra, "--out", tmp_path / out]
        result = cli(*args)
        printed.append(result.output)
        assert result.exit_code == code, result.output
        return args

    annotate("echo-a", "echo", "ALIGNPIPE_TEST_API_KEY")
    annotate("echo-b", "echo", "MY_JUDGE")
    annotate("failing", "500", "MY_JUDGE")
    annotate("refused", "echo-status", "MY_JUDGE", code=2)
    assert "HTTP 401 Unauthorized: Bearer ***" in printed[-1]
    reasons = [r["raw"][0]["reason"] for r in rows_of(tmp_path / "echo-b")]
    assert reasons == ["unparseable verdict 'bad key Bearer ***'"] * 2  # the reason is kept, the key is not
    # a --debug traceback, and a run killed with finished shards in its partial folder
    env = {k: v for k, v in SECRETS.items()}
    args = ["annotate", data["generations"], "-a", server.spec(key_env="MY_JUDGE")]
    debug = run_child(["--debug", *args, "--cache-dir", cache / "debug", "--out", tmp_path / "debug"], **env)
    assert debug.returncode == 1 and "Traceback" in debug.stderr  # (the status is echo-status: a UserError)
    printed += [debug.stdout, debug.stderr]
    server.mode = "echo"
    killed = run_killed([*args, "--shard-size", 1, "--cache-dir", cache / "killed", "--out", tmp_path / "killed"],
                        "after:shard-*:1")
    printed += [killed.stdout, killed.stderr]
    assert (tmp_path / ".killed.partial" / "shard-00000").is_dir()
    assert server.auth >= {f"Bearer {v}" for v in SECRETS.values()}  # the keys were in play
    files = list(text_files(tmp_path))
    assert any(f.name == "cache.jsonl" for f in files) and any(f.suffix == ".arrow" for f in files)
    for secret in SECRETS.values():
        for text in printed:
            assert secret not in text
        for f in files:
            assert secret.encode() not in f.read_bytes(), f


# ------------------------------------------------------------------------------------ user code
def test_user_code_runs_only_when_named(data, tmp_path, monkeypatch, tiny_lm_dir):
    marker = tmp_path / "MARKER"
    (tmp_path / "user_rewards.py").write_text(armed_module(marker, "def score(prompt, response):\n    return 1.0\n"))
    monkeypatch.chdir(tmp_path)  # the module sits in the working directory, importable
    ok("annotate", data["generations"], "-a", "length", "--out", tmp_path / "a")
    ok("reweight", data["annotations"], "-s", "constant", "--out", tmp_path / "w")
    ok("build-batches", data["weighted"], "--tokenizer", tiny_lm_dir, "--out", tmp_path / "b")
    (tmp_path / "c.yaml").write_text(f"split: !!python/object/apply:os.system ['touch {marker}']\n")
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    bad = cli("import", src, "--config", tmp_path / "c.yaml", "--out", tmp_path / "i")
    assert bad.exit_code == 2 and "not valid YAML" in bad.output
    assert not marker.exists()
    ok("annotate", data["generations"], "-a", "function:user_rewards:score", "--out", tmp_path / "f")
    assert marker.read_text() == "code ran"  # named explicitly: it runs


def test_chat_template_runs_in_the_sandbox(data, tmp_path, tiny_lm_dir):
    marker = tmp_path / "MARKER"
    folder = tmp_path / "model"
    shutil.copytree(tiny_lm_dir, folder)
    (folder / "chat_template.jinja").write_text(
        "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    result = cli("generate", data["prompts"], "--policy", folder, "--num-samples", 1, "--max-new-tokens", 2,
                 "--device", "cpu", "--out", tmp_path / "g")
    assert_clean_failure(result, tmp_path / "g", "SecurityError", code=result.exit_code)
    assert result.exit_code != 0 and not marker.exists()


# -------------------------------------------------------------------------------------- paths
HOSTILE_IDS = ["../../../../escaped", "/tmp/alignpipe-hostile-absolute", "..", ".", "a/../../../up", "~",
               "..\\..\\win", "%2e%2e%2fenc", "id\x00nul", "-rf", "shard-00000", "manifest.json"]


def test_ids_from_the_data_never_become_paths(tmp_path, tiny_lm_dir):
    """Hostile prompt_ids through import, generate, annotate, reweight, build-batches and train: the only new
    paths are the output folders (and their files), deep in the tree, whatever the ids say."""
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    src = write_jsonl(tmp_path / "hostile.jsonl", [{"prompt_id": pid, "prompt": f"Question {i}?"}
                                                   for i, pid in enumerate(HOSTILE_IDS)])
    before = {str(p) for p in tmp_path.rglob("*")}
    lm = tiny_lm_dir
    ok("import", src, "--out", work / "prompts")
    ok("generate", work / "prompts", "--policy", lm, "--num-samples", 2, "--max-new-tokens", 4, "--batch-size", 4,
       "--shard-batches", 1, "--device", "cpu", "--out", work / "gen")
    ok("annotate", work / "gen", "-a", "length", "--pairing", "all", "--shard-size", 2, "--out", work / "ann")
    ok("reweight", work / "ann", "-s", "constant", "--out", work / "w")
    ok("build-batches", work / "w", "--task", "pairwise", "--tokenizer", lm, "--reference", lm, "--shard-size", 4,
       "--device", "cpu", "--out", work / "b")
    ok("train", work / "b", "--policy", lm, "--loss", "dpo", "--max-steps", 1, "--device", "cpu",
       "--out", work / "p")
    assert sorted({r["prompt_id"] for r in rows_of(work / "gen")}) == sorted(HOSTILE_IDS)  # kept as data
    new = {str(p) for p in tmp_path.rglob("*")} - before
    outside = [p for p in new if not any(p.startswith(f"{work / o}") for o in ("prompts", "gen", "ann", "w", "b",
                                                                                "p"))]
    assert outside == [], outside
    assert not Path("/tmp/alignpipe-hostile-absolute").exists()
    names = {Path(p).name for p in new}
    assert not names & set(HOSTILE_IDS) - {"shard-00000", "manifest.json"}  # those two are ours
