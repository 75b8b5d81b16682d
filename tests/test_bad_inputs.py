"""The bad-input catalogue: one table, one parametrised test per case, and docs/bad-inputs.md generated from it.

Each refused input must give exactly one error line that names the problem and where it is (it must match
the case's `message`, where IN, OUT, MODEL, CFG, SRC stand for the paths of the case and … for any text), a
non-zero exit code, no traceback (unless --debug), and no output: no OUT, no .OUT.tmp*, no .OUT.partial,
the lock released. Usage errors (bad flags or config values) are click's: the same line as `Error: ...`
after the usage hint. A few inputs are handled by design and counted instead (HTTP 429 retried, a judge's
garbage abstained, empty responses dropped, ...): for those the case says what happens and asserts it.

    python tests/test_bad_inputs.py    # rewrites docs/bad-inputs.md from CASES
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import (
    GENERATIONS,
    JudgeServer,
    assert_clean_failure,
    cli,
    leftovers,
    manifest,
    ok,
    pair,
    prompt,
    rows_of,
    weighted,
    write_dataset,
    write_jsonl,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_lm_dir):
    """Valid inputs of every kind, to derive the bad ones from."""
    d = tmp_path_factory.mktemp("valid")
    paths = {
        "prompts": write_dataset(d / "prompts", "prompts", [prompt(i) for i in range(2)]),
        "generations": write_dataset(d / "generations", "generations", GENERATIONS),
        "annotations": write_dataset(d / "annotations", "annotations", [pair(i) for i in range(4)]),
        "weighted": write_dataset(d / "weighted", "weighted", [weighted(i) for i in range(4)]),
    }
    paths["batches"] = d / "batches"
    ok("build-batches", paths["weighted"], "--task", "pairwise", "--tokenizer", tiny_lm_dir, "--batch-size", 2,
       "--out", paths["batches"])
    return paths


@pytest.fixture(scope="module")
def server():
    s = JudgeServer()
    yield s
    s.close()


@dataclass
class Ctx:
    """What a case builds its input from; `names` are the paths its message may name (IN, MODEL, ...)."""

    tmp: Path
    data: dict
    lm: Path
    rm: Path
    nopad: Path
    notemplate: Path
    server: JudgeServer
    names: dict = field(default_factory=dict)
    cleanups: list = field(default_factory=list)

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def name(self, key: str, path: Path) -> Path:
        self.names[key] = path
        return path

    def dataset(self, kind: str, rows: list[dict], **kw) -> Path:
        return self.name("IN", write_dataset(self.tmp / f"bad-{kind}", kind, rows, **kw))

    def config(self, text: str) -> Path:
        path = self.name("CFG", self.tmp / "config.yaml")
        path.write_text(text)
        return path

    def jsonl(self, lines: list, raw: bytes | None = None) -> Path:
        path = self.name("SRC", self.tmp / "data.jsonl")
        if raw is not None:
            path.write_bytes(raw)
            return path
        return write_jsonl(path, lines)


@dataclass
class Case:
    id: str
    input: str  # the bad input, in words (the doc's first column)
    command: str  # the stage that meets it
    build: Callable[[Ctx], list]  # -> the command line (its --out is ctx.out)
    message: str = ""  # the expected error line: IN/OUT/MODEL/CFG/SRC = paths, … = any text
    code: int = 2
    behaviour: str = ""  # for inputs handled by design: what happens (exit 0)
    check: Callable | None = None  # for those: asserts on (ctx, result)
    allow: tuple = ()  # leftovers kept by design (e.g. the checkpoints a rerun resumes from)
    xfail: str = ""  # a known bug in code this suite does not own: file:line and what happens


# ------------------------------------------------------------------------------------ the case builders
def annotate(c: Ctx, path: Path, *extra) -> list:
    return ["annotate", path, "-a", "length", *extra, "--out", c.out]


def batches(c: Ctx, path: Path, *extra) -> list:
    return ["build-batches", path, "--task", "pairwise", "--tokenizer", c.lm, *extra, "--out", c.out]


def generate(c: Ctx, prompts: Path, policy: Path, *extra) -> list:
    return ["generate", prompts, "--policy", policy, "--num-samples", 1, "--max-new-tokens", 4, "--device", "cpu",
            *extra, "--out", c.out]


def train(c: Ctx, path: Path, *extra) -> list:
    return ["train", path, "--policy", c.lm, "--loss", "dpo", "--device", "cpu", *extra, "--out", c.out]


def http(c: Ctx, mode: str, **options) -> list:
    c.server.mode, c.server.requests = mode, 0
    return ["annotate", c.data["generations"], "-a", c.server.spec(**options), "--cache-dir", c.tmp / "cache",
            "--out", c.out]


def mistyped(c: Ctx) -> Path:
    from datasets import Value

    from alignpipe import schemas

    feats = schemas.features("generations")
    feats["num_tokens"] = Value("string")
    rows = [{**g, "num_tokens": str(g["num_tokens"])} for g in GENERATIONS]
    return c.dataset("generations", rows, features=feats)


def missing_column(c: Ctx) -> Path:
    from alignpipe import schemas

    feats = schemas.features("generations")
    del feats["response"]
    return c.dataset("generations", GENERATIONS, features=feats)


def no_manifest(c: Ctx) -> Path:
    import shutil

    path = c.name("IN", c.tmp / "no-manifest")
    shutil.copytree(c.data["generations"], path)
    (path / "manifest.json").unlink()
    return path


def corrupted_arrow(c: Ctx) -> Path:
    import shutil

    path = c.name("IN", c.tmp / "corrupted")
    shutil.copytree(c.data["generations"], path)
    arrow = next(path.glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:40] + b"\x00garbage" * 8)
    return path


def incomplete_parts(c: Ctx) -> Path:
    path = c.name("IN", c.tmp / "parts")
    write_dataset(path / "part-00000-of-00002", "generations", GENERATIONS[:2])
    return path


def not_a_dataset(c: Ctx) -> Path:
    path = c.name("IN", c.tmp / "plain")
    path.mkdir()
    (path / "notes.txt").write_text("hello")
    return path


def model_copy(c: Ctx, drop: tuple = (), name: str = "model") -> Path:
    import shutil

    path = c.name("MODEL", c.tmp / name)
    shutil.copytree(c.lm, path, ignore=shutil.ignore_patterns(*drop))
    return path


def truncated_weights(c: Ctx) -> Path:
    path = model_copy(c)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return path


def failing_template(c: Ctx) -> Path:
    path = model_copy(c)
    (path / "chat_template.jinja").write_text("{{ raise_exception('this model takes no system prompt') }}")
    return path


def pickle_only(c: Ctx) -> Path:
    import torch
    from safetensors.torch import load_file

    path = model_copy(c, drop=("*.safetensors",))
    torch.save(load_file(str(c.lm / "model.safetensors")), path / "pytorch_model.bin")
    return path


def foreign_adapter(c: Ctx) -> Path:
    """A LoRA adapter made on the tiny LM, naming a base model of another shape."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    other = c.tmp / "other-base"
    cfg = LlamaConfig(vocab_size=1028, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(cfg).save_pretrained(other)
    for f in c.lm.glob("tokenizer*"):
        (other / f.name).write_bytes(f.read_bytes())
    adapter = c.name("MODEL", c.tmp / "adapter")
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(str(c.lm)), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(adapter)
    conf = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**conf, "base_model_name_or_path": str(other)}))
    return adapter


