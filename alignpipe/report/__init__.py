"""report: what a run achieved, for `report`. Where a run keeps what (layout: policy K, iteration K, its
evaluation), what is shown of it (figures: labels, the panels that fit the run, the headline), the self-contained
report.html (html), its script-free SVG charts (svg), and the per-policy table of an RL run (rl_table).

May import: every layer below it, `alignpipe.training` included (metric names), and `schemas`.
"""
