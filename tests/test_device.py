"""The suite's device pinning (tests/conftest.py): a test without the `gpu` marker runs on the CPU whatever the
machine, in-process and in the processes it starts; a `gpu` test runs on CUDA where present, else is skipped
saying why. The verdict of every test here is the same on a machine with or without a GPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CUDA_PRESENT

ROOT = Path(__file__).resolve().parents[1]
PROBE = "import torch; print(torch.cuda.is_available(), torch.cuda.device_count())"


def test_a_plain_test_is_pinned_to_the_cpu(pinned_device):
    from alignpipe.models.loading import resolve_device
    from stages.generate import resolve_batch_size

    assert pinned_device == "cpu"
    assert not torch.cuda.is_available() and resolve_device("auto") == "cpu"
    assert resolve_batch_size("auto", "transformers", resolve_device("auto")) == 32  # the CPU's auto batch
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""


def test_child_processes_see_no_cuda():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "0"]


def test_cpu_env_hides_cuda_from_a_child():
    from alignpipe.testing import cpu_env

    env = cpu_env({"CUDA_VISIBLE_DEVICES": "0", "X": "1"}, Y=2)
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["X"] == "1" and env["Y"] == "2"


def test_logp_tolerance_scales_with_dtype_and_tokens():
    from alignpipe.testing import logp_tolerance

    assert logp_tolerance("float32", ("cpu",), 10) == pytest.approx(2e-4)
    assert logp_tolerance("bfloat16", ("cpu", "cuda"), 10) == pytest.approx(0.3)
    assert logp_tolerance("float32", ("cpu",), 0) == pytest.approx(2e-5)  # at least one token's worth


@pytest.mark.gpu
def test_a_gpu_test_sees_cuda(pinned_device):
    assert pinned_device == "cuda" and torch.cuda.is_available()
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "True"


def _pytest(node: str, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "PYTEST_ADDOPTS")}
    if os.environ.get("ALIGNPIPE_ORIGINAL_CUDA_VISIBLE_DEVICES") is not None:
        base["CUDA_VISIBLE_DEVICES"] = os.environ["ALIGNPIPE_ORIGINAL_CUDA_VISIBLE_DEVICES"]
    return subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "-rs", "-p", "no:cacheprovider", node], check=False,
                          cwd=ROOT, env={**base, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True)


def test_gpu_tests_are_skipped_saying_why_when_cuda_is_hidden():
    result = _pytest("tests/test_device.py::test_a_gpu_test_sees_cuda", ALIGNPIPE_TEST_DEVICE="cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout and "gpu test: ALIGNPIPE_TEST_DEVICE=cpu hides CUDA" in result.stdout


def test_gpu_tests_run_where_cuda_is_present_and_insist_when_asked():
    """auto: run on CUDA when present, skipped otherwise; cuda: a missing GPU is a failure, not a skip."""
    auto = _pytest("tests/test_device.py::test_a_gpu_test_sees_cuda")
    assert auto.returncode == 0, auto.stdout + auto.stderr
    assert ("1 passed" if CUDA_PRESENT else "1 skipped") in auto.stdout
    insist = _pytest("tests/test_device.py::test_a_gpu_test_sees_cuda", ALIGNPIPE_TEST_DEVICE="cuda")
    assert (insist.returncode == 0) == CUDA_PRESENT, insist.stdout
    if not CUDA_PRESENT:
        assert "ALIGNPIPE_TEST_DEVICE=cuda but no CUDA device is present" in insist.stdout


# ------------------------------------------------------------------ processes and GPUs (alignpipe.training.devices)
@pytest.mark.parametrize("device, local_rank, world, count, expected", [
    ("cpu", 1, 2, 1, "cpu"),  # a CPU run is a CPU run whatever GPUs the machine has
    ("cuda", 0, 1, 1, "cuda:0"),
    ("cuda", 1, 2, 2, "cuda:1"),
    ("cuda:1", 0, 1, 2, "cuda:1"),
    ("cuda", 1, 2, 1, "LOCAL_RANK=1 needs a GPU of its own but 1 CUDA device(s) are visible; start at most 1"),
    ("cuda:0", 0, 2, 2, "--device cuda:0 with 2 processes: each process takes the GPU of its LOCAL_RANK"),
    ("cuda:3", 0, 1, 2, "--device cuda:3: no such CUDA device (2 visible)"),
])
def test_process_device_one_gpu_per_process_or_one_line(device, local_rank, world, count, expected):
    from alignpipe.core.errors import UserError
    from alignpipe.training.devices import process_device

    if expected.startswith(("cpu", "cuda")):
        assert process_device(device, local_rank, world, count) == expected
    else:
        with pytest.raises(UserError) as e:
            process_device(device, local_rank, world, count)
        assert expected in str(e.value) and "\n" not in str(e.value)