def diverged_checkpoint(c: Ctx, truncate: bool) -> list:
    args = train(c, c.data["batches"], "--lr", "1e30", "--max-grad-norm", "0", "--save-every", 1,
                 "--scheduler", "constant")
    c.name(".OUT.partial", c.tmp / ".out.partial")
    if truncate:
        assert cli(*args).exit_code == 1  # diverges at step 2, keeping checkpoint-000001
        ckpt = c.tmp / ".out.partial" / "checkpoint-000001"
        data = (ckpt / "optimizer.pt").read_bytes()
        (ckpt / "optimizer.pt").write_bytes(data[: len(data) // 2])
    return args


def foreign_token_ids(c: Ctx) -> Path:
    rows = rows_of(c.data["batches"])
    rows[1]["response2_input_ids"] = [5000, 5001]
    rows[1]["response2_attention_mask"] = [1, 1]
    return c.dataset("batches-pairwise", rows)


def user_function(c: Ctx, body: str) -> str:
    module = c.tmp / "catalogue_fn.py"
    module.write_text(f"def score(prompt, response):\n    return {body}\n")
    sys.modules.pop("catalogue_fn", None)  # the test put c.tmp first on sys.path
    return "function:catalogue_fn:score"


def hold_lock(c: Ctx) -> Path:
    """Lock OUT as a live writer would (this process holds the kernel lock, the test releases it)."""
    from alignpipe.data.output import Lock

    lock = Lock(c.out)
    lock.acquire()

    def release():
        assert lock.path.exists() and json.loads(lock.path.read_text())["pid"] == os.getpid()  # left alone
        lock.release()

    c.cleanups.append(release)
    return c.name("OUT", c.out)


def bad_template(c: Ctx) -> Path:
    path = c.name("TEMPLATE", c.tmp / "judge.txt")
    path.write_text("Which is better? A: {response_a} Answer 1 or 2.")
    return path


def weight_function(c: Ctx, value: str) -> str:
    module = c.tmp / "catalogue_weights.py"
    module.write_text(f"def weights(rows):\n    return [{value}] * len(rows['response1'])\n")
    sys.modules.pop("catalogue_weights", None)
    return "function:catalogue_weights:weights"


def report(c: Ctx) -> dict:
    return manifest(c.out)["report"]


def _http_abstained(reason: str):
    def check(c: Ctx, result) -> None:
        rows = rows_of(c.out)
        assert len(rows) == 2 and all(r["preference"] is None and r["raw"][0]["abstained"] for r in rows)
        r = report(c)
        assert list(r["abstentions"].values()) == [2], r
        assert any(reason in x for x in next(iter(r["abstention_reasons"].values()))), r
    return check


# -------------------------------------------------------------------------------------------- the table
CASES = [
    # -- datasets at the boundary (every stage reads through alignpipe.data.io.read_input)
    Case("missing-column", "generations without the `response` column", "annotate",
         lambda c: annotate(c, missing_column(c)),
         "error: IN: missing column 'response' (expected string; generations datasets are written by "
         "`alignpipe generate`)"),
    Case("mistyped-column", "`num_tokens` stored as strings", "annotate",
         lambda c: annotate(c, mistyped(c)),
         "error: IN: column 'num_tokens' has type string, expected int32 (generations datasets are written by "
         "`alignpipe generate`)"),
    Case("wrong-kind", "a prompts dataset where generations are expected", "annotate",
         lambda c: annotate(c, c.name("IN", c.data["prompts"])),
         "error: IN: is a 'prompts' dataset; `annotate` needs generations from `alignpipe generate`, "
         "annotations from `alignpipe annotate`"),
    Case("newer-schema", "schema version 3.0 in the manifest (this alignpipe knows 2.x)", "annotate",
         lambda c: annotate(c, c.dataset("generations", GENERATIONS, version="3.0")),
         "error: IN: schema version 3.0 is newer than this alignpipe's …; upgrade alignpipe"),
    Case("empty-dataset", "a generations dataset with 0 rows", "annotate",
         lambda c: annotate(c, c.dataset("generations", [])),
         "error: IN: the dataset is empty (0 rows); `annotate` needs at least one row"),
    Case("no-manifest", "a dataset folder without alignpipe's manifest.json", "annotate",
         lambda c: annotate(c, no_manifest(c)),
         "error: IN: no alignpipe manifest, so its kind is unknown; `annotate` needs generations or annotations "
         "(bring outside data in with `alignpipe import`)"),
    Case("not-a-dataset", "a folder holding a text file", "annotate",
         lambda c: annotate(c, not_a_dataset(c)),
         "error: IN: not a dataset folder (no dataset_info.json/state.json); bring outside data in with "
         "`alignpipe import`"),
    Case("missing-input", "an input path that does not exist", "annotate",
         lambda c: annotate(c, c.name("IN", c.tmp / "nope")),
         "error: IN: no such file or folder"),
    Case("corrupted-arrow", "a dataset whose .arrow file is overwritten with garbage", "annotate",
         lambda c: annotate(c, corrupted_arrow(c)),
         "error: IN: cannot read the dataset (…)"),
    Case("incomplete-parts", "a multi-process output with part 1 of 2 missing", "annotate",
         lambda c: annotate(c, incomplete_parts(c)),
         "error: IN: incomplete multi-process output: parts [1] of 2 are missing"),
    # -- outside data (import)
    Case("invalid-utf8", "a JSONL file with a byte that is not UTF-8 on line 2", "import",
         lambda c: ["import", c.jsonl([], raw=b'{"prompt": "a"}\n{"prompt": "b\xff"}\n'), "--out", c.out],
         "error: SRC:2: invalid UTF-8 (byte 29)"),
    Case("invalid-json", "a JSONL line that is not JSON", "import",
         lambda c: ["import", c.jsonl([], raw=b'{"prompt": "a"}\n{"prompt": \n'), "--out", c.out],
         "error: SRC:2: invalid JSON (Expecting value)"),
    Case("unknown-layout", "rows whose columns match no known format", "import",
         lambda c: ["import", c.jsonl([{"question": "a"}]), "--out", c.out],
         "error: SRC: unknown layout; columns found: question; formats known: …; map columns with --column "
         "new=old"),
    Case("duplicate-ids", "two prompts with the same prompt_id", "import",
         lambda c: ["import", c.jsonl([{"prompt_id": "x", "prompt": "a"}, {"prompt_id": "x", "prompt": "b"}]),
                    "--out", c.out],
         "error: SRC: duplicate prompt_id 'x' in rows 0 and 1"),
    Case("empty-prompt", "a prompt that is only whitespace", "import",
         lambda c: ["import", c.jsonl([{"prompt": "a"}, {"prompt": "  "}]), "--out", c.out],
         "error: SRC row 1: empty prompt"),
    Case("nan-score", "a NaN score in scored completions", "import",
         lambda c: ["import", c.jsonl([], raw=b'{"prompt": "a", "completions": ["x", "y"], "scores": [1, NaN]}\n'),
                    "--out", c.out],
         "error: SRC row 0 scores[1]: score is not finite (nan)"),
    Case("inf-score", "an infinite score in scored completions", "import",
         lambda c: ["import", c.jsonl([], raw=b'{"prompt": "a", "completions": ["x"], "scores": [Infinity]}\n'),
                    "--out", c.out],
         "error: SRC row 0 scores[0]: score is not finite (inf)"),
    Case("label-not-bool", "a label that is not a boolean", "import",
         lambda c: ["import", c.jsonl([{"prompt": "a", "completion": "b", "label": "maybe"}]), "--out", c.out],
         "error: SRC row 0: 'label' must be a boolean, found 'maybe'"),
    # -- feedback rows (build-batches, reweight)
    Case("nan-reward", "a NaN reward in annotations", "build-batches",
         lambda c: batches(c, c.dataset("annotations", [pair(0), pair(1, response1_reward=math.nan)])),
         "error: IN row 1: column 'response1_reward' is nan (not finite)"),
    Case("inf-reward", "an infinite reward in annotations", "build-batches",
         lambda c: batches(c, c.dataset("annotations", [pair(0, response2_reward=-math.inf)])),
         "error: IN row 0: column 'response2_reward' is -inf (not finite)"),
    Case("negative-weight", "a negative training weight", "build-batches",
         lambda c: batches(c, c.dataset("weighted", [weighted(0), weighted(1, response2_weight=-0.5)])),
         "error: IN row 1: column 'response2_weight' is -0.5; weights must be finite and >= 0 (written by "
         "`alignpipe reweight`)"),
    Case("nan-weight", "a NaN training weight", "build-batches",
         lambda c: batches(c, c.dataset("weighted", [weighted(0, response1_weight=math.nan)])),
         "error: IN row 0: column 'response1_weight' is nan; weights must be finite and >= 0 (written by "
         "`alignpipe reweight`)"),
    Case("bad-probability", "a preference of 1.5", "build-batches",
         lambda c: batches(c, c.dataset("annotations", [pair(0, preference=1.5)])),
         "error: IN row 0: column 'preference' is 1.5; a probability must be in [0, 1]"),
    Case("mismatched-pair-ids", "a pair whose two responses carry the same sample index", "build-batches",
         lambda c: batches(c, c.dataset("annotations", [pair(0, response2_sample_index=0)])),
         "error: IN row 0: mismatched pair ids: response1_sample_index 0 and response2_sample_index 0 must be "
         "two different samples"),
    Case("duplicate-generation", "the same (prompt_id, sample_index) twice in generations", "annotate",
         lambda c: annotate(c, c.dataset("generations", GENERATIONS + [GENERATIONS[1]])),
         "error: IN: rows 1 and 4 are both prompt_id p0 sample 1"),
    Case("empty-response", "an empty response in a pair", "build-batches",
         lambda c: batches(c, c.dataset("annotations", [pair(0), pair(1, response2="  ")])),
         behaviour="the pair is dropped and counted (`empty_response_dropped` in the manifest's report)",
         check=lambda c, r: (report(c)["inputs"][0]["empty_response_dropped"] == 1
                             and report(c)["examples"] == 1) or pytest.fail(str(report(c)))),
    Case("tie", "a preference of exactly 0.5", "build-batches",
         lambda c: batches(c, c.dataset("annotations", [pair(0), pair(1, preference=0.5)])),
         behaviour="the tie is dropped and counted (`ties_dropped` in the manifest's report)",
         check=lambda c, r: report(c)["inputs"][0]["ties_dropped"] == 1 or pytest.fail(str(report(c)))),
    Case("over-long-prompt", "prompts longer than --max-prompt-length", "build-batches",
         lambda c: batches(c, c.data["weighted"], "--max-prompt-length", 8),
         behaviour="cut from the left to the limit and counted (`prompts_truncated`)",
         check=lambda c, r: (report(c)["prompts_truncated"] == 4
                             and max(len(x["prompt_input_ids"]) for x in rows_of(c.out)) == 8)
         or pytest.fail(str(report(c)))),
    Case("over-long-prompt-generate", "prompts longer than --max-prompt-length", "generate",
         lambda c: generate(c, c.data["prompts"], c.lm, "--max-prompt-length", 8),
         behaviour="cut from the left (the question and the generation prompt are kept) and counted "
                   "(`long_prompts`)",
         check=lambda c, r: report(c)["long_prompts"] == {"truncated": 2} or pytest.fail(str(report(c)))),
    Case("every-prompt-too-long", "every prompt longer than --max-prompt-length, with --long-prompts skip",
         "generate",
         lambda c: generate(c, c.name("IN", c.data["prompts"]), c.lm, "--max-prompt-length", 8, "--long-prompts",
                            "skip"),
         "error: IN: every prompt is longer than --max-prompt-length 8 tokens and --long-prompts skip dropped "
         "them all; nothing to generate"),
    # -- models and tokenizers
    Case("model-without-config", "a model folder without config.json", "generate",
         lambda c: generate(c, c.data["prompts"], model_copy(c, drop=("config.json",))),
         "error: policy MODEL: missing config.json (not a Hugging Face model folder)"),
    Case("model-without-weights", "a model folder without weight files", "generate",
         lambda c: generate(c, c.data["prompts"], model_copy(c, drop=("*.safetensors",))),
         "error: policy MODEL: no weight files (*.safetensors)"),
    Case("truncated-weights", "a model.safetensors cut in half", "generate",
         lambda c: generate(c, c.data["prompts"], truncated_weights(c)),
         "error: policy MODEL: cannot load (SafetensorError: Error while deserializing header: …)"),
    Case("chat-template-error", "a chat template that fails to render (raise_exception)", "generate",
         lambda c: generate(c, c.name("IN", c.data["prompts"]), failing_template(c)),
         "error: IN row 0 (prompt_id p0): the chat template … (TemplateError: this model takes no system prompt)"),
    Case("pickle-only-weights", "a model folder with only pytorch_model.bin (pickle)", "generate",
         lambda c: generate(c, c.data["prompts"], pickle_only(c)),
         "error: policy MODEL: only pickle weights (*.bin); convert to safetensors or pass --allow-pickle if you "
         "trust the source"),
    Case("adapter-for-another-base", "a LoRA adapter whose base model has other shapes", "generate",
         lambda c: generate(c, c.data["prompts"], foreign_adapter(c)),
         "error: policy MODEL: adapter does not fit its base model …"),
    Case("no-pad-token", "a tokenizer without a pad token", "generate",
         lambda c: generate(c, c.data["prompts"], c.nopad),
         behaviour="the EOS token pads (prompts are left-padded, the rows are as with a pad token)",
         check=lambda c, r: len(rows_of(c.out)) == 2 or pytest.fail(r.output)),
    Case("messages-without-template", "a conversation prompt for a tokenizer without a chat template",
         "generate",
         lambda c: generate(c, c.dataset("prompts", [prompt(0, messages=[{"role": "user", "content": "Hi"}])]),
                            c.notemplate),
         "error: IN row 0 (prompt_id p0): conversational prompt but the tokenizer has no chat template; pass "
         "--chat-template FILE (a Jinja template)"),
    Case("token-ids-beyond-vocab", "batches tokenised for a bigger vocabulary than the policy's", "train",
         lambda c: train(c, foreign_token_ids(c)),
         "error: IN: column 'response2_input_ids' holds token id 5001 >= the policy's vocabulary size …"),
    Case("batches-for-another-loss", "pairwise batches given to --loss sft", "train",
         lambda c: ["train", c.name("IN", c.data["batches"]), "--policy", c.lm, "--loss", "sft", "--out", c.out],
         "error: IN: is a batches-pairwise dataset but --loss sft trains on batches-sft (build them with "
         "`alignpipe build-batches --task sft`)"),
    Case("truncated-checkpoint", "a checkpoint whose optimizer.pt was cut in half", "train",
         lambda c: diverged_checkpoint(c, truncate=True),
         "error: checkpoint .OUT.partial/checkpoint-000001: optimizer.pt is truncated (… bytes); delete that folder to start over (or rerun "
         "with --force)", allow=(".out.partial",)),
    Case("diverging-loss", "a learning rate of 1e30 (the loss becomes non-finite)", "train",
         lambda c: diverged_checkpoint(c, truncate=False),
         "error: gradient norm is nan at step 2; training stopped, last good checkpoint kept: "
         ".OUT.partial/checkpoint-000001; lower --lr or check the batch", code=1, allow=(".out.partial",)),
    # -- judges
    Case("judge-garbage", "an HTTP judge answering prose instead of a label", "annotate",
         lambda c: http(c, "garbage"), behaviour="abstention, counted per annotator in the report",
         check=_http_abstained("unparseable verdict 'I think response")),
    Case("http-429", "HTTP 429 (rate limited) once", "annotate",
         lambda c: http(c, "429-then-ok"), behaviour="retried after Retry-After, then answered (retries counted)",
         check=lambda c, r: (report(c)["annotators"][0]["this_run"]["retries"] == 1
                             and [x["preference"] for x in rows_of(c.out)] == [1.0, 1.0])
         or pytest.fail(str(report(c)))),
    Case("http-500", "HTTP 500 on every request", "annotate",
         lambda c: http(c, "500"), behaviour="retried, then an abstention with the reason, counted",
         check=_http_abstained("HTTP 500 after 2 attempts")),
    Case("http-timeout", "an HTTP judge slower than timeout=", "annotate",
         lambda c: http(c, "slow", timeout=0.2, retries=0), behaviour="an abstention with the reason, counted",
         check=_http_abstained("timed out after 1 attempts")),
    Case("http-invalid-json", "an HTTP judge answering invalid JSON", "annotate",
         lambda c: http(c, "badjson"), behaviour="an abstention with the reason, counted",
         check=_http_abstained("invalid response body b'not json{'")),
    Case("http-401", "HTTP 401 (bad key)", "annotate", lambda c: http(c, "401"),
         "error: http://127.0.0.1:…/v1/chat/completions: HTTP 401 Unauthorized (check the URL, model 'judge-1')"),
    Case("importance-without-logps", "the importance strategy on imported pairs (no behaviour log-probs)",
         "reweight",
         lambda c: ["reweight", c.dataset("annotations", [pair(0, response1_behaviour_logp=None)]), "-s",
                    f"importance:policy={c.lm}", "--device", "cpu", "--out", c.out],
         "error: IN: row 0: column 'response1_behaviour_logp' is null; strategy importance needs it (imported "
         "data has none; importance needs samples from `alignpipe generate`)"),
    Case("negative-user-weight", "a user weight function returning a negative weight", "reweight",
         lambda c: ["reweight", c.name("IN", c.data["annotations"]), "-s", weight_function(c, "-1.0"),
                    "--out", c.out],
         "error: IN: row 0: strategy function gave response1 weight -1.0 (weights must be finite and >= 0)"),
    Case("unknown-strategy", "a reweighting strategy that is not in the table", "reweight",
         lambda c: ["reweight", c.data["annotations"], "-s", "magic", "--out", c.out],
         "error: --strategy 'magic': unknown strategy 'magic' (known: …)"),
    Case("user-function-nan", "a user reward function returning NaN", "annotate",
         lambda c: ["annotate", c.name("IN", c.data["generations"]), "-a", user_function(c, "float('nan')"),
                    "--out", c.out],
         "error: row 0 (prompt_id p0, sample 0): annotator function:catalogue_fn:score returned a non-finite "
         "reward (nan)"),
    # -- options and config files
    Case("unknown-config-key", "a config file with a key the command does not have", "import",
         lambda c: ["import", c.data["prompts"], "--config", c.config("splitt: test\n"), "--out", c.out],
         "Error: Invalid value for '--config': CFG: unknown key 'splitt' (known: …)"),
    Case("config-wrong-type", "a config value of the wrong type (num_samples: many)", "generate",
         lambda c: generate(c, c.data["prompts"], c.lm, "--config", c.config("num_samples: many\n")),
         "Error: Invalid value for '--config': CFG: key 'num_samples': …"),
    Case("config-not-yaml", "a config file that is not valid YAML", "import",
         lambda c: ["import", c.data["prompts"], "--config", c.config("split: [\n"), "--out", c.out],
         "Error: Invalid value for '--config': CFG: not valid YAML (…)"),
    Case("config-python-tag", "a config file with a !!python tag (would run code under yaml.load)", "import",
         lambda c: ["import", c.data["prompts"], "--config",
                    c.config("split: !!python/object/apply:os.system ['echo hacked']\n"), "--out", c.out],
         "Error: Invalid value for '--config': CFG: not valid YAML (…)"),
    Case("unknown-annotator-option", "an annotator spec with an unknown option", "annotate",
         lambda c: ["annotate", c.data["generations"], "-a", "length,colour=red", "--out", c.out],
         "error: --annotator 'length,colour=red': annotator 'length' has no parameter 'colour' (known: unit, weight)"),
    Case("output-locked", "an output that a live process is writing", "import",
         lambda c: ["import", c.jsonl([{"prompt": "a"}]), "--out", hold_lock(c)],
         "error: OUT: locked by pid … on … since … (…)"),
    Case("unknown-loss", "--loss that is not in the loss table", "train",
         lambda c: ["train", c.data["batches"], "--policy", c.lm, "--loss", "dpoo", "--out", c.out],
         "error: --loss 'dpoo': unknown loss 'dpoo' (known: …)"),
    Case("proximal-without-tis", "train --proximal (decoupled PPO) with a loss that has no TIS weight", "train",
         lambda c: ["train", c.data["batches"], "--policy", c.lm, "--loss", "dpo", "--proximal", "--out", c.out],
         "error: --proximal: needs a policy-gradient loss with tis_cap > 0 (the weight sg(min(pi_prox/mu, C))), "
         "e.g. --loss grpo,tis_cap=2; got --loss dpo…"),
    Case("judge-template-without-placeholders", "a pairwise judge template without {response_b}", "annotate",
         lambda c: ["annotate", c.data["generations"], "-a",
                    c.server.spec(template=bad_template(c)), "--out", c.out],
         "error: template TEMPLATE: a pairwise template needs {response_b}"),
    Case("output-is-a-file", "--out naming an existing file", "import",
         lambda c: ["import", c.jsonl([{"prompt": "a"}]), "--out", c.name("OUT", c.tmp / "data.jsonl")],
         "error: OUT: exists and is not a folder"),
    Case("negative-beta", "a negative DPO beta (it would train in the reverse direction)", "train",
         lambda c: ["train", c.data["batches"], "--policy", c.lm, "--loss", "dpo,beta=-0.1", "--out", c.out],
         "error: --loss 'dpo,beta=-0.1': loss 'dpo': beta=-0.1 is outside its range: must be in the range >0"),
    Case("ipo-tau-zero", "IPO's tau of 0 (its target margin is 1/(2 tau))", "train",
         lambda c: ["train", c.data["batches"], "--policy", c.lm, "--loss", "ipo,tau=0", "--out", c.out],
         "error: --loss 'ipo,tau=0': loss 'ipo': tau=0.0 is outside its range: must be in the range >0"),
    Case("robust-dpo-half-flipped", "robust DPO with a label-flip rate of 1/2 (it divides by 1 - 2 eps)", "train",
         lambda c: ["train", c.data["batches"], "--policy", c.lm, "--loss", "robust-dpo,label_smoothing=0.5",
                    "--out", c.out],
         "error: --loss 'robust-dpo,label_smoothing=0.5': loss 'robust-dpo': label_smoothing=0.5 is outside its "
         "range: must be in the range [0,0.5)"),
]


def test_catalogue_is_large_and_ids_are_unique():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


def expected_line(case: Case, names: dict) -> re.Pattern:
    """The case's message as a pattern: its path names replaced by the paths, … by anything."""
    tokens = sorted(names, key=len, reverse=True) + ["…"]
    parts = re.split("(" + "|".join(map(re.escape, tokens)) + ")", case.message)
    return re.compile("".join(".*" if p == "…" else re.escape(str(names.get(p, p))) for p in parts))


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=c.xfail))
                                  if c.xfail else c for c in CASES], ids=[c.id for c in CASES])
