"""The GPU benchmark (issue 18): alignpipe on CUDA against TRL and transformers, in one command, no download.

    python bench/bench_gpu.py --tokenizer DIR            # make bench-gpu: SmolLM2-360M and -1.7B shapes, CUDA
    python bench/bench_gpu.py --tiny                     # the same on tiny shapes, CPU, in about a minute

Per model shape (random initialisation built on the spot, float32 weights, the SmolLM2 tokenizer from
`--tokenizer DIR`: tokenizer.json, tokenizer_config.json, special_tokens_map.json; `--tiny`: the test models'):
1. the five stages as processes on the device: generate (prompts of pipelines/data/prompts.jsonl, 2 answers),
   annotate (`length`), reweight (importance against the policy: a forward), build-batches (reference cached
   with --dtype), train (DPO): wall seconds and the stage's own rate;
2. DPO training, alignpipe `train` against TRL's DPOTrainer on the very batches build-batches wrote (the same
   token ids, batches and order, bf16 autocast over float32 weights on both sides), stored and live
   reference (the policy as reference): pairs/s in steady state; the first-step losses must agree within
   1e-4, else VOID; each side in a fresh worker process (bench/bench_train.py's workers);
3. generate's sampler (dynamic KV cache, and the static one of alignpipe.sampling.static_decode) against transformers'
   `generate` on the same prompts, batch, samples and max new tokens: generated tokens/s;
4. MFU: training model FLOP/s (6 x parameters x real tokens; + 2 x for a live reference) over a measured
   bf16 matrix-product peak (float32 on the CPU);
5. a torch.profiler table of one training step and of one decode step, so the first GPU run shows where the
   time goes.
Prints a table and writes bench/results/gpu-<shapes>.jsonl (gpu-tiny.jsonl with --tiny).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import bench_train
import common

SMOLLM2 = {  # LlamaConfig fields of the SmolLM2 checkpoints (HuggingFaceTB/SmolLM2-*/config.json)
    "360m": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15,
             "num_key_value_heads": 5, "max_position_embeddings": 8192, "rope_theta": 100000.0},
    "1.7b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
             "num_key_value_heads": 32, "max_position_embeddings": 8192, "rope_theta": 130000.0},
}
TINY = {"tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "max_position_embeddings": 512}}
FULL = {"prompts": 128, "new_tokens": 128, "batch_size": 8, "max_length": 768, "gen_batch": 64, "warmup": 2}
BY_SHAPE = {"1.7b": {"prompts": 256, "batch_size": 64, "warmup": 1}}  # MFU target: >= 16k tokens a step
SMALL = {"prompts": 12, "new_tokens": 8, "batch_size": 4, "max_length": 256, "gen_batch": 4, "warmup": 1}


# ------------------------------------------------------------------------------------------- set-up
def tokenizer_dir(given: str | None, tiny: bool) -> Path:
    if given:
        return Path(given)
    if tiny:
        return common.tiny_models()["tokenizer"]
    return common.smollm2()  # the converted SmolLM2-135M folder: the same tokenizer as every SmolLM2


def build_model(shape: str, config: dict, tok: Path, work: Path) -> Path:
    from alignpipe.testing import build_random_lm

    out = work / f"model-{shape}"
    if not (out / "config.json").exists():
        build_random_lm(out, tok, seed=0, **config)
    return out


def stage(name: str, device: str, *args) -> dict:
    """`alignpipe NAME ARGS` as its own process on `device`; wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(common.ROOT)}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "alignpipe", name, *map(str, args)], env=env, capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"alignpipe {name} failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    return {"stage": name, "seconds": round(time.perf_counter() - start, 2)}


