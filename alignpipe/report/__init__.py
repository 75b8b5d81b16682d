"""report: what a run achieved, for `report`. The self-contained report.html (html), its script-free SVG charts
(svg), and the per-iteration table of an RL run (rl_table).

May import: every layer below it, `alignpipe.training` included (metric names), and `schemas`.
"""