def test_bad_input(case, data, server, tmp_path, tiny_lm_dir, tiny_rm_dir, tiny_lm_nopad_dir,
                   tiny_lm_notemplate_dir, monkeypatch):
    c = Ctx(tmp_path, data, tiny_lm_dir, tiny_rm_dir, tiny_lm_nopad_dir, tiny_lm_notemplate_dir, server)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        args = case.build(c)
        result = cli(*args)
    finally:
        for cleanup in c.cleanups:
            cleanup()
    out = Path(args[args.index("--out") + 1])
    if case.check is not None:
        assert result.exit_code == 0, result.output
        case.check(c, result)
        assert leftovers(out) == []
        return
    in_the_way = out.is_file()  # the case of a file where OUT should go
    line = assert_clean_failure(result, c.tmp / "none" if in_the_way else out, code=case.code, allow=case.allow)
    assert leftovers(out) == list(case.allow)
    assert expected_line(case, c.names).fullmatch(line), f"\n{line}\n{case.message}"


def test_debug_shows_the_traceback(data, tmp_path, monkeypatch):
    from alignpipe.core import command

    monkeypatch.setitem(command.DEBUG, "on", False)  # --debug sets it for the process: restored after
    result = cli("--debug", "annotate", tmp_path / "nope", "-a", "length", "--out", tmp_path / "o")
    assert result.exit_code != 0 and isinstance(result.exception, Exception)
    assert "no such file or folder" in str(result.exception)