def pipeline(model: Path, work: Path, a, sizes: dict) -> tuple[list[dict], Path]:
    """The five stages as processes; returns their timings and the batches folder (reference cached)."""
    from alignpipe.data.manifest import read_manifest

    d, dev, dt = work / "run", a.device, a.dtype
    work.mkdir(parents=True, exist_ok=True)
    src = work / "prompts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in common.prompts(sizes["prompts"])))
    rows = [stage("import", "cpu", src, "--out", d / "prompts", "--force")]
    rows.append(stage("generate", dev, d / "prompts", "--policy", model, "--num-samples", 2, "--max-new-tokens",
                      sizes["new_tokens"], "--batch-size", sizes["gen_batch"], "--dtype", dt, "--device", dev,
                      "--out", d / "gens", "--force"))
    rows[-1]["tokens/s"] = read_manifest(d / "gens")["report"].get("tokens_per_s")
    rows.append(stage("annotate", dev, d / "gens", "--annotator", "length", "--device", dev, "--out", d / "ann",
                      "--force"))
    rows.append(stage("reweight", dev, d / "ann", "-s", f"importance:{model},clip=5", "--device", dev, "--dtype",
                      dt, "--out", d / "weighted", "--force"))
    rows.append(stage("build-batches", dev, d / "weighted", "--task", "pairwise", "--tokenizer", model,
                      "--reference", model, "--dtype", dt, "--device", dev, "--batch-size", sizes["batch_size"],
                      "--max-length", sizes["max_length"], "--max-prompt-length", sizes["max_length"] // 2, "--out",
                      d / "batches", "--force"))
    rows.append(stage("train", dev, d / "batches", "--policy", model, "--loss", "dpo", "--dtype", dt, "--device",
                      dev, "--lr", 1e-6, "--out", d / "policy", "--force"))
    first = json.loads((d / "policy" / "metrics.jsonl").read_text().splitlines()[0])
    rows[-1].update({"first_loss": first["loss"], "tokens/s": read_manifest(d / "policy")["report"].get("tokens/s")})
    return rows, d / "batches"


def full_batches(batches: Path, batch_size: int) -> int:
    """How many leading stored batches are full (TRL's sequential sampler needs equal batches)."""
    from alignpipe.data.io import read_input

    sizes: dict[int, int] = {}
    for b in read_input(batches, "batches-pairwise", stage="bench")[0]["batch_index"]:
        sizes[b] = sizes.get(b, 0) + 1
    n = 0
    while sizes.get(n) == batch_size:
        n += 1
    return n


# ------------------------------------------------------------------------------------------ training
def params_of(model: Path) -> int:
    """Parameters of the model folder (tied embeddings counted once, as stored)."""
    import math

    from safetensors import safe_open

    total = 0
    for f in model.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            total += sum(math.prod(h.get_slice(k).get_shape()) for k in h.keys())  # noqa: SIM118 (safe_open has no __iter__)
    return total


def train_case(ref: str, model: Path, batches: Path, a, sizes: dict, trl_ok: bool) -> dict:
    steps = full_batches(batches, sizes["batch_size"])
    args = ["--model", "random", "--lora", "0", "--ref", ref, "--steps", str(steps), "--warmup", str(sizes["warmup"]),
            "--batch-size", str(sizes["batch_size"]), "--max-length", str(sizes["max_length"]), "--policy",
            str(model), "--reference", str(model), "--batches", str(batches), "--device", a.device, "--dtype",
            a.dtype] + (["--profile"] if ref == "stored" else [])
    ours = common.worker("bench_gpu.py", ["--side", "alignpipe", *args], a.threads)
    record = {"bench": "gpu-train", "ref": ref, "steps": steps, "alignpipe": ours}
    if not trl_ok:
        record.update(trl="TRL not installed (pip install -e '.[bench]')", valid=None)
        return record
    theirs = common.worker("bench_gpu.py", ["--side", "trl", *args], a.threads)
    diff = abs(ours["loss"] - theirs["loss"])
    record.update(trl=theirs, loss_diff=diff, valid=diff <= 1e-4, ratio=ours["pairs/s"] / theirs["pairs/s"])
    return record


