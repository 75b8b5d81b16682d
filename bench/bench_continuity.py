"""Multi-step parity with TRL's GRPOTrainer: 3 optimiser steps of TRL against 3 `alignpipe train` calls, each
continuing the previous one's optimiser (`--continue-from`), on TRL's own batches.

TRL side (one process): GRPOTrainer on SmolLM2-135M-Instruct with a new LoRA adapter (r 16, every linear
layer), 3 steps, each on its own generation batch (PROMPTS prompts x GROUP answers, on-policy: one step per
batch), AdamW at a constant learning rate, gradient clipping at 1, GRPO loss (clip 0.2, no KL, loss_type
"grpo"). Captured: the adapter before the first step, each step's prompts, answers (token ids as sampled),
advantages and loss, the behaviour log-probs of the answers under the model at that step (the policy that
sampled them), the logged gradient norm, and the adapter after the third step.

alignpipe side: each captured step becomes a batches-group dataset of one stored batch; `alignpipe train`
from TRL's initial adapter on batch 1, then from its own output with `--continue-from` on batch 2 and 3 (three
processes, AdamW moments, step count and schedule carried in POLICY/trainer_state/). Compared: each step's
loss and gradient norm, and the final LoRA weights. The case is VOID beyond 1e-4 relative (the losses of an
on-policy step are about 0: their difference is taken absolute, within 1e-5).

    python bench/bench_continuity.py [--quick] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common
from bench_grpo import EPS, LORA, LR, train_prompts

STEPS = 3


def run_trl(a) -> dict:
    """GRPOTrainer for STEPS steps; what each step saw goes to a.work (see the module docstring)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from alignpipe.feedback.annotators.verifiers import exact_answer
    from alignpipe.models.logprobs import collate, response_token_logps

    verifier = exact_answer()
    work = Path(a.work)

    def reward(completions, reference, **_):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [verifier.one(t, r).score for t, r in zip(texts, reference)]

    class Capture(GRPOTrainer):
        steps: ClassVar[list] = []

        def _compute_loss(self, model, inputs):
            prompts = [ids[m.bool()].tolist() for ids, m in zip(inputs["prompt_ids"], inputs["prompt_mask"])]
            answers = [ids[m.bool()].tolist() for ids, m in zip(inputs["completion_ids"], inputs["completion_mask"])]
            with torch.no_grad():
                logp, mask, _ = response_token_logps(model, collate(prompts, answers, self.processing_class.pad_token_id))
            behaviour = [row[m.bool()].tolist() for row, m in zip(logp, mask)]
            loss = super()._compute_loss(model, inputs)
            self.steps.append({"prompts": prompts, "answers": answers, "behaviour": behaviour,
                               "advantages": inputs["advantages"].float().tolist(), "loss": float(loss)})
            return loss

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    rows = train_prompts(a.prompts * STEPS)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "reference": r["reference"]}
                              for r in rows])
    n = a.prompts * a.group
    args = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="bench-trl-continuity-"), per_device_train_batch_size=n,
                      gradient_accumulation_steps=1, max_steps=STEPS, num_generations=a.group,
                      max_completion_length=a.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, learning_rate=LR,
                      lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, beta=0.0, loss_type="grpo",
                      epsilon=EPS, scale_rewards="group", logging_steps=1, save_strategy="no", report_to="none",
                      disable_tqdm=True, use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0, seed=0,
                      shuffle_dataset=False)
    peft = LoraConfig(r=LORA, lora_alpha=2 * LORA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = Capture(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                      peft_config=peft)
    trainer.model.save_pretrained(str(work / "initial"))
    tok.save_pretrained(str(work / "initial"))
    trainer.train()
    trainer.model.save_pretrained(str(work / "final"))
    norms = [float(r["grad_norm"]) for r in trainer.state.log_history if "grad_norm" in r]
    (work / "steps.json").write_text(json.dumps({"steps": Capture.steps, "grad_norms": norms}))
    return {"steps": len(Capture.steps), "grad_norms": norms}


def write_batches(step: dict, tokenizer, out: Path, group: int) -> Path:
    """One captured step as a batches-group dataset of one stored batch (as build-batches writes it)."""
    from datasets import Dataset

    from alignpipe import schemas
    from alignpipe.data.output import StageOutput

    rows = []
    for i, (p, r, lp, adv) in enumerate(zip(step["prompts"], step["answers"], step["behaviour"], step["advantages"])):
        rows.append({"example_id": f"e{i}", "batch_index": 0, "prompt_id": f"p{i // group}",
                     "prompt": tokenizer.decode(p), "prompt_input_ids": p, "prompt_attention_mask": [1] * len(p),
                     "weight": 1.0, "response1": tokenizer.decode(r), "response1_input_ids": r,
                     "response1_attention_mask": [1] * len(r), "response1_advantage": adv,
                     "response1_group_size": group, "response1_behaviour_logps": lp})
    names = [c.name for c in schemas.columns("batches-group")]
    ds = Dataset.from_list([{k: x.get(k) for k in names} for x in rows], features=schemas.features("batches-group"))
    with StageOutput(out, stage="build-batches", kind="batches-group", config={"task": "group"}, inputs=[]) as so:
        so.finish(ds)
    return out


def run_alignpipe(work: Path, group: int, threads: int, carry: bool = True) -> list[Path]:
    """Three train processes over the captured batches, each continuing the previous optimiser (`carry`; else a
    fresh AdamW in each: the control)."""
    import os

    from alignpipe.models.loading import load_tokenizer

    steps = json.loads((work / "steps.json").read_text())["steps"]
    tok = load_tokenizer(work / "initial")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(common.ROOT)}
    prev, outs = work / "initial", []
    for k, step in enumerate(steps):
        batches = work / f"batches-{k + 1}"
        if not batches.exists():
            write_batches(step, tok, batches, group)
        out = work / f"{'policy' if carry else 'fresh'}-{k + 1}"
        cmd = [sys.executable, "-m", "alignpipe", "train", batches, "--policy", prev, "--out", out, "--loss",
               f"grpo,eps_low={EPS},eps_high={EPS}", "--lr", LR, "--scheduler", "constant", "--max-grad-norm", 1.0,
               "--device", "cpu", "--seed", 0] + (["--continue-from", prev] if k and carry else [])
        subprocess.run(list(map(str, cmd)), check=True, capture_output=True, env=env)
        prev = out
        outs.append(out)
    return outs


