"""The RL loop over several iterations: alignpipe's stage commands (sequential, and overlapped as OFF_POLICY=1
runs them) against TRL's GRPOTrainer over the same prompts, group size and optimiser steps, prompts/s.

    alignpipe, each iteration k = 1..ITERS: generate (PROMPTS fresh train prompts x GROUP answers) ->
               annotate exact-answer -> build-batches --task group (GRPO advantages) -> train --loss grpo
               (one optimiser step; from iteration 2 on with --continue-from the previous policy), every
               command its own process (process start and model load included; no evaluation)
      sequential   the four commands of iteration k after those of k-1, OMP threads = --threads
      off-policy-1 iteration k samples with policy k-2 (OFF_POLICY=1): its generate, annotate and
                   build-batches run beside iteration k-1's train, one thread each (OMP 1 + 1)
      worker       as sequential, the commands run by a resident worker (`alignpipe worker start` once,
                   before the repeats; its start-up reported apart as worker_start_s)
    trl        GRPOTrainer(...).train() for ITERS steps in one process (one generation batch a step)

Both sides: SmolLM2-135M-Instruct, a new LoRA adapter r 16 on every linear layer, max new tokens 16,
temperature 1, AdamW at a constant learning rate, GRPO loss with clip 0.2, no KL. The time of each stage
command is recorded (the cost of an iteration's parts).

    python bench/bench_rl_loop.py [--quick] [--threads 2]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common
from bench_grpo import EPS, LORA, LR, train_prompts


def _cmd(*args) -> list[str]:
    return [sys.executable, "-m", "alignpipe", *map(str, args)]


class Loop:
    """The stage commands of the alignpipe side, in a work folder."""

    def __init__(self, work: Path, model: str, prompts: int, group: int, tokens: int, iters: int):
        self.work, self.model, self.prompts, self.group, self.tokens, self.iters = work, model, prompts, group, \
            tokens, iters
        self.seconds: dict[str, float] = {}

    def policy(self, k: int) -> Path | str:
        return self.model if k <= 0 else self.work / f"iter-{k}" / "policy"

    def prepare(self, k: int, behaviour: int, threads: int) -> None:
        """generate (with policy `behaviour`), annotate, build-batches of iteration k."""
        d, rows = self.work / f"iter-{k}", f"{(k - 1) * self.prompts}:{k * self.prompts}"
        steps = [("generate", self.work / "prompts", "--policy", self.policy(behaviour), "--out", d / "generations",
                  "--rows", rows,
                  "--split", "train", "--num-samples", self.group, "--max-new-tokens", self.tokens,
                  "--temperature", 1.0, "--seed", k - 1, "--iteration", k, "--device", "cpu"),
                 ("annotate", d / "generations", "--annotator", "exact-answer", "--pairing", "pointwise",
                  "--out", d / "annotations"),
                 ("build-batches", d / "annotations", "--task", "group", "--advantage", "grpo", "--equal-groups",
                  "keep", "--tokenizer", self.model, "--batch-size", self.prompts * self.group, "--out", d / "batches")]
        for s in steps:
            self.run(f"{s[0]}-{k}", list(s), threads)

    def train_cmd(self, k: int) -> list:
        return ["train", self.work / f"iter-{k}" / "batches", "--policy", self.policy(k - 1), "--loss",
                f"grpo,eps_low={EPS},eps_high={EPS}", "--lr", LR, "--scheduler", "constant", "--lora-r", LORA,
                "--max-grad-norm", 1.0, "--device", "cpu", "--seed", 0, "--out", self.policy(k),
                "--schedule-steps", self.iters] + (["--continue-from", self.policy(k - 1)] if k > 1 else [])

    def run(self, name: str, args: list, threads: int) -> None:
        t = time.perf_counter()
        subprocess.run(_cmd(*args), check=True, capture_output=True, env=_env(threads))
        self.seconds[name] = round(time.perf_counter() - t, 2)

    def start(self, name: str, args: list, threads: int):
        return name, time.perf_counter(), subprocess.Popen(_cmd(*args), stdout=subprocess.DEVNULL,
                                                           stderr=subprocess.PIPE, env=_env(threads))

    def wait(self, started) -> None:
        name, t, proc = started
        _, err = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"{name}: {err[-1000:]}")
        self.seconds[name] = round(time.perf_counter() - t, 2)


SOCKET: list[str] = []  # the worker side: the resident worker's socket


def _env(threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(common.ROOT)}
    return {**env, "ALIGNPIPE_WORKER": SOCKET[0]} if SOCKET else env


def run_alignpipe(a) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"bench-rl-loop-{a.mode}-", dir=str(common.WORK)))
    src = work / "prompts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in train_prompts(a.prompts * a.iters)))
    subprocess.run(_cmd("import", src, "--out", work / "prompts"), check=True, capture_output=True)
    loop = Loop(work, a.model, a.prompts, a.group, a.max_new_tokens, a.iters)
    start = time.perf_counter()
    if a.mode in ("sequential", "worker"):
        SOCKET[:] = [a.socket] if a.mode == "worker" else []
        for k in range(1, a.iters + 1):
            loop.prepare(k, k - 1, a.threads)
            loop.run(f"train-{k}", loop.train_cmd(k), a.threads)
    else:  # OFF_POLICY=1: iteration k+1 samples with policy k-1 while iteration k trains
        loop.prepare(1, 0, a.threads)
        for k in range(1, a.iters + 1):
            training = loop.start(f"train-{k}", loop.train_cmd(k), 1)
            if k < a.iters:
                loop.prepare(k + 1, k - 1, 1)
            loop.wait(training)
    total = time.perf_counter() - start
    return {"seconds": round(total, 2), "prompts/s": a.prompts * a.iters / total, "stages": loop.seconds}


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

    start = time.perf_counter()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    rows = train_prompts(a.prompts * a.iters)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "reference": r["reference"]}
                              for r in rows])
    args = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="bench-trl-rl-loop-"),
                      per_device_train_batch_size=a.prompts * a.group, gradient_accumulation_steps=1,
                      max_steps=a.iters, num_generations=a.group, max_completion_length=a.max_new_tokens,
                      temperature=1.0, top_p=1.0, top_k=0, learning_rate=LR, lr_scheduler_type="constant",
                      weight_decay=0.0, max_grad_norm=1.0, beta=0.0, loss_type="grpo", epsilon=EPS,
                      scale_rewards="group", logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                      use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0, seed=0)
    peft = LoraConfig(r=LORA, lora_alpha=2 * LORA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                peft_config=peft).train()
    total = time.perf_counter() - start
    return {"seconds": round(total, 2), "prompts/s": a.prompts * a.iters / total}


def measure(quick: bool, threads: int, repeats: int) -> list[dict]:
    prompts, group, tokens, iters = (2, 4, 8, 3) if quick else (4, 8, 16, 3)
    args = ["--model", str(common.smollm2()), "--prompts", str(prompts), "--group", str(group),
            "--max-new-tokens", str(tokens), "--iters", str(iters)]
    common.WORK.mkdir(parents=True, exist_ok=True)
    sock = Path(tempfile.mkdtemp(prefix="bench-w-")) / "w" / "sock"
    worker_env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                  "PYTHONPATH": str(common.ROOT)}
    t = time.perf_counter()
    subprocess.run(_cmd("worker", "start", "--socket", sock), check=True, capture_output=True, env=worker_env)
    worker_start = round(time.perf_counter() - t, 2)
    extra = {"worker": ["--socket", str(sock)]}
    sides = {mode: (lambda mode=mode: common.worker("bench_rl_loop.py", ["--side", mode, *args,
                                                                         *extra.get(mode, [])], threads))
             for mode in ("sequential", "off-policy-1", "trl", "worker")}
    try:
        runs = common.alternate(sides, repeats)
    finally:
        subprocess.run(_cmd("worker", "stop", "--socket", sock), check=False, capture_output=True, env=worker_env)
    rate = {m: [r["prompts/s"] for r in runs[m]] for m in runs}
    out = []
    for mode in ("sequential", "off-policy-1", "worker"):
        out.append({"case": f"smollm2-lora-grpo-{iters}-iterations-{mode}",
                    "prompts/s": {"alignpipe": common.spread(rate[mode]), "trl": common.spread(rate["trl"])},
                    "ratio": common.ratios(rate[mode], rate["trl"]), "stages_s": runs[mode][-1]["stages"],
                    "vs_sequential": common.ratios(rate[mode], rate["sequential"]),
                    "answers_per_iteration": prompts * group, "iterations": iters,
                    "target": ">= 1.5x TRL with OFF_POLICY=1, >= 1.0x sequential", "load": common.load_average(),
                    **({"worker_start_s": worker_start} if mode == "worker" else {})})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--worker", action="store_true")
    p.add_argument("--side", choices=("sequential", "off-policy-1", "trl", "worker"))
    p.add_argument("--socket", help="the worker side: a running `alignpipe worker`'s socket")
    p.add_argument("--mode")
    p.add_argument("--model")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--iters", type=int, default=3)
    a = p.parse_args(argv)
    common.set_threads(a.threads)
    if a.worker:
        a.mode = a.side
        out = run_trl(a) if a.side == "trl" else run_alignpipe(a)
        print(json.dumps({**out, "peak_rss_mb": common.peak_rss_mb()}), flush=True)
        return 0
    for record in measure(a.quick, a.threads, a.repeats):
        common.emit(record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
