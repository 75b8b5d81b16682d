"""Online RL: one GRPO iteration through alignpipe's stage commands against TRL's GRPOTrainer, prompts/s.

Both sides get the same model folder (SmolLM2-135M-Instruct, a new LoRA adapter r 16 on every linear layer),
the same train prompts of the shipped arithmetic task (pipelines/data/arithmetic.jsonl), the same reward
(alignpipe's `exact-answer` verifier: 1 when the last number of the answer equals the reference), group size,
max new tokens (16), temperature 1, one optimiser step over every answer of the generation batch (AdamW,
constant learning rate), GRPO advantages (r - mean) / (std + 1e-4) and the GRPO loss (per-answer token
mean, then the mean; clip 0.2, no KL: TRL's loss_type "grpo", beta 0).

    alignpipe  import -> generate --num-samples G -> annotate exact-answer -> build-batches --task group
               -> train --loss grpo, four processes, each loading what it needs (the stage design)
    trl        GRPOTrainer(...).train() for one step in one process (generation, reward, loss, step)
    worker     the alignpipe commands, run by a resident worker (`alignpipe worker start` once per case, its
               start-up reported apart as worker_start_s; imports paid there, models kept across repeats)

Measure: prompts per second of wall time of the whole iteration (the TRL side from its constructor on, model
loading excluded on both sides' first command is NOT possible for the stages, so both include loading:
TRL's model load is timed too). Loss parity: on TRL's own first batch, inside its `_compute_loss`, alignpipe's
per-token log-probs (`alignpipe.models.logprobs`) and GRPO loss (`alignpipe.training.policy_gradient`) are computed on the
same model and tensors; |loss_alignpipe - loss_trl| must be <= 1e-5 and the gradient norms (alignpipe's by
autograd on the same LoRA parameters, TRL's logged `grad_norm`) agree within 1e-3 relative, else the case is
VOID. (On-policy the GRPO loss value is -mean(A) up to rounding, about 0 whatever the log-probs: the gradient
norm is the check that sees the per-token log-probs, the aggregation and the advantages.)

GSPO parity (case smollm2-lora-gspo, TRL side only: alignpipe's stages are the GRPO case's with another --loss):
TRL's GSPO setup (importance_sampling_level "sequence", loss_type "grpo", epsilon 3e-4, epsilon_high 4e-4, beta
0) with steps_per_generation 2, so that the second optimiser step trains on samples of the policy before the
first step: old log-probs differ from the current ones, the sequence ratios are not 1 and some answers are
clipped. On that second step's batch, alignpipe's `gspo` loss with TRL's old log-probs as the behaviour policy
must give TRL's loss within 1e-5 and its gradient norm within 1e-3 relative, else VOID.

    python bench/bench_grpo.py [--quick] [--threads 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common

LR, LORA, EPS = 1e-4, 16, 0.2
DATA = common.ROOT / "pipelines" / "data" / "arithmetic.jsonl"


GSPO_EPS = (3e-4, 4e-4)  # the GSPO paper's clip range (section 5.1), TRL's recommended epsilon / epsilon_high


def cases(quick: bool) -> dict[str, dict]:
    return {"smollm2-lora-grpo": {"prompts": 4 if quick else 8, "group": 8, "max_new_tokens": 16, "loss": "grpo"},
            "smollm2-lora-gspo": {"prompts": 4, "group": 8, "max_new_tokens": 16, "loss": "gspo"}}


def train_prompts(n: int) -> list[dict]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"][:n]


# ------------------------------------------------------------------------------------------- alignpipe
def run_alignpipe(a) -> dict:
    """The four stage commands of one iteration, each a fresh process (as pipelines/rl.mk runs them); with
    `--socket` (the `worker` side) the same commands, run by that resident worker."""
    env = {**os.environ, **({"ALIGNPIPE_WORKER": a.socket} if a.socket else {})}

    work = Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    src = work / "prompts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in train_prompts(a.prompts)))
    n = a.prompts * a.group
    steps = [
        ["import", src, "--out", work / "prompts"],
        ["generate", work / "prompts", "--policy", a.model, "--out", work / "generations", "--num-samples", a.group,
         "--max-new-tokens", a.max_new_tokens, "--temperature", 1.0, "--seed", 0, "--device", "cpu"],
        ["annotate", work / "generations", "--annotator", "exact-answer", "--pairing", "pointwise",
         "--out", work / "annotations"],
        ["build-batches", work / "annotations", "--task", "group", "--advantage", "grpo", "--equal-groups", "keep",
         "--tokenizer", a.model, "--batch-size", n, "--out", work / "batches"],
        ["train", work / "batches", "--policy", a.model, "--loss", f"grpo,eps_low={EPS},eps_high={EPS}", "--lr", LR,
         "--scheduler", "constant", "--warmup-steps", 0, "--lora-r", LORA, "--max-grad-norm", 1.0, "--device", "cpu",
         "--seed", 0, "--out", work / "policy"],
    ]
    start, seconds = time.perf_counter(), {}
    for args in steps:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "alignpipe", *map(str, args)], check=True, capture_output=True, env=env)
        seconds[args[0]] = round(time.perf_counter() - t, 2)
    total = time.perf_counter() - start - seconds["import"]
    return {"seconds": total, "stages": seconds, "prompts/s": a.prompts / total}


# ------------------------------------------------------------------------------------------------- trl
def _parity(trainer, model, inputs, trl_loss, loss_name: str = "grpo") -> dict:
    """alignpipe's GRPO (or GSPO) loss on TRL's batch and model (before the step), next to TRL's loss."""
    import torch

    from alignpipe.models.logprobs import response_token_logps
    from alignpipe.training.policy_gradient import TokenInputs, grpo_loss, gspo_loss

    p_ids, p_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    c_ids, c_mask = inputs["completion_ids"], inputs["completion_mask"]
    prompts = [ids[m.bool()].tolist() for ids, m in zip(p_ids, p_mask)]  # TRL left-pads prompts
    answers = [ids[m.bool()].tolist() for ids, m in zip(c_ids, c_mask)]
    from alignpipe.models.logprobs import collate

    batch = collate(prompts, answers, trainer.processing_class.pad_token_id)
    logp, mask, _ = response_token_logps(model, batch)
    old = inputs.get("old_per_token_logps")
    behaviour = logp.detach() if old is None else old[:, : logp.shape[1]].float()
    x = TokenInputs(logp=logp, behaviour_logp=behaviour, mask=mask, advantage=inputs["advantages"].float(),
                    weight=torch.ones(logp.shape[0]))
    if loss_name == "gspo":
        total, metrics = gspo_loss(x, eps_low=GSPO_EPS[0], eps_high=GSPO_EPS[1])
    else:
        total, metrics = grpo_loss(x, eps_low=EPS, eps_high=EPS)
    loss = total / logp.shape[0]  # train's denominator: the step's examples (all weights 1)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)  # leaves TRL's .grad untouched
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None))
    ours = float(loss)
    return {"loss_alignpipe": ours, "loss_trl": float(trl_loss), "loss_diff": abs(ours - float(trl_loss)),
            "grad_norm_alignpipe": float(norm), "ratio_std": float(metrics["ratio/std"]),
            "clipped": float(metrics["clip/low"] + metrics["clip/high"])}


