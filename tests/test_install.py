"""A clean install: the wheel holds only `alignpipe*` (stages/, schemas/ and pipelines/ go in as alignpipe.stages,
alignpipe.schemas, alignpipe.pipelines), and the installed package works outside the repository, where the
checkout's aliases (`import stages`) do not exist."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "alignpipe", "stages", "schemas", "pipelines")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built offline from a copy of the sources (the checkout itself is left alone)."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(path, src / name)
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (found,) = out.glob("alignpipe-*.whl")
    return found


def test_wheel_holds_only_alignpipe(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"alignpipe", wheel.name.split("-py3")[0] + ".dist-info"}
    for needed in ("alignpipe/stages/generate.py", "alignpipe/stages/import_data.py", "alignpipe/schemas/__init__.py",
                   "alignpipe/feedback/annotators/judge.py", "alignpipe/pipelines/online.mk",
                   "alignpipe/pipelines/data/prompts.jsonl", "alignpipe/pipelines/templates/pairwise-helpfulness.txt",
                   "alignpipe/pipelines/accelerate/ddp.yaml"):
        assert needed in names, needed
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "alignpipe = alignpipe.cli:app" in entry


CHECK = """
import importlib, json, pkgutil, sys
import alignpipe, alignpipe.stages, alignpipe.schemas
from alignpipe.feedback.annotators import TEMPLATE_DIR
mods = [m.name for m in pkgutil.iter_modules(alignpipe.stages.__path__, "alignpipe.stages.")]
for m in mods:
    importlib.import_module(m)
from alignpipe.cli import app
print(json.dumps({"file": alignpipe.__file__, "checkout": alignpipe.SOURCE_CHECKOUT, "stages": mods,
                  "templates": sorted(p.name for p in TEMPLATE_DIR.glob("*.txt")),
                  "top": sorted(n for n in sys.modules if n.split(".")[0] in ("stages", "schemas", "pipelines"))}))
"""


def test_installed_package_works_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                           str(site), str(wheel)], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in site.iterdir() if not p.name.endswith(".dist-info")) == ["alignpipe", "bin"]
    env = {"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    run = tmp_path / "elsewhere"
    run.mkdir()

    def py(*args):
        p = subprocess.run([sys.executable, *args], cwd=run, env=env, capture_output=True, text=True, timeout=300,
                           check=False)
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stdout

    info = json.loads(py("-c", CHECK))
    assert Path(info["file"]).parent == site / "alignpipe" and info["checkout"] is False
    assert {"alignpipe.stages.generate", "alignpipe.stages.import_data", "alignpipe.stages.train"} <= set(info["stages"])
    assert "pairwise-helpfulness.txt" in info["templates"] and info["top"] == []
    assert "generate" in py("-m", "alignpipe", "--help") and "prompt_id" in py("-m", "alignpipe", "schema", "prompts")
    (run / "p.jsonl").write_text('{"prompt": "Hi"}\n{"prompt": "Why?"}\n')
    p = subprocess.run([sys.executable, "-m", "alignpipe", "import", "p.jsonl", "--out", "prompts"], cwd=run,
                       env=env, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0 and "import: 2 prompts rows" in p.stderr, p.stderr[-2000:]


def test_checkout_spellings_are_one_module():
    """In the checkout, `import stages` (old spelling) and `alignpipe.stages` are the same module objects."""
    code = ("import schemas, stages.generate, alignpipe.schemas, alignpipe.stages.generate as g; "
            "assert schemas is alignpipe.schemas and stages.generate is g and g.__spec__.name == g.__name__")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       check=False)
    assert p.returncode == 0, p.stderr[-2000:]
