"""alignpipe inspect as a new user meets it: a policy reads as a summary (its manifest as JSON only with --json), a
run folder says what it is and lists its stage outputs, sample rows of batches show the question rather than
the chat template's system prompt, and model text cannot drive the terminal."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ROOT, child_env, cli, generation, ok, pair, write_dataset
from report_fixtures import make_run
from test_train import pairs, write_batches

from alignpipe.models.prompting import last_user_turn


def test_policy_reads_as_a_summary_and_its_manifest_only_with_json(tmp_path, tiny_lm_dir):
    batches = write_batches(tmp_path / "b", "pairwise", pairs(4), tiny_lm_dir)
    ok("train", batches, "--policy", tiny_lm_dir, "--loss", "dpo", "--lr", "1e-3", "--lora-r", "4",
       "--out", tmp_path / "policy")
    text = ok("inspect", tmp_path / "policy").stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    lines = text.splitlines()
    assert lines[0] == f"{tmp_path / 'policy'}: a policy: a LoRA adapter on {tiny_lm_dir.resolve()}"
    assert f"  <- {batches}  (build-batches, batches-pairwise, 4 rows)" in lines
    assert f"  <- {tiny_lm_dir}  (not written by alignpipe: a source)" in lines
    assert any(line.startswith("  training:    2 steps of dpo,beta=0.1 (task pairwise") for line in lines)
    assert any(line.startswith("  last step:   loss 0.") for line in lines)
    assert any(line.startswith("  files:       adapter_model.safetensors (") for line in lines)
    as_json = json.loads(ok("inspect", tmp_path / "policy", "--json").stdout)
    assert as_json["kind"] == "train" and as_json["manifest"]["report"]["steps"] == 2


def test_run_folder_says_what_it_is_and_lists_its_outputs(tmp_path):
    run = make_run(tmp_path / "run", iters=2, prompts=3, payload=False)
    outputs = sorted(str(m.parent.relative_to(run)) for m in run.rglob("manifest.json"))
    text = ok("inspect", run).stdout
    lines = text.splitlines()
    assert lines[0].startswith(f"{run}: a run folder (not a dataset) with {len(outputs)} stage outputs")
    assert sorted(line.split()[0] for line in lines[1:-1]) == outputs
    assert lines[1].split()[:3] == ["prompts", "import", "prompts"]
    assert "alignpipe import" not in text and lines[-1].startswith("Inspect one: alignpipe inspect ")
    as_json = json.loads(ok("inspect", run, "--json").stdout)
    assert as_json["kind"] == "run" and len(as_json["outputs"]) == len(outputs)
    model = tmp_path / "model"  # written by make_run: a base model folder, no manifest
    bad = cli("inspect", model)
    assert bad.exit_code == 2 and f"{model}: a model folder that alignpipe did not write" in bad.output
    assert "alignpipe import" not in bad.output
    (tmp_path / "outside").mkdir()  # a folder with no outputs in it is still outside data
    bad = cli("inspect", tmp_path / "outside")
    assert bad.exit_code == 2 and "bring outside data in with `alignpipe import`" in bad.output


CHATML = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
          "<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("rendered, question", [
    (CHATML, "What is 7 + 5?"),
    (("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
      "<|end_header_id|>\n\nWhy is the sky blue?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
     "Why is the sky blue?"),
    ("<bos><start_of_turn>user\nName a colour.<end_of_turn>\n<start_of_turn>model\n", "Name a colour."),
    ("<s>[INST] Tell me a joke. [/INST]", "Tell me a joke."),
    ("<|user|>\nHello there<|end|>\n<|assistant|>\n", "Hello there"),
    ("<|im_start|>user\nFirst line\nsecond line<|im_end|>\n<|im_start|>assistant\n", "First line\nsecond line"),
    ("A plain prompt, no template.", "A plain prompt, no template."),
])
def test_last_user_turn_of_rendered_prompts(rendered, question):
    assert last_user_turn(rendered) == question


def test_batches_sample_rows_show_the_question_and_escape_model_text(tmp_path):
    rows = [{**pair(i), "example_id": f"e{i}", "batch_index": 0, "weight": 1.0, "prompt": CHATML,
             "response1": "\x1b[31mred[/] [bold]x", "prompt_input_ids": [1], "response1_input_ids": [1],
             "response2_input_ids": [1]} for i in range(2)]
    folder = write_dataset(tmp_path / "b", "batches-pairwise", rows)
    text = ok("inspect", folder, "--rows", "2").stdout
    assert "What is 7 + 5?" in text and "helpful AI assistant" not in text
    assert "\x1b" not in text and "response1           \\x1b[31mred[/] [bold]x" in text
    sample = json.loads(ok("inspect", folder, "--json").stdout)["sample"]
    assert [s["question"] for s in sample] == ["What is 7 + 5?"] * 2


def test_output_cut_short_by_its_reader_is_not_an_error(tmp_path):
    """`alignpipe inspect ... --json | head`: the reader closes the pipe early; exit 0, nothing on stderr."""
    rows = [generation(i, 0, "word " * 80) for i in range(400)]  # ~200 kB of JSON: more than a pipe holds
    folder = write_dataset(tmp_path / "g", "generations", rows)
    proc = subprocess.Popen([sys.executable, "-m", "alignpipe", "inspect", str(folder), "--json", "--rows", "400"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(), cwd=ROOT)
    assert proc.stdout.read(20)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == "", err
