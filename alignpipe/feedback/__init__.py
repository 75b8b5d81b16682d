"""feedback: rewards and preferences on sampled answers, for `annotate` and `reweight`. Annotators (reward
models, LM judges, HTTP judges, rules, verifiers: annotators/), pairings of a prompt's answers (pairing), and
per-sample weighting strategies (weights).

May import: `alignpipe.core`, `alignpipe.data`, `alignpipe.models`, `alignpipe.sampling`, `alignpipe.schemas`.
"""
