"""training: batches into a new policy, for `train`. The stage's core (train), the optimisation loop (loop),
the loss table with the sequence-level losses (losses) and token-level policy-gradient losses
(policy_gradient), batches as micro-batches (micro_batches), LoRA and checkpoints (checkpoint), several
processes (distributed, devices), and metrics with the trackers they go to (metrics, trackers).

May import: every layer below it (`core`, `data`, `models`, `sampling`, `feedback`, `batches`) and `schemas`.
"""
