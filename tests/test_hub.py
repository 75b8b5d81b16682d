"""Hub model ids: `org/name[@revision]` from a huggingface_hub cache that the test fills in the hub's own layout
(models--org--name/{refs, snapshots/<commit>, blobs}), offline (HF_HUB_OFFLINE=1, set by conftest).

The stages load the id (generate, annotate's judge, build-batches' tokenizer and reference, train's policy),
the generations and manifests carry the resolved commit, a local folder of the same name wins, and a name that
is neither a folder nor cached is a one-line error."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import cli, ok, write_dataset

from alignpipe.core.errors import UserError
from alignpipe.data import hub
from alignpipe.data.hub import hub_commit
from alignpipe.data.io import read_input
from alignpipe.data.manifest import read_manifest
from alignpipe.models.loading import (
    check_model_folder,
    local_folder,
    model_fingerprint,
    with_revision,
)

REPO = "alignpipe-test/tiny-llama"


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_lm_dir) -> dict:
    """A hub cache holding the tiny LM as REPO at main, and a changed copy at the tag v2."""
    root = tmp_path_factory.mktemp("hub-cache")
    main = hub.put(tiny_lm_dir, REPO, cache=root)
    changed = tmp_path_factory.mktemp("tiny-v2")
    shutil.copytree(tiny_lm_dir, changed, dirs_exist_ok=True)
    gen = json.loads((changed / "generation_config.json").read_text())
    (changed / "generation_config.json").write_text(json.dumps({**gen, "temperature": 0.5}))
    v2 = hub.put(changed, REPO, cache=root, revision="v2")
    hub.put(tiny_lm_dir, REPO, cache=root)  # main again: refs/main is not moved by a put of another revision
    return {"root": root, "main": main.name, "v2": v2.name}


@pytest.fixture(autouse=True)
def hub_env(cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(cache["root"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    rows = [{"prompt_id": f"p{i}", "prompt": q, "messages": [], "reference": None, "split": "train"}
            for i, q in enumerate(["Hi", "Explain the for statement.", "Why?", "Tell me about classes."])]
    return write_dataset(tmp_path_factory.mktemp("prompts") / "prompts", "prompts", rows)


def test_the_filled_cache_is_huggingface_hubs_own_layout(cache):
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    info = scan_cache_dir(cache["root"])
    (repo,) = [r for r in info.repos if r.repo_id == REPO]
    assert {r.commit_hash for r in repo.revisions} == {cache["main"], cache["v2"]}
    assert repo.refs.keys() == {"main", "v2"}
    found = try_to_load_from_cache(REPO, "config.json", cache_dir=cache["root"], revision=cache["v2"])
    assert Path(found).parent.name == cache["v2"] and json.loads(Path(found).read_text())["model_type"] == "llama"


def test_hub_id_resolves_to_its_snapshot_and_commit(cache):
    snap = local_folder(REPO)
    assert snap.name == cache["main"] and (snap / "config.json").is_file()
    assert local_folder(f"{REPO}@v2").name == cache["v2"]
    assert local_folder(f"{REPO}@{cache['v2']}").name == cache["v2"]
    assert hub_commit(REPO) == model_fingerprint(REPO) == cache["main"]
    assert model_fingerprint(with_revision(REPO, "v2")) == cache["v2"]
    assert check_model_folder(REPO, "policy") == snap


def test_a_local_folder_of_the_same_name_wins(tmp_path, monkeypatch, tiny_lm_dir):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_lm_dir, tmp_path / REPO)
    assert local_folder(REPO) == Path(REPO)
    assert hub_commit(REPO) is None and len(model_fingerprint(REPO)) == 16  # a content hash, not a commit
    with pytest.raises(UserError, match="is a local folder, not a Hub id"):
        with_revision(REPO, "v2")


@pytest.mark.parametrize("name, message", [
    ("nobody/missing", "policy nobody/missing: no such folder, and not in the Hub cache ("),
    (f"{REPO}@v9", "not in the Hub cache at revision v9"),
    ("/no/such/folder", "policy /no/such/folder: no such folder"),
])
def test_neither_folder_nor_cached_is_one_line(name, message):
    with pytest.raises(UserError) as e:
        check_model_folder(name, "policy")
    assert message in str(e.value) and "\n" not in str(e.value)
    if "Hub cache" in message:
        assert "the network is off (HF_HUB_OFFLINE=1)" in str(e.value)


def test_with_revision():
    assert with_revision(REPO, None) == REPO
    assert with_revision(REPO, "v2") == f"{REPO}@v2"
    with pytest.raises(UserError, match="not a Hub id without a revision"):
        with_revision(f"{REPO}@main", "v2")


def test_security_defaults_hold_for_hub_models(tmp_path, tiny_lm_dir):
    """A Hub model with pickle weights only is refused without --allow-pickle, as a local folder is."""
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_lm_dir / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    hub.put(folder, "alignpipe-test/pickled", cache=Path(local_folder(REPO)).parents[2])
    with pytest.raises(UserError, match="only pickle weights"):
        check_model_folder("alignpipe-test/pickled", "policy")


def test_generate_with_a_hub_id_records_the_commit(prompts, tmp_path, cache):
    out = tmp_path / "gens"
    ok("generate", prompts, "--policy", REPO, "--revision", "v2", "--num-samples", 2, "--max-new-tokens", 4,
       "--device", "cpu", "--out", out)
    ds, _ = read_input(out, "generations", stage="test")
    assert set(ds["policy"]) == {f"{REPO}@v2"} and set(ds["policy_fingerprint"]) == {cache["v2"]}
    manifest = read_manifest(out)
    assert manifest["config"]["policy"] == REPO and manifest["config"]["revision"] == "v2"
    assert any(cache["v2"] in i["path"] for i in manifest["inputs"])  # the snapshot folder, named by its commit
    again = ok("generate", prompts, "--policy", REPO, "--revision", "v2", "--num-samples", 2,
               "--max-new-tokens", 4, "--device", "cpu", "--out", out)
    assert "up to date" in again.output


def test_generate_bad_hub_id_is_exit_2_one_line(prompts, tmp_path):
    result = cli("generate", prompts, "--policy", "nobody/missing", "--device", "cpu", "--out", tmp_path / "o")
    assert result.exit_code == 2
    (line,) = [x for x in result.output.splitlines() if x.strip()]
    assert "nobody/missing: no such folder, and not in the Hub cache" in line and "HF_HUB_OFFLINE=1" in line
    assert not (tmp_path / "o").exists()


def test_judge_tokenizer_reference_and_policy_by_hub_id(prompts, tmp_path, cache):
    """annotate (an LM judge), build-batches (--tokenizer, --reference) and train (--policy) by Hub id."""
    d = tmp_path
    ok("generate", prompts, "--policy", REPO, "--num-samples", 2, "--max-new-tokens", 4, "--device", "cpu",
       "--out", d / "gens")
    ok("annotate", d / "gens", "-a", f"pairwise-judge:{REPO}", "--device", "cpu", "--out", d / "ann")
    ann, _ = read_input(d / "ann", "annotations", stage="test")
    assert len(ann) == 4
    ok("reweight", d / "ann", "--strategy", "constant", "--out", d / "w")
    ok("build-batches", d / "w", "--task", "pairwise", "--tokenizer", REPO, "--reference", REPO,
       "--batch-size", 2, "--device", "cpu", "--out", d / "b")
    batches, _ = read_input(d / "b", "batches-pairwise", stage="test")
    assert len(batches) == 4 and all(x is not None for x in batches["response1_ref_logp"])
    ok("train", d / "b", "--policy", REPO, "--loss", "dpo", "--lora-r", 2, "--device", "cpu", "--out", d / "p")
    adapter = json.loads((d / "p" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == REPO  # the Hub id, resolved again through the cache
    assert local_folder(d / "p") == d / "p" and check_model_folder(d / "p", "policy") == d / "p"