def run_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from alignpipe.feedback.annotators.verifiers import exact_answer

    verifier = exact_answer()

    def reward(completions, reference, **_):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [verifier.one(t, r).score for t, r in zip(texts, reference)]

    gspo = a.loss == "gspo"

    class Parity(GRPOTrainer):
        first: ClassVar[dict] = {}

        def _compute_loss(self, model, inputs):
            loss = super()._compute_loss(model, inputs)
            if not self.first or gspo:  # GSPO: the last step's (its samples are one step old)
                self.first.update(_parity(self, model, inputs, loss, a.loss))
            return loss

    start = time.perf_counter()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    rows = train_prompts(a.prompts)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "reference": r["reference"]}
                              for r in rows])
    n = a.prompts * a.group
    variant = ({"per_device_train_batch_size": n // 2, "steps_per_generation": 2, "max_steps": 2,
                "epsilon": GSPO_EPS[0], "epsilon_high": GSPO_EPS[1], "importance_sampling_level": "sequence"}
               if gspo else {"per_device_train_batch_size": n, "max_steps": 1, "epsilon": EPS})
    args = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="bench-trl-grpo-"),
                      gradient_accumulation_steps=1, num_generations=a.group, max_completion_length=a.max_new_tokens,
                      temperature=1.0, top_p=1.0, top_k=0, learning_rate=LR, lr_scheduler_type="constant",
                      weight_decay=0.0, max_grad_norm=1.0, beta=0.0, loss_type="grpo",
                      scale_rewards="group", logging_steps=1, save_strategy="no", report_to="none",
                      disable_tqdm=True, use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0, seed=0,
                      **variant)
    peft = LoraConfig(r=LORA, lora_alpha=2 * LORA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = Parity(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                     peft_config=peft)
    trainer.train()
    total = time.perf_counter() - start
    logged = [r for r in trainer.state.log_history if "grad_norm" in r][-1]  # the step parity looked at
    return {"seconds": total, "prompts/s": a.prompts / total, **Parity.first, "grad_norm_trl": float(logged["grad_norm"]),
            "reward_trl": float(logged.get("reward", float("nan")))}


# ---------------------------------------------------------------------------------------------- driver
def worker_main(a) -> None:
    common.set_threads(a.threads)
    common.quiet()
    out = run_alignpipe(a) if a.side in ("alignpipe", "worker") else run_trl(a)
    print(json.dumps({**out, "peak_rss_mb": common.peak_rss_mb()}), flush=True)


def measure_parity(name: str, case: dict, threads: int) -> dict:
    """The TRL side alone, once: its loss and gradient norm on its own batch vs alignpipe's loss (`case['loss']`)."""
    args = ["--model", str(common.smollm2()), "--prompts", str(case["prompts"]), "--group", str(case["group"]),
            "--max-new-tokens", str(case["max_new_tokens"]), "--loss", case["loss"]]
    r = common.worker("bench_grpo.py", ["--side", "trl", *args], threads)
    grad_diff = abs(r["grad_norm_alignpipe"] - r["grad_norm_trl"]) / max(r["grad_norm_trl"], 1e-12)
    return {"case": name, "valid": r["loss_diff"] <= 1e-5 and grad_diff <= 1e-3, "loss_trl": r["loss_trl"],
            "loss_alignpipe": r["loss_alignpipe"], "loss_diff": r["loss_diff"], "grad_norm_trl": r["grad_norm_trl"],
            "grad_norm_alignpipe": r["grad_norm_alignpipe"], "grad_norm_rel_diff": grad_diff,
            "ratio_std": r["ratio_std"], "clipped_fraction": r["clipped"], "answers": case["prompts"] * case["group"],
            "target": f"{case['loss']} loss within 1e-5 and gradient norm within 1e-3 of TRL's on its batch",
            "load": common.load_average()}


def measure(name: str, case: dict, threads: int, repeats: int) -> dict:
    if case["loss"] != "grpo":
        return measure_parity(name, case, threads)
    model = str(common.smollm2())
    args = ["--model", model, "--prompts", str(case["prompts"]), "--group", str(case["group"]),
            "--max-new-tokens", str(case["max_new_tokens"])]
    sock = Path(tempfile.mkdtemp(prefix="bench-w-")) / "w" / "sock"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": str(common.ROOT)}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "alignpipe", "worker", "start", "--socket", str(sock)], check=True,
                   capture_output=True, env=env)
    worker_start = time.perf_counter() - t
    extra = {"alignpipe": [], "trl": [], "worker": ["--socket", str(sock)]}
    try:
        runs = common.alternate({side: (lambda side=side: common.worker("bench_grpo.py", ["--side", side, *args,
                                                                                          *extra[side]], threads))
                                 for side in ("alignpipe", "trl", "worker")}, repeats)
    finally:
        subprocess.run([sys.executable, "-m", "alignpipe", "worker", "stop", "--socket", str(sock)], check=False,
                       capture_output=True, env=env)
    ours = [r["prompts/s"] for r in runs["alignpipe"]]
    warm = [r["prompts/s"] for r in runs["worker"]]
    theirs = [r["prompts/s"] for r in runs["trl"]]
    first = runs["trl"][0]
    grad_diff = abs(first["grad_norm_alignpipe"] - first["grad_norm_trl"]) / max(first["grad_norm_trl"], 1e-12)
    valid = first.get("loss_diff", 1.0) <= 1e-5 and grad_diff <= 1e-3
    return {"case": name, "prompts/s": {"alignpipe": common.spread(ours), "trl": common.spread(theirs),
                                        "alignpipe_worker": common.spread(warm)},
            "ratio": common.ratios(ours, theirs), "ratio_worker": common.ratios(warm, theirs),
            "worker_start_s": round(worker_start, 2), "worker_stages_s": runs["worker"][-1]["stages"], "valid": valid, "loss_trl": first.get("loss_trl"),
            "loss_alignpipe": first.get("loss_alignpipe"), "loss_diff": first.get("loss_diff"),
            "grad_norm_trl": first["grad_norm_trl"], "grad_norm_alignpipe": first["grad_norm_alignpipe"],
            "grad_norm_rel_diff": grad_diff,
            "stages_s": runs["alignpipe"][-1]["stages"], "answers": case["prompts"] * case["group"],
            "target": "prompts/s vs TRL GRPOTrainer, same batch loss within 1e-5", "load": common.load_average()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", action="store_true")
    p.add_argument("--side", choices=("alignpipe", "trl", "worker"))
    p.add_argument("--socket", help="the worker side: a running `alignpipe worker`'s socket")
    p.add_argument("--model")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--loss", choices=("grpo", "gspo"), default="grpo")
    p.add_argument("--case", help="run this case only")
    a = p.parse_args(argv)
    if a.worker:
        worker_main(a)
        return 0
    common.set_threads(a.threads)
    for name, case in cases(a.quick).items():
        if a.case and name != a.case:
            continue
        common.emit(measure(name, case, a.threads, 1 if a.quick else a.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
