"""DPO training: alignpipe's `train` against TRL's DPOTrainer, pairs/s, tokens/s and peak RSS.

Both sides get the same model folder, the same token ids in the same batches (the `batches-pairwise`
dataset that `alignpipe build-batches` wrote, handed to TRL pre-tokenised in the same order with a
sequential sampler), float32, the same batch size, max length, thread count, AdamW with a constant
learning rate, beta 0.1, the sigmoid DPO loss on summed response log-probs. Reference log-probs:
  stored  alignpipe reads the ones `build-batches --reference` cached; TRL precomputes its own
          (`precompute_ref_log_probs=True`) before training;
  live    both run the reference forward at every step (tiny: a second model; SmolLM2: the initial policy,
          a frozen copy, or with LoRA the policy with its adapter disabled).
Steady state: wall time from the end of step `warmup` to the end of the last step (data, forward, backward,
optimizer, logging included). The loss at the first step must agree within 1e-5 and the mean chosen /
rejected log-probs within 1e-4 (relative), else the case is VOID.

    python bench/bench_train.py [--quick] [--threads 2] [--repeats 5] [--cases tiny-stored,...]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common

BETA, LR = 0.1, 1e-6


# ------------------------------------------------------------------------------------------- cases
def cases(quick: bool) -> dict[str, dict]:
    """name -> model, lora rank, reference mode, data sizes. Quick: the tiny model and a short LoRA case."""
    tiny = {"model": "tiny", "lora": 0, "pairs": 96 if quick else 384, "words": (10, 60), "batch_size": 8,
            "max_length": 256, "warmup": 2}
    smol = {"model": "smollm2", "pairs": 6 if quick else 12, "words": (15, 45), "batch_size": 2,
            "max_length": 128, "warmup": 1 if quick else 2}
    table = {"tiny-stored": {**tiny, "ref": "stored"}, "tiny-live": {**tiny, "ref": "live"},
             "smollm2-lora-stored": {**smol, "lora": 16, "ref": "stored"}}
    if not quick:
        table.update({"smollm2-lora-live": {**smol, "lora": 16, "ref": "live"},
                      "smollm2-full-stored": {**smol, "lora": 0, "ref": "stored"},
                      "smollm2-full-live": {**smol, "lora": 0, "ref": "live"}})
    return table


def prepare_case(name: str, case: dict) -> dict:
    """Model folders and the batches dataset (reference log-probs cached in it) of a case."""
    if case["model"] == "tiny":
        models = common.tiny_models()
        policy, reference = models["policy"], models["reference"]
    else:
        policy = reference = common.smollm2()
    data = f"{case['model']}-{case['pairs']}-{case['max_length']}-{case['batch_size']}"
    batches = common.preference_batches(data, policy, pairs=case["pairs"], words=case["words"],
                                        batch_size=case["batch_size"], max_length=case["max_length"],
                                        reference=reference)
    return {"policy": str(policy), "reference": str(reference), "batches": str(batches)}


# ------------------------------------------------------------------------------------------ workers
def step_clock(times: list, after=None):
    """Wrap alignpipe.training.loop.train_step to note the wall time at the end of every step; `after()` (a probe
    that bench_flops runs between steps) is timed apart and its seconds subtracted."""
    from alignpipe.training import loop as trainer

    inner = trainer.train_step
    lost = [0.0]

    def timed(*args, **kwargs):
        row = inner(*args, **kwargs)
        times.append((time.perf_counter() - lost[0], row["examples"], row["tokens"]))
        if after is not None:
            t = time.perf_counter()
            after()
            lost[0] += time.perf_counter() - t
        return row

    trainer.train_step = timed


def run_alignpipe(a, after=None) -> dict:
    """The real `alignpipe train` command, in this process, its steps timed from outside."""
    times: list = []
    step_clock(times, after)
    out = Path(tempfile.mkdtemp(prefix="bench-train-")) / "policy"
    reference = {"stored": "stored", "live": a.reference if a.model == "tiny" else "policy"}[a.ref]
    lora = ["--lora-r", str(a.lora)] if a.lora else []
    common.cli("train", a.batches, "--policy", a.policy, "--loss", "dpo", "--out", out, "--beta", BETA,
               "--lr", LR, "--scheduler", "constant", "--max-steps", a.steps, "--reference", reference,
               "--device", getattr(a, "device", None) or "cpu", "--dtype", getattr(a, "dtype", None) or "float32",
               *lora)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    return {"times": times, "loss": first["loss"], "chosen": first["logps/chosen"],
            "rejected": first["logps/rejected"]}


def trl_dataset(batches: str, steps: int, batch_size: int):
    """The batches as TRL's pre-tokenised columns, in batch order (rows of the first `steps` batches)."""
    from datasets import Dataset

    from alignpipe.data.io import read_input

    ds, _ = read_input(Path(batches), "batches-pairwise", stage="bench")
    keep = [i for i, b in enumerate(ds["batch_index"]) if b < steps]
    ds = ds.select(keep)
    sizes = [ds["batch_index"].count(b) for b in range(steps)]
    if any(s != batch_size for s in sizes):
        raise SystemExit(f"batch sizes {sizes}: TRL needs every batch full; choose pairs divisible by batch size")
    return Dataset.from_dict({"prompt_ids": ds["prompt_input_ids"], "chosen_ids": ds["response1_input_ids"],
                              "rejected_ids": ds["response2_input_ids"]})


