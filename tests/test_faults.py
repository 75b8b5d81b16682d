"""Fault injection: every stage SIGKILLed at several points, then rerun, equals an uninterrupted run; a write
that fails (full disk, read-only target) ends with one clear line and no output; a second writer of the same
output refuses naming the holder; a stale lock of a dead process is taken over, by exactly one process.

How a kill point is hit: the stage runs in a child process whose os.replace/os.rename are wrapped by
`helpers.arm()` (test code; production code holds no hook) to SIGKILL the process just before or just after
a durable step: a finished shard, a training checkpoint, the manifest of the final write, the swap of the
output into place. So every point is exact and the test needs no sleeps or timing luck. The uninterrupted
runs are the module's `recipe` outputs; `row_hashes` compares them row by row (sha256 of each row's JSON).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import (
    ROOT,
    assert_clean_failure,
    child_env,
    cli,
    leftovers,
    manifest,
    ok,
    row_hashes,
    rows_of,
    run_killed,
    start_child,
    write_jsonl,
)

NUM_PROMPTS = 8
RW_SHARD = "alignpipe.stages.reweight:SHARD_ROWS=3"  # the importance forward of 8 rows in 3 shards


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Children run with one thread; so do the in-process runs, so that every float is computed alike."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_lm_dir):
    """One uninterrupted run of every stage (the references), and each stage's command line."""
    d = tmp_path_factory.mktemp("recipe")
    lm = tiny_lm_dir
    src = write_jsonl(d / "p.jsonl", [{"prompt_id": f"q{i}", "prompt": f"Question {i}: tell me about item {i}."}
                                      for i in range(NUM_PROMPTS)])
    args = {
        "import": lambda out: ["import", src, "--out", out],
        "generate": lambda out: ["generate", d / "import", "--policy", lm, "--num-samples", 2, "--max-new-tokens",
                                 8, "--batch-size", 2, "--shard-batches", 1, "--seed", 3, "--device", "cpu",
                                 "--out", out],
        "annotate": lambda out: ["annotate", d / "generate", "-a", "length", "--pairing", "all", "--shard-size", 2,
                                 "--out", out],
        "reweight": lambda out: ["reweight", d / "annotate", "-s", f"importance:policy={lm},clip=5", "--device",
                                 "cpu", "--out", out],
        "build-batches": lambda out: ["build-batches", d / "reweight", "--task", "pairwise", "--tokenizer", lm,
                                      "--reference", lm, "--shard-size", 2, "--batch-size", 2, "--device", "cpu",
                                      "--out", out],
        "train": lambda out: ["train", d / "build-batches", "--policy", lm, "--loss", "dpo", "--lr", "1e-3",
                              "--save-every", 1, "--device", "cpu", "--out", out],
    }
    import alignpipe.stages.reweight

    saved, alignpipe.stages.reweight.SHARD_ROWS = alignpipe.stages.reweight.SHARD_ROWS, 3
    try:
        for stage, make in args.items():
            ok(*make(d / stage))
    finally:
        alignpipe.stages.reweight.SHARD_ROWS = saved
    return d, args