def train_worker(a) -> dict:
    """One side of a training case (bench_train's workers, on a.device with a.dtype); alignpipe: a profile of
    its second step with --profile."""
    if a.side == "alignpipe":
        result = bench_train.run_alignpipe(a, after=None) if not a.profile else _profiled_alignpipe(a)
    else:
        result = bench_train.run_trl(a)
    times = result.pop("times")
    w = min(a.warmup, len(times) - 1)
    seconds = times[-1][0] - times[w - 1][0] if w else times[-1][0] - times[0][0]
    pairs = sum(n for _, n, _ in times[w:])
    tokens = sum(t for _, _, t in times[w:])
    return {"side": a.side, "steps": len(times), "pairs/s": pairs / seconds, "tokens/s": tokens / seconds,
            "seconds": seconds, **result}


def _profiled_alignpipe(a) -> dict:
    """bench_train.run_alignpipe with its last warm-up step (outside the timed ones) under torch.profiler."""
    from alignpipe.training import loop as trainer

    inner, calls, table = trainer.train_step, [0], {}

    def step(*args, **kwargs):
        calls[0] += 1
        if calls[0] != a.warmup:
            return inner(*args, **kwargs)
        with profiler(a.device) as prof:
            row = inner(*args, **kwargs)
        table["profile"] = profile_table("training step", prof, a.device)
        return row

    trainer.train_step = step
    return {**bench_train.run_alignpipe(a), **table}


def profiler(device: str):
    import torch.profiler as tp

    acts = [tp.ProfilerActivity.CPU] + ([tp.ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    return tp.profile(activities=acts)


def profile_table(what: str, prof, device: str) -> str:
    key = "cuda_time_total" if device.startswith("cuda") else "cpu_time_total"
    return f"== profile of one {what} ({device}) ==\n" + prof.key_averages().table(sort_by=key, row_limit=15)


# ------------------------------------------------------------------------------------------ sampling
def generate_worker(a) -> dict:
    """alignpipe's sampler (dynamic and static KV cache) and transformers' generate on the same prompts and batch,
    alternating after a warm-up; a profile of one decode step."""
    import torch

    from alignpipe.models.loading import load_causal_lm, load_tokenizer
    from alignpipe.sampling.engine import Sampler, SamplingParams, eos_token_ids
    from alignpipe.sampling.static_decode import StaticSampler

    dtype = "bfloat16" if a.device.startswith("cuda") and a.dtype == "bfloat16" else "float32"
    tok, model = load_tokenizer(a.policy), load_causal_lm(a.policy, dtype=dtype, device=a.device).eval()
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": p["prompt"]}], tokenize=False,
                                           add_generation_prompt=True), add_special_tokens=False)["input_ids"]
               for p in common.prompts(a.batch_size)]
    params = SamplingParams(num_samples=2, max_new_tokens=a.steps)
    eos = eos_token_ids(tok, model.generation_config)
    sides = {"dynamic": Sampler(model, tok, params), "static": StaticSampler(model, tok, params)}

    def ours(name):
        return lambda seed: sum(len(s.token_ids) for s in sides[name].sample(prompts, seed=seed))

    def theirs(seed):
        torch.manual_seed(seed)
        ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(p[::-1]) for p in prompts], batch_first=True,
                                              padding_value=tok.pad_token_id).flip(1).to(a.device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), do_sample=True,
                                 num_return_sequences=2, max_new_tokens=a.steps, top_k=0, top_p=1.0,
                                 eos_token_id=eos, pad_token_id=tok.pad_token_id)
        return sum(next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
                   for row in out[:, ids.shape[1]:].tolist())

    runs = {"dynamic": ours("dynamic"), "static": ours("static"), "transformers": theirs}
    rates: dict = {k: [] for k in runs}
    for rep in range(a.repeats + 1):  # the first round warms up
        for name, fn in runs.items():
            sync(a.device)
            start = time.perf_counter()
            tokens = fn(rep)
            sync(a.device)
            if rep:
                rates[name].append(tokens / (time.perf_counter() - start))
    return {"side": "generate", "tok/s": {k: common.spread(v, 1) for k, v in rates.items()},
            "prompts": len(prompts), "in_flight": 2 * len(prompts), "dtype": dtype,
            "profile": _profile_decode(sides["dynamic"], prompts, a.device)}


