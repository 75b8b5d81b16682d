"""The online loop end to end: prompts/s of one iteration through the stage commands against TRL's
OnlineDPOTrainer.

alignpipe: the five commands of `pipelines/online.mk`, each its own process as a Makefile runs them
(start-up, model loading and dataset writing included): generate (2 answers per prompt), annotate (the
reward model), reweight (constant), build-batches (pairwise, reference log-probs cached once),
train (DPO, one pass). TRL: one process that loads the policy and the reward model, runs OnlineDPOTrainer
for the same prompts (2 answers per prompt per step, the same reward model as its reward function, so the
reward costs the same), and saves the policy. Both: the same policy, prompts (chat template), max new
tokens, temperature 1 (no top-k / top-p), batch size (prompts per optimisation step), beta, learning rate,
full fine-tuning with the initial policy as reference, and threads. Wall time from the first process start
to the trained policy on disk; TRL's `train()` alone is reported too, and so is alignpipe with the same five
commands run one after the other in one process (`one-process`: imports and start-up paid once, as a
resident runner would), and the five commands as processes run by a resident worker (`worker`: `alignpipe
worker start` once per case, its start-up reported apart as `worker_start_s`; models it cached in an earlier
repeat stay warm, as the reward model and the reference do across the iterations of a run).

    python bench/bench_loop.py [--quick] [--threads 2] [--repeats 5]
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

BETA, LR = 0.1, 1e-6


def prompts_file(n: int) -> Path:
    path = common.WORK / "loop" / f"prompts-{n}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({**p, "split": "train"}) + "\n" for p in common.prompts(n)))
    return path


def stage_commands(c: dict, run: Path) -> dict[str, list]:
    """The iteration of pipelines/online.mk: stage name -> alignpipe arguments."""
    n = str(c["batch_size"])
    return {
        "generate": ["generate", run / "prompts", "--policy", c["policy"], "--out", run / "generations",
                     "--num-samples", "2", "--max-new-tokens", c["max_new_tokens"], "--temperature", "1.0",
                     "--batch-size", n, "--seed", "0", "--device", "cpu"],
        "annotate": ["annotate", run / "generations", "--annotator", f"reward-model:{c['reward']}",
                     "--pairing", "all", "--out", run / "annotations"],
        "reweight": ["reweight", run / "annotations", "--strategy", "constant", "--out", run / "weighted"],
        "build-batches": ["build-batches", run / "weighted", "--task", "pairwise", "--tokenizer", c["policy"],
                          "--reference", c["policy"], "--batch-size", n, "--out", run / "batches", "--device", "cpu"],
        "train": ["train", run / "batches", "--policy", c["policy"], "--loss", "dpo", "--beta", BETA, "--lr", LR,
                  "--scheduler", "constant", "--reference", "stored", "--out", run / "policy", "--device", "cpu"],
    }


def stage_env(threads: int, worker: Path | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(common.ROOT)}
    env.pop("ALIGNPIPE_WORKER", None)
    return {**env, "ALIGNPIPE_WORKER": str(worker)} if worker else env


def alignpipe_iteration(c: dict, threads: int, worker: Path | None = None) -> dict:
    """The five stage commands as processes (as `make` runs them); wall seconds of each and in all. With
    `worker` (a running `alignpipe worker`'s socket) the same commands, run by the worker."""
    run = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    env = stage_env(threads, worker)
    ap = [sys.executable, "-m", "alignpipe"]
    subprocess.run(ap + ["import", c["prompts"], "--out", run / "prompts"], check=True, capture_output=True, env=env)
    seconds = {}
    for name, args in stage_commands(c, run).items():
        t = time.perf_counter()
        done = subprocess.run(ap + [str(x) for x in args], check=False, capture_output=True, text=True, env=env)
        seconds[name] = time.perf_counter() - t
        if done.returncode != 0:
            raise RuntimeError(f"alignpipe {name} failed:\n{done.stderr[-2000:]}")
    pairs = json.loads((run / "batches" / "manifest.json").read_text())["num_rows"]
    return {"seconds": sum(seconds.values()), "stages": seconds, "pairs": pairs}


def inprocess_worker(a) -> None:
    """The same five commands run one after the other in this one process (imports paid once)."""
    c = {"policy": a.policy, "reward": a.reward, "batch_size": a.batch_size, "max_new_tokens": a.max_new_tokens}
    run = Path(a.out)
    common.set_threads(a.threads)
    import torch

    torch.set_num_threads(a.threads)
    common.cli("import", a.prompts, "--out", run / "prompts")
    for args in stage_commands(c, run).values():
        common.cli(*args)
    common.emit({"done": True})


def inprocess_iteration(c: dict, threads: int) -> dict:
    t = time.perf_counter()
    common.worker("bench_loop.py", ["--side", "inprocess", "--policy", c["policy"], "--reward", c["reward"],
                                    "--prompts", c["prompts"], "--batch-size", str(c["batch_size"]),
                                    "--max-new-tokens", str(c["max_new_tokens"]),
                                    "--out", tempfile.mkdtemp(prefix="bench-loop-one-")], threads)
    return {"seconds": time.perf_counter() - t}


def trl_worker(a) -> None:
    """One OnlineDPOTrainer run in this process (timed by the driver from outside as well)."""
    common.set_threads(a.threads)
    import torch

    torch.set_num_threads(a.threads)
    common.quiet()
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    tok = AutoTokenizer.from_pretrained(a.policy)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(a.policy, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(a.reward, num_labels=1, dtype=torch.float32)
    reward_tok = AutoTokenizer.from_pretrained(a.reward)
    rows = [json.loads(line) for line in Path(a.prompts).read_text().splitlines()]
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows])
    args = OnlineDPOConfig(output_dir=a.out, per_device_train_batch_size=a.batch_size, learning_rate=LR,
                           lr_scheduler_type="constant", beta=BETA, loss_type="sigmoid",
                           max_new_tokens=a.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                           num_train_epochs=1, save_strategy="no", report_to="none", disable_tqdm=True,
                           logging_steps=10**6, use_cpu=True, bf16=False, fp16=False, seed=0,
                           dataloader_num_workers=0)
    trainer = OnlineDPOTrainer(model=model, reward_funcs=[reward], reward_processing_classes=[reward_tok],
                               args=args, train_dataset=ds, processing_class=tok)
    t = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t
    trainer.save_model(a.out)
    common.emit({"train_seconds": train_s, "prompts": len(rows)})