SHARDS = {  # shards of an output of n rows, from the recipe's shard sizes
    "generate": lambda n: n // 4,  # 2 prompts x 2 samples
    "annotate": lambda n: -(-n // 2),  # one pair per prompt, 2 prompts
    "reweight": lambda n: -(-n // 3),
    "build-batches": lambda n: -(-n // 2),
}


def losses(policy: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (policy / "metrics.jsonl").read_text().splitlines()]


# stage, fault, what the kill leaves, shards (train: checkpoints) a rerun finds done ("all"; None: no shards)
POINTS = [
    ("import", "before:manifest.json:1", "tmp", None),  # during the final write: data written, no manifest
    ("import", "after:import:1", "out", None),  # the output is in place; lock and cleanup not done
    ("generate", "after:shard-*:1", "partial", 1),
    ("generate", "before:shard-*:2", "partial", 1),  # the 2nd shard written but not yet renamed into place
    ("generate", "before:manifest.json:1", "tmp", "all"),
    ("annotate", "after:shard-*:1", "partial", 1),
    ("annotate", "after:shard-*:2", "partial", 2),
    ("annotate", "before:manifest.json:1", "tmp", "all"),
    ("annotate", "after:annotate:1", "out", None),
    ("reweight", "after:shard-*:1", "partial", 1),
    ("reweight", "before:shard-*:3", "partial", 2),
    ("reweight", "before:manifest.json:1", "tmp", "all"),
    ("build-batches", "after:shard-*:1", "partial", 1),
    ("build-batches", "after:shard-*:2", "partial", 2),
    ("build-batches", "before:manifest.json:1", "tmp", "all"),
    ("train", "after:checkpoint-*:1", "partial", 1),
    ("train", "before:checkpoint-*:3", "partial", 2),  # checkpoint 3 written as .tmp, not renamed
    ("train", "before:manifest.json:1", "tmp", "all"),
]


@pytest.mark.parametrize("stage,fault,left,done", POINTS, ids=[f"{p[0]}-{p[1]}" for p in POINTS])
def test_sigkill_then_rerun_equals_uninterrupted(stage, fault, left, done, recipe, tmp_path, monkeypatch):
    d, args = recipe
    out = tmp_path / stage
    set_ = RW_SHARD if stage == "reweight" else None
    run_killed(args[stage](out), fault, set_)
    after_kill = leftovers(out)
    if left == "out":  # killed after the swap: the output is whole already
        assert out.exists() and (out / "manifest.json").exists()
    else:
        assert not out.exists(), f"{out} appeared although the run was killed"
        assert f".{stage}.lock" in after_kill  # a dead process's lock, to be taken over
        if left == "tmp":
            assert any(".tmp" in n for n in after_kill), after_kill
        if left == "partial" and fault.startswith("before:"):  # a half-done shard or checkpoint folder
            assert any(".tmp" in p.name for p in (tmp_path / f".{stage}.partial").iterdir())
    monkeypatch.setattr("alignpipe.stages.reweight.SHARD_ROWS", 3)
    rerun = ok(*args[stage](out))
    reference = d / stage
    if done == "all":
        done = len(losses(reference)) if stage == "train" else SHARDS[stage](len(rows_of(reference)))
    assert leftovers(out) == [], leftovers(out)  # lock released, shards, tmp and old folders cleaned
    m = manifest(out)
    if stage == "train":
        assert losses(out) == losses(reference) and len(losses(out)) == 4
        assert m["report"]["resumed_from_step"] == done
        assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
        return
    assert row_hashes(out) == row_hashes(reference)  # nothing lost, nothing duplicated, nothing changed
    assert m["num_rows"] == manifest(reference)["num_rows"] and m["fingerprint"] == manifest(reference)["fingerprint"]
    if left == "out":
        assert "up to date" in rerun.output
    elif done is not None:
        assert m["report"]["resumed_shards"] == done


# -------------------------------------------------------------------------------------- failing writes
def _big_prompts(tmp: Path, n: int = 2000) -> Path:
    return write_jsonl(tmp / "big.jsonl", [{"prompt": f"Prompt number {i} " + "word " * 40} for i in range(n)])


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    """A real write error from the OS: the child may write files of at most 64 KiB (RLIMIT_FSIZE; SIGXFSZ
    ignored, so write() fails with EFBIG, as it fails with ENOSPC on a full disk). Works for root too."""
    src, out = _big_prompts(tmp_path), tmp_path / "prompts"
    limit = textwrap.dedent("""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
    """)
    code = f"{limit}\nfrom alignpipe.cli import app\napp(prog_name='alignpipe')"
    proc = subprocess.run([sys.executable, "-c", code, "import", str(src), "--out", str(out)], check=False,
                          env=child_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {out}: cannot write the output") and "nothing was written" in lines[0]
    assert not out.exists() and leftovers(out) == []
    ok("import", src, "--out", out)  # space again: the same command succeeds
    assert len(row_hashes(out)) == 2000


def test_full_disk_during_a_shard_keeps_finished_shards(tmp_path, monkeypatch, recipe):
    """ENOSPC in-process, where the bytes go to disk (Arrow's writer), on the 2nd shard: one line, exit 2,
    no output, the first shard kept; with space again the rerun resumes and equals the uninterrupted run."""
    import datasets

    d, args = recipe
    real, calls = datasets.Dataset.save_to_disk, []

    def save(self, path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / "data-00000-of-00001.arrow").write_bytes(b"\0" * 100)  # half-written
            raise OSError(28, "No space left on device")
        return real(self, path, *a, **kw)

    out = tmp_path / "annotate"
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", save)
    result = cli(*args["annotate"](out))
    assert_clean_failure(result, out, str(out), "No space left on device", allow=(".annotate.partial",))
    assert sorted(p.name for p in (tmp_path / ".annotate.partial").iterdir()) == ["key.json", "shard-00000"]
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", real)
    ok(*args["annotate"](out))
    assert row_hashes(out) == row_hashes(d / "annotate") and manifest(out)["report"]["resumed_shards"] == 1


def _without_root_override() -> list[str]:
    """The command prefix under which permission bits bind: none for a user; for root, `setpriv` dropping
    the capabilities that let root write anywhere (DAC override)."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"]
    if not shutil.which("setpriv") or subprocess.run([*prefix, "true"], check=False).returncode != 0:
        pytest.skip("running as root, and setpriv cannot drop DAC override here: chmod cannot stop root")
    return prefix


def test_read_only_target_is_one_line_and_leaves_nothing(tmp_path):
    """A read-only output folder (chmod 555; as root, without the capability to override it)."""
    try:
        src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(0o555)
        out = target / "prompts"
        proc = subprocess.run([*_without_root_override(), sys.executable, "-m", "alignpipe", "import", str(src),
                               "--out", str(out)], check=False, env=child_env(), cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert lines[0].startswith(f"error: {out}") and "ermission denied" in lines[0], lines[0]
        assert sorted(p.name for p in target.iterdir()) == []
    finally:
        (tmp_path / "ro").chmod(0o755)


# ----------------------------------------------------------------------------------------------- locks
def test_second_writer_refuses_naming_the_holder_then_stale_lock_is_taken_over(recipe, tmp_path):
    """A live writer (stopped after its first shard) holds the output: a second run refuses with one line
    naming its pid and command. Once that writer is SIGKILLed, its stale lock is taken over and the run
    resumes from its shard."""
    d, args = recipe
    out = tmp_path / "generate"
    holder = start_child(args["generate"](out), "after:shard-*:1:SIGSTOP")
    try:
        deadline = time.time() + 120
        while not (tmp_path / ".generate.partial" / "shard-00000").exists() and time.time() < deadline:
            time.sleep(0.05)
        second = cli(*args["generate"](out))
        line = assert_clean_failure(second, out, f"{out}: locked by pid {holder.pid} on {socket.gethostname()}",
                                    "generate", allow=(".generate.partial", ".generate.lock"))
        assert "--policy" in line  # the holder's command line
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((tmp_path / ".generate.lock").read_text())["pid"] == holder.pid  # stale now
    ok(*args["generate"](out))
    assert row_hashes(out) == row_hashes(d / "generate") and manifest(out)["report"]["resumed_shards"] == 1
    assert leftovers(out) == []


def test_lock_files_of_dead_writers_are_taken_over(tmp_path):
    """The lock is the kernel's (flock), the text only names the holder: a file left by a dead writer is free,
    whatever it says: another host, a pid now reused by a live process (pid 1 after a container restart), or
    nothing (its writer died before writing its name)."""
    src, out = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}]), tmp_path / "prompts"
    lock = tmp_path / ".prompts.lock"
    for text in (json.dumps({"pid": 1, "host": "elsewhere", "command": "alignpipe import x", "since": "t"}),
                 json.dumps({"pid": 1, "host": socket.gethostname(), "command": "alignpipe import x"}), ""):
        lock.write_text(text)
        ok("import", src, "--out", out, "--force")
        assert not lock.exists()


_RACE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from alignpipe.core.errors import LockedError
    from alignpipe.data.output import Lock
    target, start = Path(sys.argv[1]), float(sys.argv[2])
    while time.time() < start:
        pass
    lock = Lock(target)
    try:
        lock.acquire()
    except LockedError:
        print("refused")
    else:
        print("held")
        time.sleep(1.0)
        lock.release()
""")


def test_stale_lock_is_taken_over_by_exactly_one_of_many(tmp_path):
    """Eight processes find the same stale lock at the same moment: exactly one may take it over."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "o"
    for trial in range(3):
        (tmp_path / ".o.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
        start = time.time() + 1.5
        procs = [subprocess.Popen([sys.executable, "-c", _RACE, str(out), str(start)], env=child_env(),
                                  stdout=subprocess.PIPE, text=True) for _ in range(8)]
        said = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
        assert said.count("held") == 1, (trial, said)
        assert not (tmp_path / ".o.lock").exists()