def lora_rel_diff(a: Path, b: Path) -> float:
    """|A - B| / |B| over every tensor of two adapter folders."""
    from safetensors.torch import load_file

    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    num = sum(float((x[k] - y[k]).double().pow(2).sum()) for k in y)
    return (num / max(sum(float(y[k].double().pow(2).sum()) for k in y), 1e-300)) ** 0.5


def compare(work: Path, outs: list[Path]) -> dict:
    from safetensors.torch import load_file

    from alignpipe.training.metrics import read_metrics

    trl = json.loads((work / "steps.json").read_text())
    ours = [read_metrics(o / "metrics.jsonl")[-1] for o in outs]
    loss_diff = [abs(r["loss"] - s["loss"]) for r, s in zip(ours, trl["steps"])]
    norm_rel = [abs(r["grad_norm"] - n) / max(n, 1e-12) for r, n in zip(ours, trl["grad_norms"])]
    a, b = load_file(outs[-1] / "adapter_model.safetensors"), load_file(work / "final" / "adapter_model.safetensors")
    weights_rel = lora_rel_diff(outs[-1], work / "final")
    valid = set(a) == set(b) and max(loss_diff) <= 1e-5 and max(norm_rel) <= 1e-4 and weights_rel <= 1e-4
    return {"valid": valid, "steps": len(ours), "loss_trl": [s["loss"] for s in trl["steps"]],
            "loss_alignpipe": [r["loss"] for r in ours], "loss_abs_diff": loss_diff,
            "grad_norm_trl": trl["grad_norms"], "grad_norm_alignpipe": [r["grad_norm"] for r in ours],
            "grad_norm_rel_diff": norm_rel, "lora_weights_rel_diff": weights_rel,
            "lora_moved_rel": lora_rel_diff(work / "initial", work / "final"),
            "global_steps": [r.get("global_step") for r in ours]}


def measure(quick: bool, threads: int) -> dict:
    prompts, group, tokens = (2, 4, 8) if quick else (4, 8, 16)
    work = Path(tempfile.mkdtemp(prefix="bench-continuity-", dir=str(common.WORK) if common.WORK.exists() else None))
    args = ["--model", str(common.smollm2()), "--prompts", str(prompts), "--group", str(group),
            "--max-new-tokens", str(tokens), "--work", str(work)]
    common.worker("bench_continuity.py", args, threads)
    result = compare(work, run_alignpipe(work, group, threads))
    fresh = run_alignpipe(work, group, threads, carry=False)  # the control: a fresh optimiser every train
    return {"case": "smollm2-lora-grpo-3-steps", **result, "answers_per_step": prompts * group,
            "fresh_optimiser_lora_rel_diff": lora_rel_diff(fresh[-1], work / "final"),
            "target": "3 continued trains == TRL GRPOTrainer's 3 steps: losses within 1e-5, gradient norms and "
                      "final LoRA weights within 1e-4 relative, else VOID", "load": common.load_average()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", action="store_true")
    p.add_argument("--model")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--work")
    a = p.parse_args(argv)
    common.set_threads(a.threads)
    if a.worker:
        common.quiet()
        print(json.dumps({**run_trl(a), "peak_rss_mb": common.peak_rss_mb()}), flush=True)
        return 0
    common.emit(measure(a.quick, a.threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