# ------------------------------------------------------------------------------------------------ docs
def markdown() -> str:
    head = ["| # | bad input | command | message, or what happens | exit |", "|---|---|---|---|---|"]
    rows = []
    for i, c in enumerate(CASES, 1):
        what = f"`` {c.message} ``" if c.check is None else f"*{c.behaviour}*"
        what += f" (open bug: {c.xfail})" if c.xfail else ""
        rows.append(f"| {i} | {c.input} (`{c.id}`) | `{c.command}` | {what.replace('|', '&#124;')} | "
                    f"{0 if c.check else c.code} |")
    return "\n".join(head + rows) + "\n"


DOC_HEAD = """# The bad-input catalogue

Every input below is a test: `tests/test_bad_inputs.py` holds this table (`CASES`) and runs each case through
the CLI. A refused input gives exactly one line naming the problem and where it is (IN, OUT, MODEL, CFG, SRC
stand for the paths of the case, `.OUT.partial` for OUT's resumable work, … for text that varies), the exit code shown (2: bad input or usage; 1: the
run failed, e.g. training diverged), no traceback (pass `--debug` for one), and no output: no OUT, no `.OUT.tmp*`,
no `.OUT.partial` (except a training run's checkpoints, kept to resume), the lock released. Usage errors
(bad flags, config files) are click's: the same line as `Error: ...` after the usage hint. Inputs in *italics*
are handled by design, exit 0, and counted in the output's manifest (`report`).

Regenerate after editing the table: `python tests/test_bad_inputs.py`.

"""


def test_doc_lists_every_case():
    assert DOC.read_text() == DOC_HEAD + markdown(), "docs/bad-inputs.md is stale: python tests/test_bad_inputs.py"


if __name__ == "__main__":
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(DOC_HEAD + markdown())
    print(f"wrote {DOC} ({len(CASES)} cases)")