def trl_iteration(c: dict, threads: int) -> dict:
    out = tempfile.mkdtemp(prefix="bench-loop-trl-")
    t = time.perf_counter()
    r = common.worker("bench_loop.py", ["--side", "trl", "--policy", c["policy"], "--reward", c["reward"], "--prompts", c["prompts"],
                                        "--batch-size", str(c["batch_size"]), "--max-new-tokens",
                                        str(c["max_new_tokens"]), "--out", out], threads)
    return {"seconds": time.perf_counter() - t, "train_seconds": r["train_seconds"]}


def start_worker(threads: int) -> tuple[Path, float]:
    """A resident worker (`alignpipe worker start`) for the `worker` side: its socket and start-up seconds."""
    sock = Path(tempfile.mkdtemp(prefix="bench-w-")) / "w" / "sock"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "alignpipe", "worker", "start", "--socket", str(sock)], check=True,
                   capture_output=True, env=stage_env(threads))
    return sock, time.perf_counter() - t


def measure(name: str, c: dict, threads: int, repeats: int) -> dict:
    load = common.load_average()
    sock, worker_start = start_worker(threads)
    try:
        runs = common.alternate({"alignpipe": lambda: alignpipe_iteration(c, threads),
                                 "trl": lambda: trl_iteration(c, threads),
                                 "one-process": lambda: inprocess_iteration(c, threads),
                                 "worker": lambda: alignpipe_iteration(c, threads, sock)}, repeats)
    finally:
        subprocess.run([sys.executable, "-m", "alignpipe", "worker", "stop", "--socket", str(sock)], check=False,
                       capture_output=True, env=stage_env(threads))
    n = c["num_prompts"]
    ours = [n / r["seconds"] for r in runs["alignpipe"]]
    theirs = [n / r["seconds"] for r in runs["trl"]]
    one = [n / r["seconds"] for r in runs["one-process"]]
    warm = [n / r["seconds"] for r in runs["worker"]]
    stages = {k: common.spread([r["stages"][k] for r in runs["alignpipe"]], 2) for k in runs["alignpipe"][0]["stages"]}
    return {"bench": "loop", "case": name, "threads": threads, "repeats": repeats, "load": load,
            "load_after": common.load_average(), "prompts": n, "batch_size": c["batch_size"],
            "max_new_tokens": c["max_new_tokens"], "pairs_trained": runs["alignpipe"][0]["pairs"],
            "prompts/s": {"alignpipe": common.spread(ours), "trl": common.spread(theirs),
                          "alignpipe_one_process": common.spread(one), "alignpipe_worker": common.spread(warm)},
            "ratio_one_process": common.ratios(one, theirs), "ratio_worker": common.ratios(warm, theirs),
            "worker_vs_one_process": common.ratios(warm, one), "worker_start_s": round(worker_start, 2),
            "worker_stage_seconds": {k: common.spread([r["stages"][k] for r in runs["worker"]], 2)
                                     for k in runs["worker"][0]["stages"]},
            "trl_train_only_prompts/s": common.spread([n / r["train_seconds"] for r in runs["trl"]]),
            "alignpipe_stage_seconds": stages, "ratio": common.ratios(ours, theirs),
            "target": "prompts/s >= 1.5x OnlineDPOTrainer, stage overheads included",
            "met": common.ratios(ours, theirs)["median"] >= 1.5}


def cases(quick: bool) -> dict:
    tiny = common.tiny_models()
    table = {"tiny": {"policy": str(tiny["policy"]), "reward": str(tiny["reward"]), "num_prompts": 32 if quick else 64,
                      "batch_size": 8, "max_new_tokens": 32}}
    if not quick:
        table["smollm2"] = {"policy": str(common.smollm2()), "reward": str(tiny["reward"]), "num_prompts": 24,
                            "batch_size": 8, "max_new_tokens": 32}
    for c in table.values():
        c["prompts"] = str(prompts_file(c["num_prompts"]))
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--cases", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for opt in ("side", "policy", "reward", "prompts", "out"):
        p.add_argument(f"--{opt}", help=argparse.SUPPRESS)
    for opt in ("batch-size", "max-new-tokens"):
        p.add_argument(f"--{opt}", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        (trl_worker if a.side == "trl" else inprocess_worker)(a)
        return 0
    common.set_threads(a.threads)
    repeats = a.repeats or (3 if a.quick else 5)
    table = cases(a.quick)
    for name in (a.cases.split(",") if a.cases else table):
        common.emit(measure(name, table[name], a.threads, repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
