"""Where a run folder keeps what: the one place that knows the pipelines' layout (pipelines/online.mk, rl.mk,
offline.mk). Policy K is the model after K training iterations; policy 0 is the start model.

    RUN/iter-K/{generations,annotations,weighted,batches}   iteration K = 1, 2, ...: answers sampled from policy
                                                            K-1, their feedback and batches, which train ...
    RUN/iter-K/policy                                       ... policy K
    RUN/eval/policy-K/{generations,scores,greedy-*,versus-0}  the held-out evaluation of policy K (K = 0, 1, ...)
    RUN/{data,weighted,batches,policy}                      an offline recipe: one iteration, policy 1

Runs written before this numbering (RUN/iter-K counted from 0, its policy being policy K+1, and RUN/eval/iter-K
evaluating policy K) are read under the same policy numbers, and so are loops by hand that keep policy K in
RUN/policy-K.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from alignpipe.data.manifest import read_manifest


@dataclass
class Layout:
    """The folders of one run, by policy number K."""

    run: Path
    iterations: dict[int, Path] = field(default_factory=dict)  # K -> the iteration folder that trained policy K
    policies: dict[int, Path] = field(default_factory=dict)  # K -> policy K's model folder (K >= 1, finished)
    evals: dict[int, Path] = field(default_factory=dict)  # K -> the held-out evaluation folder of policy K
    offline: bool = False

    def sampled_by(self, k: int) -> Path | None:
        """The iteration folder holding the training answers policy K sampled (the one that trains policy K+1)."""
        return self.iterations.get(k + 1)

    def numbers(self) -> list[int]:
        """Every policy K the run has something about: evaluated, trained, or sampled training answers."""
        return sorted(set(self.evals) | set(self.policies) | {k - 1 for k in self.iterations if not self.offline})


def _numbered(root: Path, prefix: str) -> dict[int, Path]:
    n = len(prefix)
    return {int(p.name[n:]): p for p in root.glob(f"{prefix}*") if p.name[n:].isdigit() and p.is_dir()}


def legacy(run: Path) -> bool:
    """Iterations counted from 0 (older runs): RUN/iter-0 trains policy 1."""
    return (run / "iter-0").is_dir() or (run / "eval" / "iter-0").is_dir()


def layout(run: Path) -> Layout:
    """The folders of the run at `run` (any of the layouts above; missing parts are simply absent)."""
    run = Path(run)
    offset = 1 if legacy(run) else 0  # older runs: RUN/iter-0 trained policy 1
    iterations = {k + offset: f for k, f in _numbered(run, "iter-").items()}
    evals = _numbered(run / "eval", "policy-") or _numbered(run / "eval", "iter-")
    if not iterations and any(read_manifest(run / s) for s in ("policy", "batches", "weighted", "data")):
        return Layout(run, {1: run}, {1: run / "policy"} if read_manifest(run / "policy") else {}, evals, True)
    policies = {k: f / "policy" for k, f in iterations.items() if read_manifest(f / "policy")}
    policies.update({k: f for k, f in _numbered(run, "policy-").items() if k > 0 and read_manifest(f)})
    return Layout(run, dict(sorted(iterations.items())), dict(sorted(policies.items())), dict(sorted(evals.items())))