def run_trl(a) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Pretokenised(DPOTrainer):
        first: ClassVar[dict] = {}

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # already the ids build-batches wrote

        def _compute_loss(self, model, inputs, return_outputs):
            loss = super()._compute_loss(model, inputs, return_outputs)
            if not self.first and model.training:
                m = self._metrics["train"]
                self.first.update(loss=float(loss), chosen=m["logps/chosen"][-1], rejected=m["logps/rejected"][-1])
            return loss

    times: list = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append((time.perf_counter(), a.batch_size, None))

    device, bf16 = getattr(a, "device", None) or "cpu", getattr(a, "dtype", None) == "bfloat16"

    def load(path):  # float32 weights; bf16: autocast over them (accelerate's mixed precision), as alignpipe
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.policy)
    model = load(a.policy)
    ref_model = load(a.reference) if a.model == "tiny" else None
    peft = None
    if a.lora:
        from peft import LoraConfig

        peft = LoraConfig(r=a.lora, lora_alpha=2 * a.lora, lora_dropout=0.0, target_modules="all-linear",
                          task_type="CAUSAL_LM")
    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="bench-trl-"), per_device_train_batch_size=a.batch_size,
                     learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
                     max_steps=a.steps, beta=BETA, loss_type=["sigmoid"], max_length=a.max_length,
                     precompute_ref_log_probs=a.ref == "stored", precompute_ref_batch_size=16,
                     train_sampling_strategy="sequential", logging_steps=10**6, save_strategy="no",
                     report_to="none", disable_tqdm=True, use_cpu=device == "cpu", bf16=bf16, fp16=False,
                     dataloader_num_workers=0, seed=0, remove_unused_columns=False)
    trainer = Pretokenised(model=model, ref_model=ref_model, args=args, processing_class=tok,
                           train_dataset=trl_dataset(a.batches, a.steps, a.batch_size), peft_config=peft,
                           callbacks=[Clock()])
    trainer.train()
    tokens = _trl_tokens(trainer.train_dataset, a.batch_size)
    times = [(t, n, tokens[i]) for i, (t, n, _) in enumerate(times)]
    return {"times": times, **Pretokenised.first}


