# CONFIG=FILE for the recipes (included by online.mk, rl.mk, offline.mk): one YAML file with a section per stage
# (generate:, annotate:, reweight:, build-batches:, train:, evaluate:), passed to every stage with --config.
# With a CONFIG, a recipe's own defaults give way to the file (or, where the file is silent, to the stage's
# default); variables given on the make command line or in the environment still win, as flags do.
#
#   $(CONFIG_OPT)                --config FILE, or nothing
#   $(call opt,--flag,VAR...)    --flag 'value of the first VAR'; left out when CONFIG is set and none of
#                                VAR... was given on the command line or in the environment
CONFIG ?=
CONFIG_OPT = $(if $(CONFIG),--config '$(CONFIG)')
given = $(filter-out file default undefined,$(foreach v,$(1),$(origin $(v))))
opt = $(if $(and $(CONFIG),$(if $(call given,$(2)),,yes)),,$(1) '$($(firstword $(2)))')
