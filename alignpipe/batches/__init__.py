"""batches: feedback rows into training examples, for `build-batches`. The batch tasks sft / reward / pointwise
/ pairwise / group (tasks), the group task of online RL (group), group advantage estimators (advantages), and
tokenisation, mixing and length-grouped batch composition (tokenise).

May import: `alignpipe.core`, `alignpipe.data`, `alignpipe.models`, `alignpipe.feedback`, `alignpipe.schemas`.
"""
