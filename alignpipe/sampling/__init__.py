"""sampling: answers from the current policy, for `generate`. The batched sampler with a dynamic KV cache and
per-token behaviour log-probs (engine), its fixed-shape static-cache variant (static_decode), and vLLM as an
optional engine (vllm_engine).

May import: `alignpipe.core`, `alignpipe.data`, `alignpipe.models`, `alignpipe.schemas`.
"""