def _trl_tokens(ds, batch_size: int) -> list[int]:
    """Real (unpadded) tokens of each sequential batch of the TRL dataset."""
    lengths = [len(p) * 2 + len(c) + len(r) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
    return [sum(lengths[i: i + batch_size]) for i in range(0, len(lengths), batch_size)]


def worker_main(a) -> None:
    common.set_threads(a.threads)
    import torch

    torch.set_num_threads(a.threads)
    common.quiet()
    result = run_alignpipe(a) if a.side == "alignpipe" else run_trl(a)
    times = result.pop("times")
    w = a.warmup
    seconds = times[-1][0] - times[w - 1][0]
    pairs = sum(n for _, n, _ in times[w:])
    tokens = sum(t for _, _, t in times[w:])
    common.emit({"side": a.side, "steps": len(times), "pairs/s": pairs / seconds, "tokens/s": tokens / seconds,
                 "seconds": seconds, "peak_rss_mb": common.peak_rss_mb(), **result})


# ------------------------------------------------------------------------------------------- driver
def agree(a: dict, b: dict) -> tuple[bool, dict]:
    d = {"loss": abs(a["loss"] - b["loss"]),
         "logps": max(abs(a[k] - b[k]) / max(1.0, abs(a[k])) for k in ("chosen", "rejected"))}
    return d["loss"] <= 1e-5 and d["logps"] <= 1e-4, {k: float(f"{v:.2e}") for k, v in d.items()}


def measure(name: str, case: dict, threads: int, repeats: int) -> dict:
    paths = prepare_case(name, case)
    steps = -(-case["pairs"] // case["batch_size"])
    args = ["--model", case["model"], "--lora", str(case["lora"]), "--ref", case["ref"], "--steps", str(steps),
            "--warmup", str(case["warmup"]), "--batch-size", str(case["batch_size"]),
            "--max-length", str(case["max_length"]), "--policy", paths["policy"], "--reference",
            paths["reference"], "--batches", paths["batches"]]
    load = common.load_average()
    runs = common.alternate({side: (lambda s=side: common.worker("bench_train.py", ["--side", s, *args], threads))
                             for side in ("alignpipe", "trl")}, repeats)
    ours, theirs = runs["alignpipe"], runs["trl"]
    ok, diff = agree(ours[0], theirs[0])
    record = {"bench": "train", "case": name, "threads": threads, "repeats": repeats, "load": load,
              "load_after": common.load_average(), "batch_size": case["batch_size"], "pairs": case["pairs"],
              "steps_timed": steps - case["warmup"], "max_length": case["max_length"], "valid": ok,
              "first_step": {"alignpipe": {k: ours[0][k] for k in ("loss", "chosen", "rejected")},
                             "trl": {k: theirs[0][k] for k in ("loss", "chosen", "rejected")}, "diff": diff}}
    for key in ("pairs/s", "tokens/s", "peak_rss_mb"):
        record[key] = {"alignpipe": common.spread([r[key] for r in ours]),
                       "trl": common.spread([r[key] for r in theirs])}
    record["ratio"] = common.ratios([r["pairs/s"] for r in ours], [r["pairs/s"] for r in theirs])
    record["rss_ratio"] = common.ratios([r["peak_rss_mb"] for r in ours], [r["peak_rss_mb"] for r in theirs])
    target = 2.0 if case["ref"] == "stored" else 1.5
    record["target"] = f"pairs/s >= {target}x TRL, peak RSS <= 0.8x TRL"
    record["met"] = ok and record["ratio"]["median"] >= target and record["rss_ratio"]["median"] <= 0.8
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None, help="default 3 quick, 5 full")
    p.add_argument("--cases", default=None, help="comma-separated subset of the case names")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for opt in ("side", "model", "ref", "policy", "reference", "batches"):
        p.add_argument(f"--{opt}", help=argparse.SUPPRESS)
    for opt in ("lora", "steps", "warmup", "batch-size", "max-length"):
        p.add_argument(f"--{opt}", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker_main(a)
        return 0
    common.set_threads(a.threads)
    repeats = a.repeats or (3 if a.quick else 5)
    table = cases(a.quick)
    for name in (a.cases.split(",") if a.cases else table):
        common.emit(measure(name, table[name], a.threads, repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
