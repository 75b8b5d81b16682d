"""The fixed schemas of every dataset that crosses a stage boundary, declared once.

Each kind is a table of columns: name, `datasets` feature type, and a one-line doc. `features(kind)` turns
the table into a `datasets.Features`; `alignpipe schema KIND` prints it; every stage validates its input
against it at the boundary (`alignpipe.data.io.read_input`).

Naming, the user's batch contract cleaned up: a prompt and up to two responses, `response1` and `response2`.
Before preference is known (annotations, weighted) the two are unordered and `preference` is
P(response1 is preferred over response2). In the pairwise and reward batches `response1` is the chosen
(preferred) response and `response2` the rejected one. In SFT and pointwise batches only `response1` exists.

Version rule: adding an optional column bumps the minor version (old data still reads); renaming or
retyping a column bumps the major version. A stage refuses a dataset whose major version is newer than
the one it knows.
"""
from __future__ import annotations

if __name__ == "schemas":  # the old top-level spelling, imported before alignpipe: become the one alignpipe.schemas
    import sys

    import alignpipe.schemas

    sys.modules[__name__] = alignpipe.schemas

from dataclasses import dataclass

SCHEMA_VERSION = "2.2"  # 1.1: response{1,2}_finish_reason; 1.2: the sampled token ids (generations on);
# 2.0: batches-* carry one `weight` per example instead of response{1,2}_weight (a renamed column: major);
# 2.1: per-token behaviour log-probs (generations on), `reference` in annotations, the batches-group kind;
# 2.2: batches-group's per-token critic values, returns and advantages (--advantage gae, PPO)


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str  # string | int32 | int64 | float64 | bool | ids (list of int32) | mask (list of int8) | floats (list
    # of float32) | messages | raw
    doc: str
    nullable: bool = False


def _c(name, dtype, doc, nullable=False):
    return Column(name, dtype, doc, nullable)


_PROMPT = [
    _c("prompt_id", "string", "Stable id of the prompt, unique within a prompts dataset (from the data or a content hash)."),
    _c("prompt", "string", "The prompt as plain text; for conversations, the last user turn."),
    _c("messages", "messages", "The conversation as [{role, content}] rendered with the chat template; [] for plain-text prompts."),
]
_REFERENCE = _c("reference", "string", "A reference answer (SFT target) when the data has one.", nullable=True)
_SPLIT = _c("split", "string", "Split name: 'train' or 'test' (held-out prompts for evaluate).")


def _response(i: int, nullable: bool) -> list[Column]:
    r = f"response{i}"
    return [
        _c(r, "string", f"Text of response {i}.", nullable),
        _c(f"{r}_sample_index", "int32", f"Index of response {i} among the samples of its prompt (from generate).", nullable),
        _c(f"{r}_num_tokens", "int32", f"Number of tokens of response {i} as generated (0 when imported).", nullable),
        _c(f"{r}_behaviour_logp", "float64", f"Sum of log-probs of response {i} under the policy that sampled it.", True),
        _c(f"{r}_token_ids", "ids", f"Token ids of response {i} exactly as sampled (EOS included when produced); "
           "null when imported. Log-prob passes use them instead of re-encoding the text.", True),
        _c(f"{r}_token_logps", "floats", f"Log-prob of each token of response{i}_token_ids under the policy that "
           "sampled it (temperature 1, before top-k/top-p); null when imported. The behaviour policy of a "
           "token-level importance ratio (policy-gradient losses).", True),
        _c(f"{r}_finish_reason", "string", f"Why sampling of response {i} stopped: eos | length | stop; null when "
           "imported. A 'length' response did not end, so no end token is trained on.", True),
        _c(f"{r}_reward", "float64", f"Combined reward of response {i} (see annotator); null when unscored.", True),
        _c(f"{r}_label", "bool", f"Desirable (true) / undesirable (false) label of response {i}, pointwise data.", True),
    ]


