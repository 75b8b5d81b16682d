"""What the docs and messages say matches what the code does: component descriptions are whole sentences,
the `pointwise` pairing is documented, `build-batches --reference` names the group task, `train` names the
metrics file that stays, and a rerun that replaces an output says which option or input changed."""
from __future__ import annotations

from pathlib import Path

import pytest
from helpers import cli, ok, write_jsonl
from test_train import pairs, write_batches

from alignpipe.core.registry import first_sentence

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("doc, sentence", [
    ("One line.\n\nMore.", "One line."),
    ("Dr. GRPO (Liu et al. 2025, eq. 3): the group mean baseline\n    without the std division. Then more.",
     "Dr. GRPO (Liu et al. 2025, eq. 3): the group mean baseline without the std division."),
    ("GSPO (Zheng et al. 2025, eqs. 5 and 7): a ratio\n    per answer", "GSPO (Zheng et al. 2025, eqs. 5 and 7): a ratio per answer"),
    ("No full stop at all", "No full stop at all"),
    ("", ""),
])
def test_first_sentence(doc, sentence):
    assert first_sentence(doc) == sentence


def test_components_md_describes_whole_sentences_and_the_pointwise_pairing():
    md = (ROOT / "docs" / "components.md").read_text()
    for line in (("`dr-grpo` — Dr. GRPO (Liu et al. 2025, \"Understanding R1-Zero-Like Training\", arXiv 2503.20783, "
                 "eq. 3): the group mean baseline without the std division (no question-difficulty bias)."),
                 ("(Hu 2025, arXiv 2501.03262 v3, eq. 10): the group mean subtracted first, then the result normalised "
                 "across the whole batch."),
                 ("`best-worst` — The highest against the lowest reward, the best first (ties: the first of the highest "
                 "against the last of the lowest); unscored generations take no part; none from fewer than two scored.")):
        assert line in md
    assert "`annotate --pairing pointwise`, its default when no annotator is pairwise" in md


def test_build_batches_help_says_reference_serves_the_group_task_too():
    text = " ".join(ok("build-batches", "--help").stdout.split())
    assert "cache its log-probs (pointwise, pairwise: summed; group: per token, for a KL term)" in text


def test_train_names_the_metrics_file_that_stays(tmp_path, tiny_lm_dir):
    batches = write_batches(tmp_path / "b", "pairwise", pairs(2), tiny_lm_dir)
    done = ok("train", batches, "--policy", tiny_lm_dir, "--loss", "dpo", "--out", tmp_path / "p")
    out = tmp_path / "p"
    assert f"metrics: {out / 'metrics.jsonl'} at the end ({tmp_path / '.p.partial' / 'metrics.jsonl'} while it " \
           f"trains)" in done.stderr
    assert (out / "metrics.jsonl").is_file() and not (tmp_path / ".p.partial").exists()


def test_a_rerun_that_replaces_an_output_says_what_changed(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    out = tmp_path / "o"
    assert "replacing" not in ok("import", src, "--out", out).stderr
    changed = ok("import", src, "--out", out, "--split", "test")
    assert f"import: replacing {out}, made with other settings: --split train -> test" in changed.stderr
    assert "replacing" not in ok("import", src, "--out", out, "--split", "test", "--force").stderr
    write_jsonl(src, [{"prompt": "b"}])
    assert f"input {src} changed" in ok("import", src, "--out", out, "--split", "test").stderr
    other = cli("import", src, "--out", out, "--split", "dev", "--format", "prompts")
    assert other.exit_code == 0 and "settings: --format auto -> prompts; --split test -> dev" in other.stderr
