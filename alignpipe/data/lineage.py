"""Lineage: the chain of manifests that made a dataset or policy folder, back to its sources.

Every output alignpipe writes has a manifest naming its stage, the command line that reruns it (from the
recorded working directory), the resolved config, its inputs with their fingerprints, row count and timings.
`lineage(path)` follows the inputs recursively: each input that alignpipe wrote is a node of its own; a source
(a prompt file, a base model folder) ends the chain. A node's input is `ok` when its fingerprint today equals
the one recorded when the node was made, `changed` when it differs and `missing` when it is gone.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

from alignpipe.data.manifest import fingerprint, read_manifest


@dataclass
class Input:
    path: str  # as recorded
    resolved: str | None  # where it is found today (None: missing)
    fingerprint: str | None  # recorded
    status: str  # ok | changed | missing | source (a file or folder alignpipe did not write)


@dataclass
class Node:
    path: str
    stage: str
    command: str | None
    rerun: str | None  # `cd CWD && COMMAND`
    cwd: str | None
    config: dict
    inputs: list[Input]
    kind: str | None
    num_rows: int | None
    seconds: float | None
    started_at: str | None
    fingerprint: str | None
    report: dict = field(default_factory=dict)
    depth: int = 0


def _resolve(recorded: str, cwd: str | None, here: Path) -> Path | None:
    """Find a recorded input path: as is, from the recorded working directory, from the output's run folder."""
    p = Path(recorded)
    candidates = [p] if p.is_absolute() else ([Path(cwd) / p] if cwd else []) + [Path.cwd() / p]
    if not p.is_absolute():  # a run folder moved elsewhere: match by its tail below an ancestor of `here`
        candidates += [a / Path(*p.parts[i:]) for a in here.resolve().parents[:4] for i in range(len(p.parts))]
    return next((c for c in candidates if c.exists()), None)


def _node(path: Path, manifest: dict, depth: int) -> Node:
    cwd = manifest.get("cwd")
    inputs = []
    for i in manifest.get("inputs", []):
        found = _resolve(i["path"], cwd, path)
        if found is None:
            status = "missing"
        elif read_manifest(found) is None:
            status = "source" if fingerprint(found) == i.get("fingerprint") else "changed"
        else:
            status = "ok" if fingerprint(found) == i.get("fingerprint") else "changed"
        inputs.append(Input(i["path"], str(found) if found else None, i.get("fingerprint"), status))
    command = manifest.get("command")
    argv = manifest.get("argv")
    if argv:
        command = shlex.join(argv)
    return Node(path=str(path), stage=manifest.get("stage", "?"), command=command,
                rerun=(f"cd {shlex.quote(cwd)} && {command}" if cwd and command else command), cwd=cwd,
                config=manifest.get("config") or {}, inputs=inputs, kind=(manifest.get("schema") or {}).get("kind"),
                num_rows=manifest.get("num_rows"), seconds=manifest.get("seconds"),
                started_at=manifest.get("started_at"), fingerprint=manifest.get("fingerprint"),
                report=manifest.get("report") or {}, depth=depth)