_RAW = _c("raw", "raw", "Each annotator's raw output: [{name, score1, score2, preference, preference_12, "
          "preference_21, abstained, reason}].")
_ANNOTATION = (
    _PROMPT + [_c("reference", "string", "The prompt's reference answer, carried from generate (what verifier "
                  "annotators compare against); null when the prompts had none.", nullable=True),
               _c("iteration", "int32", "Online iteration that produced the responses (0 for imported data).")]
    + _response(1, False) + _response(2, True) + [
        _c("preference", "float64", "P(response1 preferred over response2); null for pointwise rows.", True),
        _c("annotator", "string", "Identity of the annotator(s) that produced reward/preference."),
        _RAW,
        _c("pairing", "string", "How the row was formed: pointwise | all | random | best-worst | imported."),
        _c("policy", "string", "Fingerprint of the behaviour policy that sampled the responses ('' when imported)."),
    ]
)
_WEIGHTS = [
    _c("response1_weight", "float64", "Training weight of response 1 (>= 0); a pair's example weight is the mean of both."),
    _c("response2_weight", "float64", "Training weight of response 2 (>= 0); null for pointwise rows.", True),
]


def _batch_response(i: int, *, reward: bool, ref: bool) -> list[Column]:
    r = f"response{i}"
    cols = [
        _c(r, "string", f"Text of response {i}" + (" (chosen)." if i == 1 else " (rejected).")),
        _c(f"{r}_input_ids", "ids", f"Token ids of response {i}, ending with EOS unless truncated, unpadded."),
        _c(f"{r}_attention_mask", "mask", f"Attention mask of response {i} (ones; zeros appear only when collated)."),
    ]
    if reward:
        cols.append(_c(f"{r}_reward", "float64", f"Reward of response {i}; null when unknown.", True))
    if ref:
        cols.append(_c(f"{r}_ref_logp", "float64", f"Summed reference log-probs of response {i}; null unless cached.", True))
    return cols


_BATCH_HEAD = [
    _c("example_id", "string", "Stable id of the training example (prompt_id and sample indices)."),
    _c("batch_index", "int32", "Index of the optimisation batch this example belongs to; train reads in order."),
    _c("prompt_id", "string", "Id of the prompt."),
    _c("prompt", "string", "Prompt text as rendered for the model (chat template applied)."),
    _c("prompt_input_ids", "ids", "Token ids of the rendered prompt, truncated from the left, unpadded."),
    _c("prompt_attention_mask", "mask", "Attention mask of the prompt (ones; zeros appear only when collated)."),
    _c("weight", "float64", "Training weight of the example (>= 0): its response's weight, for a pair the mean of "
       "its two responses' weights (from reweight; 1 when unweighted). It counts this many times (train)."),
]

