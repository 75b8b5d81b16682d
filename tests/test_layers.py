"""The house rules of the package layout (CONTRIBUTING.md's map): imports go one way, down the layers, and no
module imports another that imports it back, counting the imports inside functions too."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bottom to top: a module may import its own layer and the layers before it
LAYERS = ["root", "schemas", "core", "data", "models", "sampling", "feedback", "batches", "training", "report", "top"]
FOLDERS = {"alignpipe": "alignpipe", "stages": "alignpipe.stages", "schemas": "alignpipe.schemas",
           "pipelines": "alignpipe.pipelines"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    parts[0] = FOLDERS[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> str:
    parts = module.split(".")
    if module == "alignpipe":
        return "root"
    second = parts[1]
    if second in LAYERS[1:-1]:
        return second
    return "top"  # cli, components, testing, __main__, stages, pipelines


def imports(path: Path) -> set[str]:
    """alignpipe modules named by every import statement of a file (`from alignpipe.x import y` names
    alignpipe.x.y when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m == "alignpipe" or m.startswith("alignpipe.")}


FILES = sorted(p for d in FOLDERS for p in (ROOT / d).rglob("*.py"))
MODULES = {module_name(p): p for p in FILES}
GRAPH = {m: {i for i in imports(p) if i != m} for m, p in MODULES.items()}


def test_every_subpackage_says_what_lives_there_and_what_it_may_import():
    for name in LAYERS[2:-1]:
        doc = ast.get_docstring(ast.parse((ROOT / "alignpipe" / name / "__init__.py").read_text())) or ""
        assert doc.startswith(f"{name}:") and "May import:" in doc, name


def test_imports_go_down_the_layers():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = [f"{m} ({layer(m)}) imports {i} ({layer(i)})" for m, deps in GRAPH.items() for i in deps
              if rank[layer(i)] > rank[layer(m)]]
    assert not upward, "\n".join(upward)


def test_no_import_circles():
    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in GRAPH.get(node, ()):
                if nxt == start:
                    return path + [start]
                if nxt not in seen and nxt in GRAPH:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    circles = {" -> ".join(c) for m in GRAPH if (c := cycle_from(m))}
    assert not circles, "\n".join(sorted(circles))


def test_the_layers_test_sees_the_package():
    assert {"alignpipe.training.losses", "alignpipe.data.output", "alignpipe.stages.train"} <= set(MODULES)
    assert "alignpipe.core.errors" in GRAPH["alignpipe.data.output"]
