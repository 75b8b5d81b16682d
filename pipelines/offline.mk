# Offline recipes: each a chain of alignpipe stages whose targets are the stages' manifests.
#
#   make -f pipelines/offline.mk dpo    DATA=prefs.jsonl MODEL=path NAME=offline-dpo   # prompt/chosen/rejected
#   make -f pipelines/offline.mk sft    DATA=sft.jsonl   MODEL=path NAME=sft           # prompt/completion
#   make -f pipelines/offline.mk reward DATA=prefs.jsonl MODEL=path NAME=rm            # Bradley-Terry RM
#   make -f pipelines/offline.mk kto    DATA=labelled.jsonl MODEL=path NAME=kto        # prompt/completion/label
#
# Each recipe ends with `alignpipe report`: RUN/report/report.html (weights, training curves, lineage), report.png.
# Variables: DATA (any `alignpipe import` format), MODEL (HF folder), NAME/RUN, LOSS (pairwise loss for
# `dpo`: dpo | ipo | cdpo | robust-dpo | slic | simpo | orpo), BETA, LR, EPOCHS, BATCH, MAX_LENGTH,
# STRATEGY (reweight spec), LORA_R (0 = full fine-tuning), REF (1 = cache reference log-probs).
# Iterative DPO with a reward model is the online recipe with a reward annotator:
#   make -f pipelines/online.mk run ANNOTATOR=reward-model:RM_DIR NUM_SAMPLES=4 PAIRING=pointwise PAIRS=best-worst
# CONFIG: one YAML file with a section per stage, passed to every stage; the defaults here then give way to it,
# variables given on the command line still win (see pipelines/config.mk).
include $(dir $(lastword $(MAKEFILE_LIST)))config.mk
PY ?= python
ALIGNPIPE ?= $(PY) -m alignpipe
NAME ?= offline
RUN ?= runs/$(NAME)
DATA ?= $(error set DATA=FILE to the dataset to import)
MODEL ?= $(error set MODEL=DIR to a Hugging Face model folder)
LOSS ?= dpo
BETA ?= 0.1
LR ?= 5e-4
EPOCHS ?= 1
BATCH ?= 8
MAX_LENGTH ?= 512
STRATEGY ?= constant
LORA_R ?= 16
SEED ?= 0
LORA = $(if $(filter 0,$(LORA_R)),,$(call opt,--lora-r,LORA_R))
BB = $(ALIGNPIPE) build-batches $(RUN)/weighted --tokenizer $(MODEL) $(call opt,--batch-size,BATCH) \
     $(call opt,--max-length,MAX_LENGTH) --seed $(SEED) --out $(RUN)/batches $(CONFIG_OPT)
TRAIN = $(ALIGNPIPE) train $(RUN)/batches --policy $(MODEL) $(call opt,--lr,LR) $(call opt,--epochs,EPOCHS) \
        --seed $(SEED) --out $(RUN)/policy $(CONFIG_OPT)

REPORT = $(ALIGNPIPE) report $(RUN) --out $(RUN)/report

.PHONY: dpo sft reward kto
.DELETE_ON_ERROR:

$(RUN)/data/manifest.json: $(DATA)
	$(ALIGNPIPE) import $(DATA) --out $(RUN)/data $(CONFIG_OPT)

$(RUN)/weighted/manifest.json: $(RUN)/data/manifest.json
	$(ALIGNPIPE) reweight $(RUN)/data $(call opt,--strategy,STRATEGY) --out $(RUN)/weighted $(CONFIG_OPT)

dpo: $(RUN)/weighted/manifest.json
	$(BB) --task pairwise --reference $(MODEL)
	$(TRAIN) $(call opt,--loss,LOSS) $(call opt,--beta,BETA) $(LORA)
	$(REPORT)

kto: $(RUN)/weighted/manifest.json
	$(BB) --task pointwise --reference $(MODEL)
	$(TRAIN) --loss kto $(call opt,--beta,BETA) $(LORA)
	$(REPORT)

reward: $(RUN)/weighted/manifest.json
	$(BB) --task reward
	$(TRAIN) --loss reward --init-reward-head
	$(REPORT)

sft: $(RUN)/data/manifest.json
	$(ALIGNPIPE) build-batches $(RUN)/data --task sft --tokenizer $(MODEL) $(call opt,--batch-size,BATCH) \
	  $(call opt,--max-length,MAX_LENGTH) --seed $(SEED) --out $(RUN)/batches $(CONFIG_OPT)
	$(TRAIN) --loss sft $(LORA)
	$(REPORT)
