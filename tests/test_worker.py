"""The resident worker: every stage gives the same rows and manifests (apart from timings and the `worker`
field) with and without it; two clients run side by side; a SIGKILLed worker fails its client with one line
and a rerun resumes to identical rows; Ctrl-C stops the stage; stale sockets and workers of other code are
not used; only the owner connects (0700 folder, SO_PEERCRED), no network port; secrets pass per call and are
never written; the memory bound holds when more models are loaded than fit.

Commands run as real processes (`python -m alignpipe`) against a snapshot of the code (so that the worker's
code version does not move under a test), from a scratch folder."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import row_hashes, write_jsonl

from alignpipe.worker import cache as cache_mod
from alignpipe.worker import preload
from alignpipe.worker.child import thread_count

ROOT = Path(__file__).resolve().parents[1]

TIMING = re.compile(r"(seconds|_s$|per_s|/s$|started_at|finished_at|elapsed|^time)")


@pytest.fixture(scope="module")
def code(tmp_path_factory) -> Path:
    """A snapshot of the package: edits to the checkout during the test do not make the worker stale."""
    snap = tmp_path_factory.mktemp("code")
    for name in ("alignpipe", "stages", "schemas", "pipelines"):
        shutil.copytree(ROOT / name, snap / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return snap


def env_of(code: Path, worker: Path | None = None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "ALIGNPIPE_WORKER"}
    env.update(PYTHONPATH=str(code), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               CUDA_VISIBLE_DEVICES="")
    env.update(extra)
    if worker:
        env["ALIGNPIPE_WORKER"] = str(worker)
    return env


def ap(code: Path, cwd: Path, *args, worker: Path | None = None, check: bool = True, **extra):
    done = subprocess.run([sys.executable, "-m", "alignpipe", *map(str, args)], cwd=cwd, env=env_of(code, worker, **extra),
                          capture_output=True, text=True, timeout=600, check=False)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def start_worker(code: Path, sock: Path, *extra, **env) -> int:
    ap(code, sock.parent.parent, "worker", "start", "--socket", sock, "--idle-exit", 600, *extra, **env)
    return status(code, sock)["pid"]


def status(code: Path, sock: Path) -> dict:
    return json.loads(ap(code, sock.parent.parent, "worker", "status", "--socket", sock).stdout)


@pytest.fixture(scope="module")
def worker(code, tmp_path_factory):
    sock = tmp_path_factory.mktemp("w") / ".worker" / "sock"
    start_worker(code, sock)
    yield sock
    ap(code, sock.parent.parent, "worker", "stop", "--socket", sock, check=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_lm_dir, tiny_rm_dir):
    return {"lm": tiny_lm_dir, "rm": tiny_rm_dir}


def chain(models: dict, n_prompts: int = 6) -> list[tuple[str, list]]:
    lm, rm = models["lm"], models["rm"]
    return [
        ("prompts", ["import", "p.jsonl", "--out", "prompts"]),
        ("gen", ["generate", "prompts", "--policy", lm, "--num-samples", 2, "--max-new-tokens", 6, "--batch-size", 2,
                 "--shard-batches", 1, "--seed", 3, "--device", "cpu", "--out", "gen"]),
        ("ann", ["annotate", "gen", "-a", f"reward-model:{rm}", "--pairing", "all", "--out", "ann"]),
        ("rw", ["reweight", "ann", "-s", f"importance:policy={lm},clip=5", "--device", "cpu", "--out", "rw"]),
        ("bb", ["build-batches", "rw", "--task", "pairwise", "--tokenizer", lm, "--reference", lm, "--batch-size", 2,
                "--device", "cpu", "--out", "bb"]),
        ("pol", ["train", "bb", "--policy", lm, "--loss", "dpo", "--lr", "1e-3", "--device", "cpu", "--out", "pol"]),
        # policy and reference from one folder: one model from the cache, the other its deep copy
        ("ref", ["train", "bb", "--policy", lm, "--reference", lm, "--loss", "dpo", "--lr", "1e-3", "--device", "cpu",
                 "--out", "ref"]),
    ]


def prompts_file(folder: Path, n: int = 6) -> None:
    write_jsonl(folder / "p.jsonl", [{"prompt_id": f"q{i}", "prompt": f"Question {i}: tell me about item {i}."}
                                     for i in range(n)])


def without_timings(obj):
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k != "worker" and not TIMING.search(k)}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def metrics(policy: Path) -> list[dict]:
    return [without_timings(json.loads(x)) for x in (policy / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ equality
def test_every_stage_gives_the_same_rows_and_manifests_with_and_without_the_worker(code, worker, models, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    prompts_file(run)
    for _name, args in chain(models):
        ap(code, run, *args)
    local = tmp_path / "local"
    run.rename(local)
    run.mkdir()
    shutil.copy(local / "p.jsonl", run / "p.jsonl")
    for _name, args in chain(models):
        ap(code, run, *args, worker=worker)
    hits = []
    for name, _args in chain(models):
        m, ref = manifest(run / name), manifest(local / name)
        assert m["worker"]["socket"] == str(worker) and "worker" not in ref, name
        hits += [r for r in m["worker"]["models"] if r["hit"]]
        assert without_timings(m) == without_timings(ref), name
        if name not in ("pol", "ref"):
            assert row_hashes(run / name) == row_hashes(local / name), name
    for policy in ("pol", "ref"):
        for f in (local / policy).glob("*.safetensors"):
            assert (run / policy / f.name).read_bytes() == f.read_bytes(), policy
        assert metrics(run / policy) == metrics(local / policy), policy
    same = [r["hit"] for r in manifest(run / "ref")["worker"]["models"] if Path(r["folder"]) == models["lm"].resolve()]
    assert same == [True, True]  # two models of one folder in one command: the cached one and a copy
    # the policy loaded by generate is the one that reweight, build-batches (reference) and train reuse
    assert {Path(r["folder"]) for r in hits} >= {models["lm"].resolve(), models["rm"].resolve()}


def test_the_child_runs_with_the_clients_thread_count(code, worker, models, tmp_path):
    prompts_file(tmp_path, 4)
    ap(code, tmp_path, "import", "p.jsonl", "--out", "prompts")
    args = ["generate", "prompts", "--policy", models["lm"], "--num-samples", 2, "--max-new-tokens", 12, "--seed", 1,
            "--device", "cpu"]
    ap(code, tmp_path, *args, "--out", "local", OMP_NUM_THREADS="2")
    ap(code, tmp_path, *args, "--out", "warm", worker=worker, OMP_NUM_THREADS="2")
    assert row_hashes(tmp_path / "warm") == row_hashes(tmp_path / "local")
    assert thread_count({"OMP_NUM_THREADS": "3"}) == 3 and thread_count({}) >= 1


def test_two_clients_at_once_run_side_by_side(code, worker, models, tmp_path):
    """The first command is frozen (SIGSTOP) inside the worker; the second one still runs to the end."""
    prompts_file(tmp_path, 4)
    ap(code, tmp_path, "import", "p.jsonl", "--out", "prompts")
    args = ["generate", "prompts", "--policy", models["lm"], "--num-samples", 2, "--max-new-tokens", 8, "--seed", 2,
            "--device", "cpu"]

    def client(out: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "alignpipe", *map(str, args), "--out", out], cwd=tmp_path,
                                env=env_of(code, worker), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    before = (worker.parent / "worker.log").read_text().count("run generate")
    first = client("a")
    line = _log_until(worker, "run generate", before + 1)[-1]
    pid = int(re.search(r"pid (\d+)", line).group(1))
    os.kill(pid, signal.SIGSTOP)
    try:
        second = client("b")
        assert second.wait(timeout=300) == 0, second.stderr.read()
        assert first.poll() is None  # still frozen: the second did not wait for it
    finally:
        os.kill(pid, signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert row_hashes(tmp_path / "a") == row_hashes(tmp_path / "b")


def _log_until(sock: Path, text: str, count: int, timeout: float = 120) -> list[str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        lines = [x for x in (sock.parent / "worker.log").read_text().splitlines() if text in x]
        if len(lines) >= count:
            return lines[:count]
        time.sleep(0.05)
    raise AssertionError(f"the worker never logged {count} x {text!r}")


# ------------------------------------------------------------------------------------------ faults
def _long_generate(code: Path, folder: Path, lm: Path) -> list:
    prompts_file(folder, 12)
    ap(code, folder, "import", "p.jsonl", "--out", "prompts")
    return ["generate", "prompts", "--policy", lm, "--num-samples", 2, "--max-new-tokens", 48, "--batch-size", 1,
            "--shard-batches", 1, "--seed", 5, "--device", "cpu"]


def _wait_for_shard(folder: Path, out: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not list((folder / f".{out}.partial").glob("shard-[0-9][0-9][0-9][0-9][0-9]")):  # whole, not .tmpPID
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)


def test_sigkill_of_the_worker_mid_stage_fails_the_client_in_one_line_and_a_rerun_resumes(code, models, tmp_path):
    sock = tmp_path / "w" / ".worker" / "sock"
    sock.parent.parent.mkdir()
    pid = start_worker(code, sock)
    args = _long_generate(code, tmp_path, models["lm"])
    ap(code, tmp_path, *args, "--out", "reference")
    client = subprocess.Popen([sys.executable, "-m", "alignpipe", *map(str, args), "--out", "gen"], cwd=tmp_path,
                              env=env_of(code, sock), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_shard(tmp_path, "gen", client)
    os.kill(pid, signal.SIGKILL)
    assert client.wait(timeout=60) != 0
    err = client.stderr.read().strip().splitlines()
    assert err[-1].startswith("error: the alignpipe worker") and "rerun to resume" in err[-1]
    rerun = ap(code, tmp_path, *args, "--out", "gen", worker=sock)  # the socket is dead: runs here, resumes
    assert row_hashes(tmp_path / "gen") == row_hashes(tmp_path / "reference")
    assert manifest(tmp_path / "gen")["report"]["resumed_shards"] >= 1 and "worker" not in manifest(tmp_path / "gen")
    assert "Traceback" not in rerun.stderr


def test_ctrl_c_in_the_client_stops_the_stage_in_the_worker(code, worker, models, tmp_path):
    args = _long_generate(code, tmp_path, models["lm"])
    client = subprocess.Popen([sys.executable, "-m", "alignpipe", *map(str, args), "--out", "gen"], cwd=tmp_path,
                              env=env_of(code, worker), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_shard(tmp_path, "gen", client)
    client.send_signal(signal.SIGINT)
    assert client.wait(timeout=120) == 130
    assert "interrupted; finished shards are kept" in client.stderr.read()
    assert status(code, worker)["commands_running"] == 0 and not (tmp_path / "gen").exists()


def test_a_stale_socket_is_not_used_and_start_replaces_it(code, models, tmp_path):
    folder = tmp_path / "w" / ".worker"
    folder.mkdir(parents=True, mode=0o700)
    sock = folder / "sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()  # the file stays, nothing listens: a worker that died
    prompts_file(tmp_path, 2)
    done = ap(code, tmp_path, "import", "p.jsonl", "--out", "prompts", worker=sock)
    assert "worker" not in manifest(tmp_path / "prompts") and "error" not in done.stderr
    assert status(code, sock)["running"] is False
    start_worker(code, sock)
    try:
        ap(code, tmp_path, "import", "p.jsonl", "--out", "again", worker=sock)
        assert manifest(tmp_path / "again")["worker"]["socket"] == str(sock)
    finally:
        ap(code, tmp_path, "worker", "stop", "--socket", sock)


def test_start_keeps_a_running_worker_and_an_idle_worker_exits(code, tmp_path):
    sock = tmp_path / "w" / ".worker" / "sock"
    sock.parent.parent.mkdir()
    pid = start_worker(code, sock, "--idle-exit", "8")  # the later --idle-exit wins over start_worker's
    again = ap(code, tmp_path, "worker", "start", "--socket", sock)
    assert f"already running (pid {pid})" in again.stderr
    deadline = time.time() + 60
    while status(code, sock)["running"] and time.time() < deadline:
        time.sleep(0.5)
    assert not sock.exists() and "idle: exiting" in (sock.parent / "worker.log").read_text()


def test_a_worker_of_other_code_is_not_used_and_start_replaces_it(code, worker, tmp_path):
    other = tmp_path / "code"
    shutil.copytree(code, other)
    (other / "alignpipe" / "worker" / "__init__.py").write_text('"""Other code."""\n')
    prompts_file(tmp_path, 2)
    done = ap(other, tmp_path, "import", "p.jsonl", "--out", "prompts", worker=worker)
    assert "not using the alignpipe worker" in done.stderr and "other alignpipe code" in done.stderr
    assert "worker" not in manifest(tmp_path / "prompts")


# ------------------------------------------------------------------------------------------ security
def test_socket_folder_is_private_and_only_unix_sockets_are_open(code, worker):
    assert (worker.parent.stat().st_mode & 0o777) == 0o700 and (worker.stat().st_mode & 0o777) == 0o600
    st = status(code, worker)
    pid = st["pid"]
    assert st["threads"] == 1 and st["cuda_initialised"] is False  # nothing that does not survive a fork
    inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")
              if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")}
    assert inodes
    for table in ("tcp", "tcp6", "udp", "udp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        rows = path.read_text().splitlines()[1:] if path.exists() else []
        assert not inodes & {r.split()[9] for r in rows}, f"the worker has a {table} socket"


def test_a_socket_in_a_folder_others_can_enter_is_refused(code, tmp_path):
    open_folder = tmp_path / "open"
    open_folder.mkdir(mode=0o755)
    open_folder.chmod(0o755)
    done = ap(code, tmp_path, "worker", "start", "--socket", open_folder / "sock", check=False)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "0755" in done.stderr
    prompts_file(tmp_path, 2)
    (open_folder / "sock").touch()
    refused = ap(code, tmp_path, "import", "p.jsonl", "--out", "x", worker=open_folder / "sock", check=False)
    assert refused.returncode == 2 and "refusing the worker" in refused.stderr and not (tmp_path / "x").exists()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another user")
def test_the_worker_answers_only_its_own_uid(code):
    base = Path(tempfile.mkdtemp(prefix="alignpipe-uid-"))  # /tmp/X: a path another user can walk when opened
    worker = base / ".worker" / "sock"
    start_worker(code, worker)
    folder = worker.parent
    base.chmod(0o711)
    folder.chmod(0o711)  # what the owner's 0700 folder normally keeps out, opened to test the uid check itself
    worker.chmod(0o666)
    try:
        probe = (f"import os, socket, struct; os.setgid(65534); os.setuid(65534)\n"
                 f"s = socket.socket(socket.AF_UNIX); s.connect({str(worker)!r})\n"
                 f"b = b'{{\"op\": \"status\"}}'\n"
                 f"try:\n    s.sendall(struct.pack('>I', len(b)) + b); print(repr(s.recv(100)))\n"
                 f"except (ConnectionResetError, BrokenPipeError):\n    print('reset')")
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    finally:
        folder.chmod(0o700)
        ap(code, base, "worker", "stop", "--socket", worker)
    log = (folder / "worker.log").read_text()
    shutil.rmtree(base)
    assert out.returncode == 0 and out.stdout.strip() in ("b''", "reset"), out.stdout + out.stderr  # closed, no answer
    assert "refused a connection from uid 65534" in log


def test_secrets_pass_per_call_and_are_never_written(code, tmp_path):
    secret = "sk-test-ABCDEF0123456789"
    sock = tmp_path / "w" / ".worker" / "sock"
    sock.parent.parent.mkdir()
    pid = start_worker(code, sock, MY_API_KEY=secret)
    try:
        assert secret.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
        folder = tmp_path / f"in-{secret}"
        folder.mkdir()
        prompts_file(folder, 2)
        ap(code, tmp_path, "import", folder / "p.jsonl", "--out", "prompts", worker=sock, MY_API_KEY=secret)
        m = manifest(tmp_path / "prompts")
        assert m["worker"] and secret not in json.dumps(m) and "***" in m["command"]  # the child had the secret
        for f in list(sock.parent.rglob("*")) + list((tmp_path / "prompts").rglob("*")):
            assert not f.is_file() or secret.encode() not in f.read_bytes(), f
    finally:
        ap(code, tmp_path, "worker", "stop", "--socket", sock)


# ------------------------------------------------------------------------------------------ model cache
def test_memory_bound_evicts_least_recently_used_and_a_changed_fingerprint_is_a_new_model(code, models, tmp_path):
    from alignpipe.testing import build_causal_lm

    size = (models["lm"] / "model.safetensors").stat().st_size
    copies = [tmp_path / f"lm{i}" for i in range(3)]
    for c in copies:
        shutil.copytree(models["lm"], c)
    sock = tmp_path / "w" / ".worker" / "sock"
    sock.parent.parent.mkdir()
    start_worker(code, sock, "--max-memory", str(int(size * 2.5)))
    try:
        prompts_file(tmp_path, 2)
        ap(code, tmp_path, "import", "p.jsonl", "--out", "prompts")
        for i, c in enumerate(copies):
            ap(code, tmp_path, "generate", "prompts", "--policy", c, "--max-new-tokens", 4, "--device", "cpu",
               "--out", f"g{i}", worker=sock)
        st = status(code, sock)
        assert st["cached_bytes"] <= st["max_memory_bytes"]
        assert [Path(m["folder"]).name for m in st["models"]] == ["lm1", "lm2"]  # lm0 evicted
        old = st["models"][-1]["fingerprint"]
        shutil.rmtree(copies[2])
        build_causal_lm(copies[2], models["lm"], seed=7)  # the same folder, other weights
        ap(code, tmp_path, "generate", "prompts", "--policy", copies[2], "--max-new-tokens", 4, "--device", "cpu",
           "--out", "g3", worker=sock)
        m = manifest(tmp_path / "g3")["worker"]["models"]
        assert m[0]["fingerprint"] != old
        st = status(code, sock)
        assert [(Path(x["folder"]).name, x["fingerprint"]) for x in st["models"]] == [("lm1", old),
                                                                                    ("lm2", m[0]["fingerprint"])]
    finally:
        ap(code, tmp_path, "worker", "stop", "--socket", sock)


def _adapter(lm: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter on `lm` with random (non-zero) weights: two seeds, one config, other answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(lm)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(str(out))
    return out


def test_a_lora_policy_is_swapped_into_the_resident_model_in_place_and_gives_the_same_rows(code, models, tmp_path):
    """Point 5 of the worker: the sampler stays, a new adapter's weights are loaded into it in place; generate
    and train (a trainable adapter) give the same rows, weights and metrics as without the worker."""
    adapters = [_adapter(models["lm"], tmp_path / f"adapter{i}", seed=i) for i in range(3)]
    sock = tmp_path / "w" / ".worker" / "sock"
    sock.parent.parent.mkdir()
    start_worker(code, sock)
    try:
        prompts_file(tmp_path, 4)
        ap(code, tmp_path, "import", "p.jsonl", "--out", "prompts")
        gen = ["generate", "prompts", "--num-samples", 2, "--max-new-tokens", 8, "--seed", 4, "--device", "cpu"]
        for i, a in enumerate(adapters):
            ap(code, tmp_path, *gen, "--policy", a, "--out", f"local{i}")
            ap(code, tmp_path, *gen, "--policy", a, "--out", f"warm{i}", worker=sock)
            assert row_hashes(tmp_path / f"warm{i}") == row_hashes(tmp_path / f"local{i}"), i
        assert row_hashes(tmp_path / "local0") != row_hashes(tmp_path / "local1")  # the adapter matters
        used = [manifest(tmp_path / f"warm{i}")["worker"]["models"] for i in range(3)]
        assert [[(r["class"], r["hit"]) for r in u] for u in used] == [[("PeftModel", True)]] * 3
        loads = [x.split("; ", 1)[1] for x in (sock.parent / "worker.log").read_text().splitlines()
                 if " run generate " in x]
        assert [x.rsplit(": ", 1)[1] for x in loads] == ["loaded", "swapped", "swapped"]
        resident = [m for m in status(code, sock)["models"] if m["class"] == "PeftModel"]
        assert [(Path(m["folder"]).name, m["trainable"]) for m in resident] == [("adapter2", False)]
        # a trainable adapter (train --policy ADAPTER): the same weights and metrics
        ap(code, tmp_path, "annotate", "local0", "-a", f"reward-model:{models['rm']}", "--pairing", "all",
           "--out", "ann")
        ap(code, tmp_path, "build-batches", "ann", "--task", "pairwise", "--tokenizer", models["lm"],
           "--batch-size", 2, "--out", "bb")
        for i, a in enumerate(adapters):
            train = ["train", "bb", "--policy", a, "--reference", models["lm"], "--loss", "dpo", "--lr", "1e-3",
                     "--device", "cpu"]
            ap(code, tmp_path, *train, "--out", f"tl{i}")
            ap(code, tmp_path, *train, "--out", f"tw{i}", worker=sock)
            for f in (tmp_path / f"tl{i}").glob("*.safetensors"):
                assert (tmp_path / f"tw{i}" / f.name).read_bytes() == f.read_bytes(), i
            assert metrics(tmp_path / f"tw{i}") == metrics(tmp_path / f"tl{i}"), i
        trained = [r for r in manifest(tmp_path / "tw2")["worker"]["models"] if r["class"] == "PeftModel"]
        assert [(r["trainable"], r["hit"]) for r in trained] == [(True, True)]
        loads = [x for x in (sock.parent / "worker.log").read_text().splitlines() if " run train " in x]
        assert [re.search(r"adapter\d float32 trainable: (\w+)", x).group(1) for x in loads] == \
            ["loaded", "swapped", "swapped"]
    finally:
        ap(code, tmp_path, "worker", "stop", "--socket", sock)


def test_an_adapter_attached_in_a_child_leaves_the_resident_base_unchanged(models, tmp_path):
    """A child that attaches an adapter itself (a miss) gets its own copy of the cached base: PEFT injects its
    layers in place, and the stage's reference (the same base folder) must stay the plain model."""
    import torch

    from alignpipe.models import loading

    adapter = _adapter(models["lm"], tmp_path / "adapter", seed=0)
    cache = cache_mod.ModelCache(1 << 30)
    assert cache.load("AutoModelForCausalLM", models["lm"], "float32") == "loaded"
    loading.RESIDENT.append(cache)
    try:
        policy = loading.load_causal_lm(adapter)
        reference = loading.load_causal_lm(models["lm"])
    finally:
        loading.RESIDENT.clear()
    assert [r["hit"] for r in cache.requests] == [False, True, True]  # the adapter, its base, the reference
    assert not any("lora" in name for name, _ in reference.named_modules())
    assert any("lora" in name for name, _ in policy.named_modules())
    ids = torch.tensor([[1, 2, 3, 4]])
    assert not torch.equal(policy(ids).logits, reference(ids).logits)