def _profile_decode(sampler, prompts, device: str) -> str:
    """Profile the 5th one-token forward of a sampling run (a decode step in steady state)."""
    real, calls, table = sampler._forward, [0], [""]

    def forward(ids, *args, **kwargs):
        if ids.shape[1] == 1:
            calls[0] += 1
        if calls[0] != 5 or ids.shape[1] != 1:
            return real(ids, *args, **kwargs)
        with profiler(device) as prof:
            out = real(ids, *args, **kwargs)
            sync(device)
        table[0] = profile_table("decode step", prof, device)
        return out

    sampler._forward = forward
    sampler.sample(prompts, seed=0)
    sampler._forward = real
    return table[0]


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------ MFU
def matmul_peak(device: str, dtype: str, n: int) -> float:
    """FLOP/s of an (n x n) @ (n x n) product in `dtype` (bf16 on CUDA), best of 10 timed after warm-up."""
    import torch

    dt = torch.bfloat16 if dtype == "bfloat16" and device.startswith("cuda") else torch.float32
    x, y = (torch.randn(n, n, device=device, dtype=dt) for _ in range(2))
    best = float("inf")
    for i in range(13):
        sync(device)
        start = time.perf_counter()
        for _ in range(5):
            x @ y
        sync(device)
        if i >= 3:
            best = min(best, (time.perf_counter() - start) / 5)
    return 2 * n ** 3 / best


# ------------------------------------------------------------------------------------------ driver
def trl_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def run_shape(shape: str, config: dict, a, sizes: dict, tok: Path, work: Path, peak: float) -> list[dict]:
    model = build_model(shape, config, tok, work)
    n = params_of(model)
    out = []
    if a.generate_only:  # the sampler against transformers alone: the part that fits a short GPU lease
        refs = ()
    else:
        stages, batches = pipeline(model, work / shape, a, sizes)
        out.append({"bench": "gpu-stages", "shape": shape, "params": n, "stages": stages})
        refs = ("stored", "live")
    trl_ok = trl_installed()
    for ref in refs:
        r = train_case(ref, model, batches, a, sizes, trl_ok)
        ours = r["alignpipe"]
        flops = (6 + (2 if ref == "live" else 0)) * n * ours["tokens/s"]
        out.append({**r, "shape": shape, "train_flop/s": flops, "mfu": flops / peak, "peak_flop/s": peak,
                    "tokens/step": round(ours["tokens/s"] / ours["pairs/s"] * sizes["batch_size"])})
    gen = common.worker("bench_gpu.py", ["--side", "generate", "--policy", str(model), "--batch-size",
                                         str(sizes["gen_batch"]), "--steps", str(sizes["new_tokens"]), "--device",
                                         a.device, "--dtype", a.dtype, "--repeats", str(a.repeats)], a.threads)
    out.append({"bench": "gpu-generate", "shape": shape, **gen})
    return out