KINDS: dict[str, tuple[str, list[Column]]] = {
    "prompts": ("import", _PROMPT + [_REFERENCE, _SPLIT]),
    "generations": ("generate", _PROMPT + [
        _REFERENCE,
        _c("sample_index", "int32", "Index of this sample among the N samples of its prompt."),
        _c("response", "string", "The generated text, special tokens removed, cut at a stop string."),
        _c("num_tokens", "int32", "Number of new tokens generated (including EOS when produced)."),
        _c("finish_reason", "string", "Why sampling stopped: eos | length | stop."),
        _c("behaviour_logp", "float64", "Sum of the sampling policy's log-probs of the generated tokens."),
        _c("response_token_ids", "ids", "The generated token ids as sampled (EOS included when produced, not cut at a "
           "stop string); null when imported.", True),
        _c("response_token_logps", "floats", "Log-prob of each sampled token under the sampling policy (temperature 1, "
           "before top-k/top-p), one per response_token_ids; null when the engine does not report them.", True),
        _c("policy", "string", "Path of the policy that sampled (model folder or adapter)."),
        _c("policy_fingerprint", "string", "Content hash of the policy's weight files."),
        _c("iteration", "int32", "Online iteration number (from --iteration)."),
    ]),
    "annotations": ("annotate", _ANNOTATION),
    "weighted": ("reweight", _ANNOTATION + _WEIGHTS),
    "batches-sft": ("build-batches --task sft", _BATCH_HEAD + _batch_response(1, reward=False, ref=False)),
    "batches-reward": ("build-batches --task reward", _BATCH_HEAD + _batch_response(1, reward=True, ref=False)
                       + _batch_response(2, reward=True, ref=False) + [
        _c("margin", "float64", "Reward margin response1_reward - response2_reward (0 when unknown)."),
    ]),
    "batches-pointwise": ("build-batches --task pointwise", _BATCH_HEAD + _batch_response(1, reward=True, ref=True) + [
        _c("response1_label", "bool", "True when response 1 is desirable, false when undesirable."),
    ]),
    "batches-pairwise": ("build-batches --task pairwise", _BATCH_HEAD + _batch_response(1, reward=True, ref=True)
                         + _batch_response(2, reward=True, ref=True)),
    "batches-group": ("build-batches --task group", _BATCH_HEAD + _batch_response(1, reward=True, ref=False) + [
        _c("response1_advantage", "float64", "Advantage of response 1 from its group's rewards (--advantage); with "
           "--advantage gae the token mean of response1_token_advantages."),
        _c("response1_group_size", "int32", "Answers in the group (same prompt and iteration) it was estimated from."),
        _c("response1_behaviour_logps", "floats", "Per-token log-probs of response1_input_ids under the policy that "
           "sampled them (from generate), cut with the response when truncated."),
        _c("response1_ref_logps", "floats", "Per-token reference log-probs of response1_input_ids; null unless "
           "cached (build-batches --reference).", True),
        _c("response1_values", "floats", "The critic's value V(x, y_<t) of each token of response1_input_ids when the "
           "batches were built (--advantage gae; value clipping's V_old); null with other estimators.", True),
        _c("response1_returns", "floats", "GAE returns R_t = A_t + V_t of each token (before whitening): the value "
           "loss's target (--advantage gae); null with other estimators.", True),
        _c("response1_token_advantages", "floats", "GAE advantage A_t of each token, whitened over the batch unless "
           "whiten=false (--advantage gae): the policy loss's per-token advantage; null with other estimators "
           "(one advantage per answer, response1_advantage).", True),
    ]),
}


def producer(kind: str) -> str:
    """The command that writes datasets of `kind`."""
    return f"alignpipe {KINDS[kind][0]}"


def columns(kind: str) -> list[Column]:
    if kind not in KINDS:
        raise KeyError(kind)
    return KINDS[kind][1]


def _feature(dtype: str):
    from datasets import List, Value

    scalar = {"string": "string", "int32": "int32", "int64": "int64", "float64": "float64", "bool": "bool"}
    if dtype in scalar:
        return Value(scalar[dtype])
    if dtype == "ids":
        return List(Value("int32"))
    if dtype == "mask":
        return List(Value("int8"))
    if dtype == "floats":
        return List(Value("float32"))
    if dtype == "messages":
        return List({"role": Value("string"), "content": Value("string")})
    if dtype == "raw":
        return List({"name": Value("string"), "score1": Value("float64"), "score2": Value("float64"),
                 "preference": Value("float64"), "preference_12": Value("float64"),
                 "preference_21": Value("float64"), "abstained": Value("bool"), "reason": Value("string")})
    raise ValueError(dtype)


def features(kind: str):
    """The `datasets.Features` of a kind (imports `datasets`, so call it inside commands)."""
    from datasets import Features

    return Features({c.name: _feature(c.dtype) for c in columns(kind)})


def type_name(dtype: str) -> str:
    """A human name for a column type, used in error messages and `alignpipe schema`."""
    return {"ids": "list<int32>", "mask": "list<int8>", "floats": "list<float32>", "messages": "list<{role: string, content: string}>",
            "raw": "list<struct>"}.get(dtype, dtype)