def test_parse_size_and_model_bytes_hand_computed():
    import torch

    assert cache_mod.parse_size("1.5G") == 3 * 2**29 and cache_mod.parse_size("800M") == 800 * 2**20
    assert cache_mod.parse_size("2GiB") == 2**31 and cache_mod.parse_size("123") == 123
    lin = torch.nn.Linear(3, 2)  # 6 weights + 2 biases, float32
    assert cache_mod.model_bytes(lin) == 8 * 4
    tied = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False))
    tied[1].weight = tied[0].weight
    assert cache_mod.model_bytes(tied) == 15 * 4  # one tensor, counted once
    with pytest.raises(Exception, match="not a size"):
        cache_mod.parse_size("lots")


def test_slots_find_models_in_options_and_component_specs(models, tmp_path):
    lm, rm = str(models["lm"]), str(models["rm"])
    argv = ["alignpipe", "annotate", "gen", "-a", f"reward-model:{rm}", "-s", f"importance:policy={lm},clip=5",
            "--tokenizer", lm, "--out", "x"]
    assert preload.slots(argv) == [("-a", models["rm"].resolve()), ("-s", models["lm"].resolve()),
                                   ("--tokenizer", models["lm"].resolve())]
    prof = preload.Profiles()
    first = prof.plan(argv)  # a guess: every slot, as its architecture, float32
    assert ("AutoModelForSequenceClassification", models["rm"].resolve(), "float32", False) in first
    prof.learn(argv, [{"class": "AutoModelForCausalLM", "folder": str(models["lm"].resolve()), "dtype": "bfloat16"}])
    assert prof.plan(argv) == [("AutoModelForCausalLM", models["lm"].resolve(), "bfloat16", False)]
    assert prof.plan(argv + ["--trust-remote-code"]) == []
    adapter = _adapter(models["lm"], tmp_path / "a", seed=0)
    gen = ["alignpipe", "generate", "p", "--policy"]
    lm_request = {"class": "AutoModelForCausalLM", "folder": str(models["lm"].resolve()), "dtype": "float32"}
    prof.learn(gen + [lm], [lm_request])
    assert prof.plan(gen + [str(adapter)]) == [("PeftModel", adapter.resolve(), "float32", False)]  # new kind: guess
    prof.learn(gen + [str(adapter)], [{"class": "PeftModel", "folder": str(adapter.resolve()), "dtype": "float32",
                                       "trainable": True}])
    assert prof.plan(gen + [str(adapter)]) == [("PeftModel", adapter.resolve(), "float32", True)]
    assert prof.plan(gen + [lm]) == [("AutoModelForCausalLM", models["lm"].resolve(), "float32", False)]


