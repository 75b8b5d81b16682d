# WORKER=1 for the recipes (included by online.mk and rl.mk): the stages run in a resident worker
# (`alignpipe worker`), started before the first stage and stopped after the last, that keeps torch,
# transformers and the models warm across the stage commands. Outputs are the same as without it.
#
#   WORKER            1: use a worker; empty (default): every stage is its own process
#   WORKER_SOCKET     its socket (default RUN/.worker/sock, in a folder only you can enter)
#   WORKER_IDLE_EXIT  seconds a worker left by an interrupted run waits before it exits (default 300)
#   WORKER_OPTS       other `alignpipe worker start` options (e.g. --max-memory 8G)
#
#   $(WORKER_FIRST)   an order-only prerequisite of the run's first stage: starts the worker
#   $(WORKER_LAST)    a recipe line of the run's last target: stops it
WORKER ?=
WORKER_SOCKET ?= $(abspath $(RUN))/.worker/sock
WORKER_IDLE_EXIT ?= 300
WORKER_OPTS ?=
ifeq ($(WORKER),1)
export ALIGNPIPE_WORKER = $(WORKER_SOCKET)
WORKER_FIRST = | worker-start
WORKER_LAST = $(ALIGNPIPE) worker stop --socket '$(WORKER_SOCKET)'
endif

.PHONY: worker-start worker-stop
worker-start:
	$(ALIGNPIPE) worker start --socket '$(WORKER_SOCKET)' --idle-exit $(WORKER_IDLE_EXIT) $(WORKER_OPTS)
worker-stop:
	$(ALIGNPIPE) worker stop --socket '$(WORKER_SOCKET)'
