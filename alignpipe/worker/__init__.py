"""worker: the resident worker that the unchanged stage commands use when it runs (issue: warm models).

`alignpipe worker start` launches a fork server (`server`): one long-lived process that imports torch,
transformers and datasets once and keeps models in a cache (`cache`), but computes nothing itself. With
`ALIGNPIPE_WORKER=SOCKET` set, `alignpipe STAGE ...` (`client`) hands its argv, working folder, environment and
its stdin/stdout/stderr file descriptors to the worker over a Unix socket (`protocol`); the worker forks a
child that runs the stage exactly as a fresh process would (state reset by construction) and the client exits
with the child's exit code. Without the variable, or when no worker answers, the command runs as before.

Why a fork server: a child is a fresh process as far as the stage can tell (module state, RNG, handlers,
environment, working folder), so outputs equal those of a plain run by construction and a crash or leak in
one command cannot reach the next, while imports and model weights are paid once and shared copy-on-write.
Running stages as threads or calls inside one long process would share module state between commands.
Limits: CUDA cannot cross a fork, so cached models live on the CPU and a child moves its copy to the GPU (a
host-to-device copy instead of a load); a vLLM engine is not kept; the policy that `train` wrote is loaded
again from disk (page cache) by the next command that names it, not handed over in memory.

Layer: top (with the CLI). May import: every layer below.
"""