# ------------------------------------------------------------------------------------------ recipes
def test_the_rl_recipe_with_worker_1_runs_its_stages_in_a_worker_it_starts_and_stops(code, models, tmp_path):
    run = tmp_path / "r"
    done = subprocess.run(["make", "-s", "-f", "pipelines/rl.mk", "run", f"PY={sys.executable}", f"RUN={run}",
                           f"MODEL={models['lm']}", "ITERS=1", "PROMPTS_PER_ITER=4", "NUM_SAMPLES=4", "EVAL_PROMPTS=2",
                           "EVAL_SAMPLES=2", "MAX_NEW_TOKENS=6", "LORA_R=4", "BATCH=8", "ANNOTATOR=length",
                           "EVAL_ANNOTATOR=exact-answer", "WORKER=1"],
                          cwd=code, env=env_of(code), capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "not using" not in done.stderr and not (run / ".worker" / "sock").exists()  # stopped at the end
    log = (run / ".worker" / "worker.log").read_text()
    stages = {m["stage"] for m in (json.loads(f.read_text()) for f in run.rglob("manifest.json")) if "worker" in m}
    assert {"import", "generate", "annotate", "build-batches", "train", "evaluate"} <= stages
    assert " run report " in log
    assert log.count(" code 0 ") == log.count(" run ") and log.rstrip().endswith("stopped")
