"""train under several processes (gloo on the CPU): 2 processes == 1 process with the same global batch.

Stored batches of uneven sizes (3, 2, 1 examples: the last leaves rank 1 empty) with unequal weights and
--grad-accum 2 exercise the rank slices, the weight-0 padding and the weighted normalisation across
micro-batches and processes.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import losses_of, pairs, task_examples, train, write_batches

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                                reason="torchrun not installed")


def _uneven(examples: list[dict]) -> list[dict]:
    sizes = [3, 2, 1] * (len(examples) // 6)
    index = [b for b, n in enumerate(sizes) for _ in range(n)]
    weights = [0.5, 2.0, 1.0, 3.0, 0.0, 1.5]
    return [{**e, "batch_index": b, "w1": weights[i % 6], "w2": weights[i % 6]}
            for i, (e, b) in enumerate(zip(examples, index))]


def _launch(args: list, launcher: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*launcher, "-m", "alignpipe", "train", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (children first found through /proc)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(parents.get(p, []))
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _torchrun() -> list[str]:
    return [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]


def _accelerate(config: str) -> list[str]:
    return [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
            str(ROOT / "pipelines" / "accelerate" / config), "--num_processes", "2", "--main_process_port", "0"]


def _assert_same_policy(a: Path, b: Path, atol: float = 1e-4) -> None:
    """Weights within 1e-4 (1% of one step at lr 1e-2: Adam's g / (|g| + eps) turns float32 summation-order
    differences of gradient entries near 0 into weight differences up to lr) and losses within 1e-6."""
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert set(wa) == set(wb)
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= atol, worst
    la, lb = losses_of(a), losses_of(b)
    assert len(la) == len(lb) and max(abs(x - y) for x, y in zip(la, lb)) <= 1e-6


def test_ddp_two_processes_equal_one_and_resume_after_a_kill(tmp_path, tiny_lm_dir):
    b = write_batches(tmp_path / "b", "pairwise", _uneven(pairs(12)), tiny_lm_dir)
    common = ["--policy", tiny_lm_dir, "--loss", "dpo", "--lr", "1e-2", "--grad-accum", "2", "--device", "cpu"]
    code, out = train(b, "--out", tmp_path / "one", *common)
    assert code == 0, out
    two = [b, "--out", tmp_path / "two", *common, "--save-every", "1", "--sharding", "none"]
    proc = _launch(two, _torchrun())
    partial, deadline = tmp_path / ".two.partial", time.time() + 120
    while not (partial / "checkpoint-000001").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    _kill_tree(proc.pid)  # the launcher and both workers (torchrun starts them in their own sessions)
    proc.wait()
    assert not (tmp_path / "two").exists()
    rerun = _launch(two, _torchrun())
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert "2 process(es)" in err and "resuming after step 1" in err
    _assert_same_policy(tmp_path / "one", tmp_path / "two")
    report = json.loads((tmp_path / "two" / "manifest.json").read_text())["report"]
    assert report["processes"] == 2 and report["resumed_from_step"] == 1


def test_fsdp_under_accelerate_launch_equals_one_process_kto(tmp_path, tiny_lm_dir):
    """accelerate launch with pipelines/accelerate/fsdp.yaml: sharded weights, KTO's z0 over both ranks."""
    b = write_batches(tmp_path / "b", "pointwise", _uneven(task_examples("pointwise", 6)), tiny_lm_dir)
    common = ["--policy", tiny_lm_dir, "--loss", "kto", "--lr", "1e-2", "--grad-accum", "2", "--device", "cpu"]
    code, out = train(b, "--out", tmp_path / "one", *common)
    assert code == 0, out
    proc = _launch([b, "--out", tmp_path / "two", *common], _accelerate("fsdp.yaml"))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "2 process(es), sharding full" in err
    _assert_same_policy(tmp_path / "one", tmp_path / "two")


def test_sharding_mode_reads_the_accelerate_environment():
    from alignpipe.training.loop import sharding_mode

    assert sharding_mode("auto", {}) == "none"
    assert sharding_mode("auto", {"ACCELERATE_USE_FSDP": "true", "FSDP_RESHARD_AFTER_FORWARD": "true"}) == "full"
    assert sharding_mode("auto", {"ACCELERATE_USE_FSDP": "true", "FSDP_RESHARD_AFTER_FORWARD": "false"}) == "grad-op"
    assert sharding_mode("auto", {"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}) == "grad-op"
    assert sharding_mode("auto", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}) == "grad-op"
    assert sharding_mode("auto", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}) == "full"
    assert sharding_mode("none", {"ACCELERATE_USE_FSDP": "true"}) == "none"


def test_shipped_accelerate_configs_parse():
    import yaml

    folder = ROOT / "pipelines" / "accelerate"
    kinds = {p.name: yaml.safe_load(p.read_text())["distributed_type"] for p in folder.glob("*.yaml")}
    assert kinds == {"ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP", "deepspeed_zero2.yaml": "DEEPSPEED"}
    ds = yaml.safe_load((folder / "deepspeed_zero2.yaml").read_text())["deepspeed_config"]
    assert ds["zero_stage"] == 2


class _Alone:
    """A rank of a `world`-process group, computing its part alone (nothing to all-reduce)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world, self.device, self.sharding, self.sharded = rank, world, "cpu", "none", False

    def all_reduce(self, tensor):
        return tensor


@pytest.mark.parametrize("rule", ["dataset", "step"])
@pytest.mark.parametrize("batch", [0, 2])  # 3 examples: 2 + 1 per rank; 1 example: rank 1 gets weight-0 padding
def test_rank_gradients_average_to_the_one_process_gradient(batch, rule, tiny_lm_dir):
    """The maths without processes: rank r's weighted loss sum scaled by world / D; the average over ranks
    (what DDP's all-reduce computes) equals the one-process gradient, under either weight normalisation."""
    from test_train import make_batches

    from alignpipe.training import loop as tr
    from alignpipe.training.checkpoint import frozen_copy, load_policy
    from alignpipe.training.micro_batches import batch_groups, micro_batches

    ds = make_batches("pairwise", _uneven(pairs(6)), tiny_lm_dir)
    groups = batch_groups(ds)[batch: batch + 1]

    def grads(rank: int, world: int):
        module, tok = load_policy(tiny_lm_dir, "pairwise")
        run = tr.prepare(module, reference=tr.Reference("model", frozen_copy(module)), task="pairwise",
                         loss="dpo", hparams={}, pad_id=tok.pad_token_id, dist=tr.Dist(), lr=1e-2,
                         normalization=tr.Normalization(rule, 2.5), weight_decay=0.0, scheduler="constant",
                         warmup_steps=0, total_steps=1)
        run.dist = _Alone(rank, world)
        tr.accumulate_gradients(run, micro_batches(ds, groups, "pairwise", False, tok.pad_token_id, "cpu", rank,
                                                   world))
        return {n: p.grad.clone() for n, p in module.named_parameters()}

    one, r0, r1 = grads(0, 1), grads(0, 2), grads(1, 2)
    for n in one:
        torch.testing.assert_close((r0[n] + r1[n]) / 2, one[n], atol=1e-7, rtol=1e-4)
