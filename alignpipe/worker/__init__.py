"""worker: the resident worker that the unchanged stage commands use when it runs (issue: warm models).

`alignpipe worker start` launches a fork server (`server`): one long-lived process that imports torch,
transformers and datasets once and keeps models in a cache (`cache`), but computes nothing itself. With
`ALIGNPIPE_WORKER=SOCKET` set, `alignpipe STAGE ...` (`client`) hands its argv, working folder, environment and
its stdin/stdout/stderr file descriptors to the worker over a Unix socket (`protocol`); the worker forks a
child that runs the stage exactly as a fresh process would (state reset by construction) and the client exits
with the child's exit code. Without the variable, or when no worker answers, the command runs as before.

Layer: top (with the CLI). May import: every layer below.
"""
