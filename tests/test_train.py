"""train: the CLI end to end on the tiny models, the weighted step maths, resume, LoRA, reference sources,
every batches kind, and the bad inputs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from alignpipe.cli import app
from alignpipe.training.losses import LOSSES

RUNNER = CliRunner()
WORDS = ["the", "of", "and", "to", "in", "is", "that", "it", "for", "as", "with", "was", "on", "be", "by", "this", "are", "from", "or", "an"]


# ------------------------------------------------------------------------------------------- helpers
def pairs(n: int, seed: int = 0) -> list[dict]:
    """Preference pairs: the chosen answer is always 'A', the rejected one a few random words."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        words = [WORDS[int(j)] for j in torch.randint(len(WORDS), (2 + i % 3,), generator=g)]
        out.append({"prompt": f"Question {i}: pick one.", "response1": "A", "response2": " ".join(words)})
    return out


def make_batches(task: str, examples: list[dict], tokenizer_dir, batch_size: int = 2, ref_model=None):
    """A batches-<task> Dataset as build-batches writes it (ChatML prompt, response + <|im_end|>)."""
    from datasets import Dataset

    from alignpipe import schemas
    from alignpipe.models.loading import load_tokenizer
    from alignpipe.models.logprobs import score_responses
    from alignpipe.models.prompting import encode, render_prompt

    tok = load_tokenizer(tokenizer_dir)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    rows = []
    for i, ex in enumerate(examples):
        prompt = render_prompt(tok, ex["prompt"], None)
        row = {"example_id": f"e{i}", "batch_index": ex.get("batch_index", i // batch_size), "prompt_id": f"p{i}",
               "prompt": prompt, "prompt_input_ids": encode(tok, prompt), "margin": ex.get("margin", 0.0),
               "response1_label": ex.get("label", True)}
        for r in (1, 2):
            if f"response{r}" in ex:
                ids = encode(tok, ex[f"response{r}"]) + [end]
                row.update({f"response{r}": ex[f"response{r}"], f"response{r}_input_ids": ids,
                            f"response{r}_attention_mask": [1] * len(ids), f"response{r}_reward": None,
                            f"response{r}_ref_logp": None})
        if task == "group":  # an answer of a group: its advantage and the behaviour policy's per-token log-probs
            n = len(row["response1_input_ids"])
            row.update({"response1_advantage": ex["advantage"], "response1_group_size": 2,
                        "response1_behaviour_logps": [ex.get("behaviour", -5.0)] * n})
        ws = [float(ex.get(f"w{r}", 1.0)) for r in (1, 2) if f"response{r}" in ex]
        row["weight"] = sum(ws) / len(ws)  # one weight per example: a pair's is the mean of both
        rows.append(row)
    for r in (1, 2) if ref_model is not None else ():
        if f"response{r}_input_ids" in rows[0]:
            logps = score_responses(ref_model, [x["prompt_input_ids"] for x in rows],
                                    [x[f"response{r}_input_ids"] for x in rows], tok.pad_token_id)
            for x, v in zip(rows, logps):
                x[f"response{r}_ref_logp"] = v
    kind = f"batches-{task}"
    names = [c.name for c in schemas.columns(kind)]
    return Dataset.from_list([{k: x.get(k) for k in names} for x in rows], features=schemas.features(kind))


def write_batches(path: Path, task: str, examples: list[dict], tokenizer_dir, **kw) -> Path:
    from alignpipe.data.output import StageOutput

    so = StageOutput(path, stage="build-batches", kind=f"batches-{task}", config={"task": task}, inputs=[])
    with so:
        so.finish(make_batches(task, examples, tokenizer_dir, **kw))
    return Path(path)


def train(*args) -> tuple[int, str]:
    r = RUNNER.invoke(app, ["train", *map(str, args)])
    return r.exit_code, r.output


def losses_of(folder: Path) -> list[float]:
    from alignpipe.training.metrics import read_metrics

    return [row["loss"] for row in read_metrics(folder / "metrics.jsonl")]


def task_examples(task: str, n: int) -> list[dict]:
    ex = pairs(n)
    if task == "sft":
        return [{"prompt": e["prompt"], "response1": e["response2"]} for e in ex]
    if task == "pointwise":
        return [{"prompt": e["prompt"], "response1": e["response1"] if i % 2 else e["response2"],
                 "label": bool(i % 2)} for i, e in enumerate(ex)]
    if task == "reward":
        return [{**e, "margin": 0.5 * i} for i, e in enumerate(ex)]
    if task == "group":
        return [{"prompt": e["prompt"], "response1": e["response2"], "advantage": 1.0 if i % 2 else -0.5}
                for i, e in enumerate(ex)]
    return ex


# ------------------------------------------------------------------------------------- the CLI, DPO
def test_dpo_writes_policy_with_manifest_metrics_and_is_idempotent(tmp_path, tiny_lm_dir):
    from alignpipe.models.loading import load_causal_lm

    b = write_batches(tmp_path / "b", "pairwise", pairs(6), tiny_lm_dir)
    code, out = train(b, "--policy", tiny_lm_dir, "--loss", "dpo", "--out", tmp_path / "p", "--lr", "1e-3",
                      "--beta", "0.5")
    assert code == 0, out
    m = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert m["stage"] == "train" and m["schema"] is None and m["config"]["loss"] == "dpo,beta=0.5"
    assert m["report"]["reference"] == "model" and m["report"]["output"] == "model" and m["report"]["steps"] == 3
    assert {"loss", "rewards/accuracy", "rewards/margin", "logratio", "grad_norm", "lr"} <= set(m["report"]["final"])
    rows = [json.loads(x) for x in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and [r["batch_index"] for r in rows] == [0, 1, 2]
    assert rows[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)  # policy == reference at step 1
    assert rows[0]["examples"] == 2 and rows[0]["tokens"] > 0 and rows[0]["tokens/s"] > 0
    assert any((tmp_path / "p" / "tb").iterdir())  # TensorBoard events
    assert not (tmp_path / ".p.partial").exists()
    model = load_causal_lm(tmp_path / "p")  # generate loads it like any model folder
    assert model.config.vocab_size > 0
    before = (tmp_path / "p" / "manifest.json").stat().st_mtime_ns
    code, out = train(b, "--policy", tiny_lm_dir, "--loss", "dpo", "--out", tmp_path / "p", "--lr", "1e-3",
                      "--beta", "0.5")
    assert code == 0 and "up to date" in out
    assert (tmp_path / "p" / "manifest.json").stat().st_mtime_ns == before


def test_a_few_steps_change_every_trainable_parameter(tmp_path, tiny_lm_dir):
    b = write_batches(tmp_path / "b", "pairwise", pairs(4), tiny_lm_dir)
    code, out = train(b, "--policy", tiny_lm_dir, "--loss", "dpo", "--out", tmp_path / "p", "--lr", "1e-3")
    assert code == 0, out
    before, after = load_file(tiny_lm_dir / "model.safetensors"), load_file(tmp_path / "p" / "model.safetensors")
    assert set(before) == set(after)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == []


def test_dpo_on_a_fixed_chosen_answer_raises_reward_accuracy(tmp_path, tiny_lm_dir):
    """Chosen is always 'A': after two epochs the implicit reward ranks held-out pairs correctly."""
    from alignpipe.models.loading import load_causal_lm
    from alignpipe.models.logprobs import score_responses

    b = write_batches(tmp_path / "b", "pairwise", pairs(16), tiny_lm_dir, batch_size=4)
    code, out = train(b, "--policy", tiny_lm_dir, "--loss", "dpo", "--out", tmp_path / "p", "--lr", "5e-3",
                      "--epochs", "2", "--scheduler", "constant")
    assert code == 0, out
    held_out = make_batches("pairwise", pairs(12, seed=7), tiny_lm_dir)
    prompts = held_out["prompt_input_ids"]
    policy, ref = load_causal_lm(tmp_path / "p"), load_causal_lm(tiny_lm_dir)

    def margin(model):
        c = score_responses(model, prompts, held_out["response1_input_ids"], 3)
        r = score_responses(model, prompts, held_out["response2_input_ids"], 3)
        return torch.tensor(c) - torch.tensor(r)

    accuracy = float(((margin(policy) - margin(ref)) > 0).float().mean())
    assert accuracy >= 0.9
    rows = [json.loads(x) for x in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["rewards/accuracy"] == 1.0 and rows[-1]["loss"] < 0.5


# ------------------------------------------------------------------------- weighted step maths (core)
def _one_step(model_dir, loss: str, ds, lr: float = 1e-2, rule: str = "step"):
    """Gradients and parameters after one real AdamW step of the trainer core on all of `ds` (one step of
    every stored batch; under the dataset rule D = the dataset's total weight, one step per epoch)."""
    from alignpipe.training import loop as tr
    from alignpipe.training.checkpoint import frozen_copy, load_policy
    from alignpipe.training.micro_batches import batch_groups, dataset_scale, micro_batches

    task = LOSSES[loss].task
    module, tok = load_policy(model_dir, task)
    ref = tr.Reference("model", frozen_copy(module)) if LOSSES[loss].needs_reference else tr.Reference("none")
    norm = tr.Normalization(rule, dataset_scale(ds, task, 1))
    run = tr.prepare(module, reference=ref, task=task, loss=loss, hparams={}, pad_id=tok.pad_token_id,
                     dist=tr.Dist(), normalization=norm, lr=lr, weight_decay=0.0, scheduler="constant",
                     warmup_steps=0, total_steps=1)
    # Adam's first step is lr * g / (|g| + eps): with the default eps 1e-8 a gradient entry of 1e-10 that
    # float32 rounding flips in sign moves its weight by 2 lr. eps = 1e-3 keeps the step a smooth function of
    # the gradient, so equal gradients give parameters equal to 1e-6 (the gradients are compared as well).
    run.optimizer.param_groups[0]["eps"] = 1e-3
    keys, values = tr.accumulate_gradients(run, micro_batches(ds, batch_groups(ds), task, False, tok.pad_token_id,
                                                              "cpu"))
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    metrics = tr.optimizer_step(run, keys, values, 1)
    return metrics, grads, {n: p.detach().clone() for n, p in module.named_parameters()}


def _assert_same(a, b, atol=1e-6):
    assert a[0]["loss"] == pytest.approx(b[0]["loss"], abs=atol)
    for n in a[1]:
        torch.testing.assert_close(a[1][n], b[1][n], atol=atol, rtol=1e-4, msg=f"gradient of {n}")
    for n in a[2]:
        torch.testing.assert_close(a[2][n], b[2][n], atol=atol, rtol=1e-4, msg=f"parameter {n}")


# every policy loss; PPO's critic loss `value` trains another model on GAE batches: its weight rule is checked by
# hand in tests/test_ppo.py
POLICY_LOSSES = sorted(n for n, c in LOSSES.items() if c.meta.get("model") != "value")


@pytest.mark.parametrize("rule", ["dataset", "step"])
@pytest.mark.parametrize("loss", POLICY_LOSSES)
def test_weight_zero_is_absent_and_weight_two_is_duplicated_through_a_step(loss, rule, tiny_lm_dir, tiny_rm_dir):
    """Rows (x0 w=1, x1 w=0, x2 w=2) == rows (x0, x2, x2) with weight 1 in one step: same gradient, same
    AdamW step, under both weight normalisations (the copy lands in the same step)."""
    task = LOSSES[loss].task
    model = tiny_rm_dir if task == "reward" else tiny_lm_dir
    ex = task_examples(task, 3)
    key = "w1" if task in ("sft", "pointwise") else None
    weighted = [{**e, "batch_index": 0} for e in ex]
    for e, w in zip(weighted, (1.0, 0.0, 2.0)):
        e.update({"w1": w, "w2": w} if key is None else {key: w})
    duplicated = [{**ex[0], "batch_index": 0}, {**ex[2], "batch_index": 0}, {**ex[2], "batch_index": 0}]
    a = _one_step(model, loss, make_batches(task, weighted, tiny_lm_dir), rule=rule)
    b = _one_step(model, loss, make_batches(task, duplicated, tiny_lm_dir), rule=rule)
    _assert_same(a, b)


@pytest.mark.parametrize("rule", ["dataset", "step"])
def test_grad_accumulation_equals_one_big_batch_with_unequal_weights(rule, tiny_lm_dir):
    """Two stored batches with weight sums 1 and 5 in one step == the four rows as one batch."""
    ex = [{**e, "w1": w, "w2": w} for e, w in zip(pairs(4), (0.5, 0.5, 4.0, 1.0))]
    one = make_batches("pairwise", [{**e, "batch_index": 0} for e in ex], tiny_lm_dir)
    two = make_batches("pairwise", ex, tiny_lm_dir, batch_size=2)
    _assert_same(_one_step(tiny_lm_dir, "dpo", one, rule=rule), _one_step(tiny_lm_dir, "dpo", two, rule=rule))


def test_lr_schedule_numbers():
    from alignpipe.training.loop import lr_factor

    assert [lr_factor(s, "constant", 2, 10) for s in range(4)] == [1 / 3, 2 / 3, 1.0, 1.0]
    assert [lr_factor(s, "linear", 0, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert [round(lr_factor(s, "cosine", 1, 5), 12) for s in range(5)] == [0.5, 1.0, 0.853553390593, 0.5,
                                                                             0.146446609407]


# ------------------------------------------------------------------------------------------- resume
def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "alignpipe", "train", *map(str, args)]


def test_sigkill_then_rerun_resumes_with_the_same_losses(tmp_path, tiny_lm_dir):
    """A subprocess run killed after a checkpoint, rerun: the losses and weights equal an uninterrupted run's.
    One thread everywhere (OMP and MKL), so the subprocess and this process run the same kernels."""
    b = write_batches(tmp_path / "b", "pairwise", pairs(24), tiny_lm_dir, batch_size=2)
    common = ["--policy", tiny_lm_dir, "--loss", "dpo", "--lr", "1e-3", "--save-every", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cli(b, "--out", tmp_path / "p", *common), env=env, stderr=subprocess.DEVNULL)
    partial, deadline = tmp_path / ".p.partial", time.time() + 120
    while not list(partial.glob("checkpoint-00000[36]")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "p").exists()
    assert 3 <= len((partial / "metrics.jsonl").read_text().splitlines()) < 12
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, out = train(b, "--out", tmp_path / "p", *common, "--resume")
        assert code == 0 and "resuming after step" in out, out
        code, out = train(b, "--out", tmp_path / "q", *common)
        assert code == 0, out
    finally:
        torch.set_num_threads(threads)
    resumed, straight = losses_of(tmp_path / "p"), losses_of(tmp_path / "q")
    assert len(resumed) == len(straight) == 12
    assert max(abs(x - y) for x, y in zip(resumed, straight)) <= 1e-6
    a, c = load_file(tmp_path / "p" / "model.safetensors"), load_file(tmp_path / "q" / "model.safetensors")
    assert all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path, tiny_lm_dir):
    b = write_batches(tmp_path / "b", "pairwise", pairs(8), tiny_lm_dir)
    code, out = train(b, "--policy", tiny_lm_dir, "--loss", "dpo", "--out", tmp_path / "p", "--lr", "1e30",
                      "--max-grad-norm", "0", "--save-every", "1", "--scheduler", "constant")
    assert code == 1, out
    line = [x for x in out.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "at step 2" in line[0] and "checkpoint-000001" in line[0]
    assert (tmp_path / ".p.partial" / "checkpoint-000001" / "state.json").exists()
    assert not (tmp_path / "p").exists()


def test_truncated_checkpoint_is_an_error_naming_it(tmp_path, tiny_lm_dir):
    b = write_batches(tmp_path / "b", "pairwise", pairs(8), tiny_lm_dir)
    args = ["--policy", tiny_lm_dir, "--loss", "dpo", "--out", tmp_path / "p", "--lr", "1e30",
            "--max-grad-norm", "0", "--save-every", "1", "--scheduler", "constant"]
    assert train(b, *args)[0] == 1  # diverges at step 2, leaving checkpoint-000001
    ckpt = tmp_path / ".p.partial" / "checkpoint-000001"
    data = (ckpt / "optimizer.pt").read_bytes()
    (ckpt / "optimizer.pt").write_bytes(data[: len(data) // 2])
    code, out = train(b, *args)
    assert code == 2 and str(ckpt) in out and "optimizer.pt is truncated" in out


# ------------------------------------------------------------------------------------ LoRA, reference
def test_lora_trains_only_the_adapter_and_the_folder_loads_and_generates(tmp_path, tiny_lm_dir):
    from alignpipe.models.loading import load_causal_lm, load_tokenizer

    b = write_batches(tmp_path / "b", "pairwise", pairs(4), tiny_lm_dir)
    code, out = train(b, "--policy", tiny_lm_dir, "--loss", "dpo", "--out", tmp_path / "a", "--lr", "1e-2",
                      "--lora-r", "4", "--target-modules", "q_proj", "--target-modules", "v_proj")
    assert code == 0, out
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(Path(tiny_lm_dir).resolve()) and cfg["r"] == 4
    assert (tmp_path / "a" / "tokenizer.json").exists() and not (tmp_path / "a" / "model.safetensors").exists()
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["report"]["reference"] == "adapter" and m["report"]["output"] == "adapter"
    adapter = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0
    model = load_causal_lm(tmp_path / "a")
    base = load_file(tiny_lm_dir / "model.safetensors")
    for name, p in model.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base[name.replace(".base_layer", "")]), name
    tok = load_tokenizer(tmp_path / "a")
    ids = tok("Hi", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 3
    # the next online iteration continues the adapter (same rank), still on the base model, reference = base
    code, out = train(b, "--policy", tmp_path / "a", "--loss", "dpo", "--out", tmp_path / "a2", "--lr", "1e-2",
                      "--lora-r", "4")
    assert code == 0, out
    cfg2 = json.loads((tmp_path / "a2" / "adapter_config.json").read_text())
    assert cfg2["base_model_name_or_path"] == cfg["base_model_name_or_path"]
    again = load_file(tmp_path / "a2" / "adapter_model.safetensors")
    assert set(again) == set(adapter) and not all(torch.equal(again[k], adapter[k]) for k in adapter)
    code, out = train(b, "--policy", tmp_path / "a", "--loss", "dpo", "--out", tmp_path / "a3", "--lora-r", "8")
    assert code == 2 and "is a LoRA adapter of rank 4, not --lora-r 8" in out
    code, out = train(b, "--policy", tiny_lm_dir, "--loss", "dpo", "--out", tmp_path / "merged", "--lr", "1e-2",
                      "--lora-r", "4", "--target-modules", "q_proj", "--target-modules", "v_proj", "--merge")
    assert code == 0, out
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"],
                               model.merge_and_unload().model.layers[0].self_attn.q_proj.weight.detach())


def test_stored_reference_and_live_reference_give_the_same_first_step_loss(tmp_path, tiny_lm_dir,
                                                                             tiny_tokenizer_dir):
    from alignpipe.models.loading import load_causal_lm
    from alignpipe.testing import build_causal_lm

    other = build_causal_lm(tmp_path / "ref", tiny_tokenizer_dir, seed=5)
    stored = write_batches(tmp_path / "stored", "pairwise", pairs(4), tiny_lm_dir,
                           ref_model=load_causal_lm(other))
    plain = write_batches(tmp_path / "plain", "pairwise", pairs(4), tiny_lm_dir)
    common = ["--policy", tiny_lm_dir, "--loss", "dpo", "--lr", "1e-3", "--max-steps", "1"]
    assert train(stored, "--out", tmp_path / "s", *common)[0] == 0
    assert train(plain, "--out", tmp_path / "l", "--reference", other, *common)[0] == 0
    s, lv = losses_of(tmp_path / "s")[0], losses_of(tmp_path / "l")[0]
    assert abs(s - 0.6931) > 0.05  # a reference different from the policy: not the trivial log 2
    assert s == pytest.approx(lv, abs=1e-5)
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["report"]["reference"] == "stored"


# ------------------------------------------------------------------------------- every batches kind
@pytest.fixture(scope="module")
def built_batches(tmp_path_factory, tiny_lm_dir) -> dict[str, Path]:
    """Every batches kind through the real stages: import -> build-batches (reference log-probs cached)."""
    root = tmp_path_factory.mktemp("built")
    preference = [{"prompt": e["prompt"], "chosen": e["response1"], "rejected": e["response2"]} for e in pairs(8)]
    labelled = [{"prompt": f"Question {i}", "completion": "A" if i % 2 else "no idea", "label": bool(i % 2)}
                for i in range(8)]
    for name, rows in (("pref", preference), ("lab", labelled)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert RUNNER.invoke(app, ["import", str(root / f"{name}.jsonl"), "--out", str(root / name)]).exit_code == 0
    out = {}
    for task, source, model in (("sft", "pref", "--tokenizer"), ("reward", "pref", "--tokenizer"),
                                ("pointwise", "lab", "--reference"), ("pairwise", "pref", "--reference")):
        r = RUNNER.invoke(app, ["build-batches", str(root / source), "--task", task, model, str(tiny_lm_dir),
                                "--batch-size", "4", "--out", str(root / task)])
        assert r.exit_code == 0, r.output
        out[task] = root / task
    return out


@pytest.mark.parametrize("loss", ["sft", "reward", "kto", "dpo"])
def test_every_batches_kind_from_build_batches_is_consumed(loss, built_batches, tmp_path, tiny_lm_dir, tiny_rm_dir):
    task = LOSSES[loss].task
    policy = tiny_rm_dir if task == "reward" else tiny_lm_dir
    code, out = train(built_batches[task], "--policy", policy, "--loss", loss, "--out", tmp_path / "p", "--lr", "1e-3")
    assert code == 0, out
    rows = [json.loads(x) for x in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(isinstance(r["loss"], float) and r["examples"] == 4 for r in rows)
    report = json.loads((tmp_path / "p" / "manifest.json").read_text())["report"]
    assert report["reference"] == {"sft": "none", "reward": "none", "pointwise": "stored", "pairwise": "stored"}[task]
    if task == "reward":
        from alignpipe.models.loading import load_reward_model

        assert load_reward_model(tmp_path / "p").config.num_labels == 1


def test_reward_model_from_a_causal_lm_needs_init_reward_head(tmp_path, tiny_lm_dir):
    b = write_batches(tmp_path / "b", "reward", task_examples("reward", 2), tiny_lm_dir)
    code, out = train(b, "--policy", tiny_lm_dir, "--loss", "reward", "--out", tmp_path / "p")
    assert code == 2 and "--init-reward-head" in out
    code, out = train(b, "--policy", tiny_lm_dir, "--loss", "reward", "--out", tmp_path / "p", "--init-reward-head",
                      "--dtype", "bfloat16", "--gradient-checkpointing")
    assert code == 0, out
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["dtype"] == "bfloat16"


# --------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs(tmp_path, tiny_lm_dir):
    b = write_batches(tmp_path / "b", "pairwise", pairs(2), tiny_lm_dir)
    cases = [
        (["--loss", "kto"], "is a batches-pairwise dataset but --loss kto trains on batches-pointwise"),
        (["--loss", "dpo", "--reference", "stored"], "--reference stored: the batches carry no reference"),
        (["--loss", "dpo,tau=0.1"], "--loss 'dpo,tau=0.1': loss 'dpo' has no parameter 'tau' (known: beta)"),
        (["--loss", "orpo", "--beta", "0.1"], "--beta: loss 'orpo' has no parameter 'beta' (known: lam)"),
        (["--loss", "dpo,beta=0.1", "--beta", "0.2"], "--beta and 'beta=' in --loss 'dpo,beta=0.1': give one"),
        (["--loss", "dpo,beta=x"], "--loss 'dpo,beta=x': beta: expected a number, found 'x'"),
        (["--loss", "dpo", "--weight-normalization", "batch"], "--weight-normalization 'batch': unknown"),
        (["--loss", "dpo", "--revision", "main"], "is a local folder, not a Hub id"),
        (["--loss", "simpo", "--reference", str(tiny_lm_dir)], "reference-free"),
        (["--loss", "nope"], "--loss 'nope': unknown"),
        (["--loss", "dpo", "--merge"], "--merge: only a LoRA run"),
        (["--loss", "dpo", "--lora-r", "2", "--target-modules", "no_such"], "--target-modules"),
    ]
    for extra, message in cases:
        code, out = train(b, "--policy", tiny_lm_dir, "--out", tmp_path / "p", *extra)
        assert code == 2 and message in out, (extra, out)
        assert len([x for x in out.splitlines() if x.startswith("error:")]) == 1
    code, out = train(b, "--policy", tmp_path / "nope", "--loss", "dpo", "--out", tmp_path / "p")
    assert code == 2 and f"policy {tmp_path / 'nope'}: no such folder" in out
    bad = write_batches(tmp_path / "neg", "pairwise", [{**pairs(1)[0], "w2": -3.0}], tiny_lm_dir)
    code, out = train(bad, "--policy", tiny_lm_dir, "--loss", "dpo", "--out", tmp_path / "p")
    assert code == 2 and "row 0: column 'weight' must be a finite number >= 0" in out
    assert not (tmp_path / "p").exists()


def test_partially_cached_reference_is_an_error_naming_the_row(tmp_path, tiny_lm_dir):
    from datasets import Dataset

    from alignpipe.data.output import StageOutput
    from alignpipe.models.loading import load_causal_lm

    ds = make_batches("pairwise", pairs(3), tiny_lm_dir, ref_model=load_causal_lm(tiny_lm_dir)).to_list()
    ds[1]["response2_ref_logp"] = None
    from alignpipe import schemas

    so = StageOutput(tmp_path / "b", stage="build-batches", kind="batches-pairwise", config={}, inputs=[])
    with so:
        so.finish(Dataset.from_list(ds, features=schemas.features("batches-pairwise")))
    code, out = train(tmp_path / "b", "--policy", tiny_lm_dir, "--loss", "dpo", "--out", tmp_path / "p")
    assert code == 2 and "row 1: reference log-probs are null here" in out


# ------------------------------------------------------------------------------------- the loss table
def test_loss_help_lists_every_registered_loss_with_its_hyperparameters():
    """`train --help` is generated from the registry: each loss's usage line with its defaults."""
    import re

    r = RUNNER.invoke(app, ["train", "--help"], terminal_width=400)
    text = re.sub(r"\s+", " ", r.output.replace("│", " "))
    for name in LOSSES:
        assert LOSSES.usage(name) in text, name


def test_loss_grammar_and_the_beta_shorthand_give_the_same_config(tmp_path, tiny_lm_dir):
    """`--loss dpo,beta=0.5` and `--loss dpo --beta 0.5` are the same run (the second is up to date)."""
    b = write_batches(tmp_path / "b", "pairwise", pairs(2), tiny_lm_dir)
    common = (b, "--policy", tiny_lm_dir, "--out", tmp_path / "p", "--max-steps", "1", "--device", "cpu")
    code, out = train(*common, "--loss", "dpo,beta=0.5")
    assert code == 0, out
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["config"]["loss"] == "dpo,beta=0.5" and manifest["report"]["hyperparameters"] == {"beta": 0.5}
    assert manifest["config"]["weight_normalization"] == "dataset"
    assert manifest["report"]["weight_normalization"] == "dataset"
    code, out = train(*common, "--loss", "dpo", "--beta", "0.5")
    assert code == 0 and "up to date" in out, out
