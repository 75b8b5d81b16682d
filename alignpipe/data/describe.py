"""What an output is, in words, for `alignpipe inspect`: a policy (or any other output that is not a dataset)
from its manifest, and a run folder from the outputs inside it. Everything shown passes through `shown`, so
that a path or a text with control characters cannot drive the terminal."""
from __future__ import annotations

import re
from pathlib import Path

from alignpipe.data.lineage import Input, lineage
from alignpipe.data.manifest import read_manifest

_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def shown(value, width: int | None = None) -> str:
    """Text for the terminal: control characters (escape sequences) as \\xNN, newlines as a return sign, cut to
    `width` characters."""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value)).replace("\n", " \u21b5 ")
    return text if width is None or len(text) <= width else text[:width - 1] + "\u2026"


def _number(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _pairs(d: dict, width: int = 300) -> str:
    text = ", ".join(f"{k} {_number(v)}" for k, v in d.items()
                     if v is not None and v is not False and not isinstance(v, (dict, list)))
    return shown(text, width)


def _what(path: Path, m: dict) -> str:
    import json

    if m.get("stage") != "train":
        return f"an output of `alignpipe {m.get('stage', '?')}` (not a dataset)"
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        try:
            base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        except (OSError, ValueError):
            base = None
        return "a policy: a LoRA adapter" + (f" on {shown(base)}" if base else "")
    return "a policy: a merged model" if (m.get("report") or {}).get("output") == "merged" else "a policy: a model"


def _input_line(i: Input) -> str:
    m = read_manifest(Path(i.resolved)) if i.resolved else None
    if m is None:
        return f"  <- {shown(i.path)}  ({'not written by alignpipe: a source' if i.status == 'source' else i.status})"
    kind = (m.get("schema") or {}).get("kind") or ("policy" if m.get("stage") == "train" else None)
    rows = f", {m['num_rows']} rows" if m.get("num_rows") is not None else ""
    state = f", {i.status} since" if i.status != "ok" else ""
    return f"  <- {shown(i.path)}  ({m.get('stage')}{', ' + kind if kind else ''}{rows}{state})"


_BOOKKEEPING = ("step", "epoch", "global_step", "batch_index", "examples", "tokens")


def _training_lines(report: dict, config: dict) -> list[str]:
    if "steps" not in report:
        return []
    how = ", ".join(f"{k} {report[k]}" for k in ("task", "reference") if report.get(k))
    loss = report.get("loss_spec") or report.get("loss") or config.get("loss") or "?"
    lines = [f"  training:    {report['steps']} steps of {shown(loss)}"
             + (f" ({how})" if how else "")]
    final = {k: v for k, v in (report.get("final") or {}).items() if k not in _BOOKKEEPING}
    final = dict(sorted(final.items(), key=lambda kv: kv[0] != "loss"))  # the loss first
    if final:
        lines.append(f"  last step:   {_pairs(final)}")
    if report.get("optimizer"):
        lines.append(f"  optimiser:   {_pairs(report['optimizer'])}")
    return lines


def _files(path: Path) -> str:
    parts = []
    for f in sorted(path.iterdir()):
        if f.is_dir():
            parts.append(f"{f.name}/")
        elif f.suffix == ".safetensors":
            parts.append(f"{f.name} ({f.stat().st_size / 2**20:.1f} MB)")
        elif f.name in ("metrics.jsonl", "trackers.json"):
            parts.append(f.name)
    return shown(", ".join(parts))


def output_summary(path: Path, m: dict) -> list[str]:
    """A policy or other non-dataset output in a few lines: what it is, what made it from what, the training's
    figures, its files; where to look further."""
    path, report = Path(path), m.get("report") or {}
    took = f", {m['seconds']:.1f} s" if isinstance(m.get("seconds"), (int, float)) else ""
    lines = [f"{shown(path)}: {_what(path, m)}",
             f"  made by:     alignpipe {m.get('stage', '?')} at {shown(m.get('finished_at') or '?')}{took}"]
    nodes = lineage(path, max_depth=0)
    lines += [_input_line(i) for i in (nodes[0].inputs if nodes else [])]
    lines += _training_lines(report, m.get("config") or {})
    if m.get("stage") != "train" and report:
        lines.append(f"  report:      {_pairs(report)}")
    if m.get("config"):
        lines.append(f"  options:     {_pairs(m['config'])}")
    lines.append(f"  files:       {_files(path)}")
    lines.append(f"  fingerprint: {m.get('fingerprint')}")
    lines.append(f"How it was made: alignpipe lineage {shown(path)}; the manifest: alignpipe inspect {shown(path)} --json")
    return lines


def _kind(m: dict, folder: Path) -> str:
    kind = (m.get("schema") or {}).get("kind")
    if kind:
        return kind
    if m.get("stage") == "train":
        return "policy (LoRA adapter)" if (folder / "adapter_config.json").is_file() else "policy"
    return "-"


def _size(m: dict) -> str:
    if m.get("num_rows") is not None:
        return f"{m['num_rows']} rows"
    steps = (m.get("report") or {}).get("steps")
    return f"{steps} steps" if steps is not None else ""


def run_summary(folder: Path, outputs: list[tuple[Path, dict]]) -> list[str]:
    """A run folder: what it is, then one line per stage output inside it, then where to look next."""
    folder = Path(folder)
    iterations = sorted({rel.parts[0] for rel, _ in outputs if re.fullmatch(r"iter-\d+", rel.parts[0])})
    span = (f" in {len(iterations)} iteration folders ({iterations[0]} .. {iterations[-1]})" if len(iterations) > 1
            else f" in 1 iteration folder ({iterations[0]})" if iterations else "")
    lines = [f"{shown(folder)}: a run folder (not a dataset) with {len(outputs)} stage outputs{span}:"]
    width = max(len(str(rel)) for rel, _ in outputs)
    for rel, m in outputs:
        lines.append(f"  {shown(rel):<{width}}  {shown(m.get('stage', '?')):<13} {_kind(m, folder / rel):<24} "
                     f"{_size(m)}".rstrip())
    example = next((rel for rel, m in outputs if (m.get("schema") or {}).get("kind")), outputs[0][0])
    lines.append(f"Inspect one: alignpipe inspect {shown(folder / example)}; how one was made: alignpipe lineage "
                 f"PATH; the run's report: alignpipe report {shown(folder)} --out {shown(folder / 'report')}")
    return lines