def lineage(path: Path, max_nodes: int = 500, max_depth: int | None = None) -> list[Node]:
    """The nodes that made `path`, itself first, then breadth-first back to the sources (each folder once),
    at most `max_depth` inputs away."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        return []
    nodes, seen, queue = [], {path.resolve()}, [(path, manifest, 0)]
    while queue and len(nodes) < max_nodes:
        here, m, depth = queue.pop(0)
        node = _node(here, m, depth)
        nodes.append(node)
        for i in node.inputs:
            if i.resolved is None:
                continue
            r = Path(i.resolved).resolve()
            child = read_manifest(r) if r.is_dir() else None
            if child is not None and r not in seen and (max_depth is None or depth < max_depth):
                seen.add(r)
                shown = Path(i.path) if Path(i.path).resolve() == r else Path(i.resolved)  # as recorded when it can
                queue.append((shown, child, depth + 1))
    return nodes


def _natural(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def outputs_below(folder: Path, max_depth: int = 4) -> list[tuple[Path, dict]]:
    """The outputs alignpipe wrote inside `folder` (a run folder): (path relative to it, manifest), shallow ones
    first, by folder in natural order (iter-2 before iter-10), in the order they were made within a folder; not
    inside another output (shards), not half-written (hidden folders)."""
    found, level = [], [Path(folder)]
    for _ in range(max_depth):
        below = []
        for d in level:
            for child in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
                m = read_manifest(child)
                if m is not None:
                    found.append((child.relative_to(folder), m))
                else:
                    below.append(child)
        level = below
    return sorted(found, key=lambda x: (len(x[0].parts), _natural(x[0].parent), x[1].get("started_at") or ""))


def stages(nodes: list[Node]) -> list[str]:
    """The distinct stages of a chain, from the target back to the sources."""
    return list(dict.fromkeys(n.stage for n in nodes))


def sources(nodes: list[Node]) -> list[Input]:
    """Inputs that alignpipe did not write (prompt files, base models) or that are missing."""
    return [i for n in nodes for i in n.inputs if i.status in ("source", "missing")]


def to_json(nodes: list[Node]) -> list[dict]:
    return [asdict(n) for n in nodes]


def _short(value, width: int = 100) -> str:
    import json

    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= width else text[:width - 3] + "..."


def _figures(n: Node) -> str:
    return ", ".join(x for x in (f"{n.num_rows} rows" if n.num_rows is not None else "",
                                 f"{n.seconds:.1f} s" if n.seconds is not None else "",
                                 n.started_at or "", f"fingerprint {n.fingerprint}" if n.fingerprint else "") if x)


class _Tree:
    """The text of a chain as a tree: each output written out once, under its home (the output closest to the
    target whose input it is, so that a chain of iterations grows one level per iteration), with every later
    mention by reference; sources as leaves; nothing deeper than `depth` levels of inputs."""

    def __init__(self, nodes: list[Node], depth: int | None, config_width: int):
        self.by_path = {_key(n.path): n for n in nodes}
        self.home: dict[Path, Path] = {}
        for n in nodes:  # breadth-first: the first output met whose input it is is the closest
            for i in n.inputs:
                if i.resolved and _key(i.resolved) in self.by_path:
                    self.home.setdefault(_key(i.resolved), _key(n.path))
        self.depth, self.config_width = depth, config_width
        self.shown: set[Path] = set()
        self.cut: set[Path] = set()
        self.lines: list[str] = []

    def node(self, n: Node, level: int, status: str | None = None) -> None:
        state = f"  ({status})" if status and status != "ok" else ""
        self.lines.append(f"{'   ' * level}{'<- ' if level else ''}{n.path}  "
                          f"[{n.stage}{', ' + n.kind if n.kind else ''}]  {_figures(n)}{state}")
        self.shown.add(_key(n.path))
        inner = "   " * (level + 1)
        self.lines.append(f"{inner}rerun: {n.rerun}")
        if level == 0:
            self.lines.append(f"{inner}config: {_short(n.config, self.config_width)}")
        for i in n.inputs:
            self.input(n, i, level + 1)

    def input(self, parent: Node, i: Input, level: int) -> None:
        pad = "   " * level
        child = self.by_path.get(_key(i.resolved)) if i.resolved else None
        if child is None:
            self.lines.append(f"{pad}<- {i.path}  {i.fingerprint}  ({i.status})")
        elif self.depth is not None and level > self.depth:
            self.lines.append(f"{pad}<- {child.path}  [{child.stage}]  ...")
            self.cut.add(_key(child.path))
        elif _key(child.path) in self.shown or self.home.get(_key(child.path)) != _key(parent.path):
            where = "above" if _key(child.path) in self.shown else "below"
            self.lines.append(f"{pad}<- {child.path}  [{child.stage}]  (written out {where})")
        else:
            self.node(child, level, i.status)


def _key(path: str) -> Path:
    return Path(path).resolve()


def to_text(nodes: list[Node], config_width: int = 400, depth: int | None = None) -> str:
    """A readable chain as a tree: the output with its rerun line and config, then each of its inputs indented
    under it (the outputs alignpipe wrote with their own inputs under them, each written out once, to `depth`
    levels; sources as `<- PATH FINGERPRINT (status)`)."""
    if not nodes:
        return ""
    tree = _Tree(nodes, depth, config_width)
    tree.node(nodes[0], 0)
    if tree.cut:
        tree.lines.append(f"({len(tree.cut)} output(s) not written out below depth {depth}: --depth N for more, "
                          f"--json for every node's config)")
    return "\n".join(tree.lines)