def table(records: list[dict]) -> str:
    lines = ["shape | measure | alignpipe | peer | ratio", "---|---|---|---|---"]
    for r in records:
        if r["bench"] == "gpu-stages":
            lines += [f"{r['shape']} | stage {s['stage']} | {s['seconds']} s"
                      + (f", {s['tokens/s']:.0f} tok/s" if s.get("tokens/s") else "") + " | | " for s in r["stages"]]
        elif r["bench"] == "gpu-train":
            ours = r["alignpipe"]
            if r["valid"] is None:
                peer, ratio = r["trl"], ""
            else:
                peer = f"TRL {r['trl']['pairs/s']:.2f} pairs/s (first loss {r['trl']['loss']:.6f})"
                ratio = f"{r['ratio']:.2f}x" if r["valid"] else f"VOID (first losses differ by {r['loss_diff']:.1e})"
            lines.append(f"{r['shape']} | DPO {r['ref']} reference, {r['tokens/step']} tokens a step | "
                         f"{ours['pairs/s']:.2f} pairs/s (first loss {ours['loss']:.6f}), MFU {r['mfu']:.1%} | "
                         f"{peer} | {ratio}")
        elif r["bench"] == "gpu-generate":
            t = r["tok/s"]
            for side in ("dynamic", "static"):
                lines.append(f"{r['shape']} | generate {r['in_flight']} in flight, {side} cache | "
                             f"{t[side]['median']:.0f} tok/s | transformers {t['transformers']['median']:.0f} tok/s | "
                             f"{t[side]['median'] / t['transformers']['median']:.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (float32), few steps: the test")
    p.add_argument("--tokenizer", default=None, help="SmolLM2 tokenizer folder (default: converted SmolLM2)")
    p.add_argument("--shapes", default=None, help="comma list of 360m, 1.7b [default: both; --tiny: tiny]")
    p.add_argument("--device", default=None, help="cuda | cpu [default: cuda; --tiny: cpu]")
    p.add_argument("--dtype", default=None, help="bfloat16 | float32 [default: bfloat16; --tiny: float32]")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None, help="timed sampling rounds [default: 2; --tiny: 1]")
    p.add_argument("--train-batch", type=int, default=None, help="pairs a training step [default: 8; 1.7b: 64]")
    p.add_argument("--out", default=None, help="results file [default: bench/results/gpu-<shapes>.jsonl]")
    p.add_argument("--generate-only", action="store_true",
                   help="only generate against transformers (skips the stage processes and training)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    for opt in ("side", "model", "ref", "policy", "reference", "batches"):
        p.add_argument(f"--{opt}", help=argparse.SUPPRESS)
    for opt in ("lora", "steps", "warmup", "batch-size", "max-length"):
        p.add_argument(f"--{opt}", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.device = a.device or ("cpu" if a.tiny else "cuda")
    a.dtype = a.dtype or ("float32" if a.tiny else "bfloat16")
    a.repeats = a.repeats or (1 if a.tiny else 2)
    common.set_threads(a.threads)
    if a.worker:
        common.quiet()
        common.emit(generate_worker(a) if a.side == "generate" else train_worker(a))
        return 0
    shapes = TINY if a.tiny else {k: SMOLLM2[k] for k in (a.shapes.split(",") if a.shapes else SMOLLM2)}
    sizes, start = (SMALL if a.tiny else FULL), time.time()
    work = common.WORK / ("gpu-tiny" if a.tiny else "gpu")
    tok = tokenizer_dir(a.tokenizer, a.tiny)
    peak = matmul_peak(a.device, a.dtype, 512 if a.tiny else 8192)
    records = []
    for shape, config in shapes.items():
        size = {**sizes, **({} if a.tiny else BY_SHAPE.get(shape, {}))}
        size["batch_size"] = a.train_batch or size["batch_size"]
        records += run_shape(shape, config, a, size, tok, work, peak)
    meta = {"bench": "meta", "device": a.device, "dtype": a.dtype, "peak_flop/s": peak, "sizes": sizes,
            "seconds": round(time.time() - start, 1), "trl": trl_installed(), "gpu": _gpu_name(a.device)}
    out = Path(a.out) if a.out else HERE / "results" / f"gpu-{'-'.join(shapes)}.jsonl"
    out.parent.mkdir(exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in records + [meta]))
    print(table(records))
    for r in records:
        text = (r.get("alignpipe") or {}).get("profile") or r.get("profile")
        if text:
            print(f"\n[{r['shape']}] {text}")
    print(f"\n{meta['seconds']:.0f} s on {meta['gpu']}; matmul peak {peak / 1e12:.2f} TFLOP/s ({a.dtype}); "
          f"results: {out}")
    return 0


def _gpu_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"


if __name__ == "__main__":
    raise SystemExit(main())
