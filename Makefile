# The kit's entry points. `make` alone prints the list (from the ## comments below).
# Each target is wiring only: the work lives in bin/ and in the `jacpt` CLI (py/jacpt).

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules --no-print-directory

# ---- knobs (checked against their allowed values) -----------------------------------------
PROFILES := tiny-cpu tiny-gpu rtx6000ada-48g h100-80g
PROFILE ?= tiny-cpu
ifeq ($(filter $(PROFILE),$(PROFILES)),)
$(error PROFILE=$(PROFILE) is not one of: $(PROFILES))
endif
export PROFILE

BACKENDS := fast nemo
ifneq ($(DATA_BACKEND),)
ifeq ($(filter $(DATA_BACKEND),$(BACKENDS)),)
$(error DATA_BACKEND=$(DATA_BACKEND) is not one of: $(BACKENDS))
endif
endif

ifneq ($(filter-out 0 1,$(or $(DRY_RUN),0) $(or $(SKIP_BAD),0) $(or $(OFFLINE),0)),)
$(error DRY_RUN, SKIP_BAD and OFFLINE take 0 or 1)
endif
DRY_RUN ?= 0
SKIP_BAD ?= 0
export DRY_RUN
# OVERRIDES="key=value ..." passes settings through (highest precedence; `make config` lists them).
OVERRIDES ?=

# ---- where things run: the NeMo container's Python, or the CPU venv --------------------------
ifneq ($(wildcard /opt/NeMo),)
PYTHON := python
export PYTHONPATH := $(CURDIR)/py$(if $(PYTHONPATH),:$(PYTHONPATH))
else
PYTHON := .venv/bin/python
endif
JACPT := $(PYTHON) -m jacpt.cli
STAMPS := .stamps
BATS := node_modules/bats/bin/bats

# ---- setup --------------------------------------------------------------------------------
.PHONY: help
help: ## show this list
	@printf 'Usage: make <target> [PROFILE=%s] [KNOB=value ...]\n\n' "$(subst $() $(),|,$(PROFILES))"
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@printf '\nKnobs: PROFILE DATA_SOURCE=llmjp|sample|<dir> SHARDS=0-13 JAWIKI_BASE_URL=<url> DATA_BACKEND=fast|nemo\n'
	@printf '       SKIP_BAD=1 DRY_RUN=1 OVERRIDES="key=value ..."   (details: README.md)\n'

.PHONY: setup
setup: $(STAMPS)/setup ## install everything (CPU venv, test tools); idempotent

$(STAMPS)/setup: $(STAMPS)/python $(if $(wildcard /opt/NeMo),,$(STAMPS)/npm)
	@touch $@

$(STAMPS)/python: bin/setup py/requirements-cpu.txt py/constraints-cpu.txt pyproject.toml
	bin/setup
	@mkdir -p $(@D) && touch $@

$(STAMPS)/npm: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@mkdir -p $(@D) && touch $@

.PHONY: assets
assets: $(STAMPS)/assets ## build the embedded tokenizer and tiny model (offline)

$(STAMPS)/assets: $(STAMPS)/python py/jacpt/assets.py py/jacpt/templates/qwen25_chat_template.jinja
	$(JACPT) assets --force
	@[[ $(DRY_RUN) == 1 ]] || touch $@

.PHONY: config
config: $(STAMPS)/python ## show the resolved settings of PROFILE and where each came from
	$(JACPT) config $(OVERRIDES)

.PHONY: preflight
preflight: $(STAMPS)/python ## can this box run PROFILE? versions, GPU, disk, wandb, data; memory/time estimates
	$(JACPT) preflight $(OVERRIDES)

# ---- stages -------------------------------------------------------------------------------
# Each stage checks the box first for what that stage needs (`jacpt preflight --stage`: a short block
# on stderr; fatal only where the stage would fail); a dry run skips it, so it works anywhere.
PREFLIGHT = $(if $(filter 1,$(DRY_RUN)),,$(JACPT) preflight --stage $(1) $(OVERRIDES) >&2 &&)

.PHONY: data
data: $(STAMPS)/python $(if $(filter 1,$(DRY_RUN)),,$(STAMPS)/assets) ## download, clean and tokenise the corpus; build LoRA data
	$(call PREFLIGHT,data) $(JACPT) data $(if $(filter 1,$(SKIP_BAD)),--skip-bad) $(OVERRIDES)

.PHONY: import
import: $(STAMPS)/python $(if $(filter 1,$(DRY_RUN)),,$(STAMPS)/assets) ## convert the HF model (HF_MODEL_DIR) to a NeMo checkpoint, embeddings tied
	$(call PREFLIGHT,import) $(JACPT) import $(OVERRIDES)

.PHONY: cpt
cpt: $(STAMPS)/python ## continual pre-training from the import on the data (resumes if interrupted)
	$(call PREFLIGHT,cpt) $(JACPT) cpt $(OVERRIDES)

.PHONY: lora
lora: $(STAMPS)/python ## LoRA from the last CPT checkpoint on the LoRA examples
	$(call PREFLIGHT,lora) $(JACPT) lora $(OVERRIDES)

.PHONY: export
export: $(STAMPS)/python ## hand-off: CPT and LoRA-merged HF models with card, checksums, wandb artifact
	$(call PREFLIGHT,export) $(JACPT) export $(OVERRIDES)

.PHONY: demo
demo: $(STAMPS)/python ## base / CPT / LoRA answers side by side (INTERACTIVE=1 for a chat loop)
	$(call PREFLIGHT,demo) $(JACPT) demo $(if $(filter 1,$(INTERACTIVE)),--interactive) $(OVERRIDES)

.PHONY: eval
eval: $(STAMPS)/python ## base vs CPT vs LoRA: perplexity, Japanese-answer rate, EM/chrF/BLEU, loops
	$(call PREFLIGHT,eval) $(JACPT) eval $(OVERRIDES)

.PHONY: rehearse
rehearse: $(STAMPS)/python ## the timed demo script against its budgets (OFFLINE=1 forbids network; SCRIPT=<yaml>)
	$(JACPT) rehearse $(if $(filter 1,$(OFFLINE)),--offline) $(if $(SCRIPT),--script $(SCRIPT)) $(OVERRIDES)

.PHONY: report
report: $(STAMPS)/python ## offline HTML + Markdown report of the last good runs (the backup on the day)
	$(JACPT) report $(OVERRIDES)

CHAIN := data import cpt lora export demo eval

.PHONY: quickstart
quickstart: ## the main job on the embedded default: the whole chain, tiny model, sample corpus, CPU
	$(MAKE) $(CHAIN) PROFILE=tiny-cpu DATA_SOURCE=sample

.PHONY: gpu-smoke
gpu-smoke: ## the whole tiny chain on a GPU, with NeMo's CUDA-only generation
	@command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 || { echo "gpu-smoke needs a CUDA GPU (nvidia-smi found none); on CPU use make quickstart" >&2; exit 1; }
	$(MAKE) $(CHAIN) PROFILE=tiny-gpu DATA_SOURCE=sample

# ---- container ------------------------------------------------------------------------------
# IMAGE, NEMO_IMAGE, GPUS, SHM_SIZE and DOCKER reach the scripts through the environment.
.PHONY: docker-build
docker-build: ## build the image IMAGE=jacpt:25.04 FROM NEMO_IMAGE=nvcr.io/nvidia/nemo:25.04
	bin/docker-build

.PHONY: docker-run
docker-run: ## a shell in the container, kit at /workspace; CMD="make data cpt" runs that (GPUS=N|none)
	bin/docker-run $(if $(CMD),bash -c "$$CMD")

# ---- checks ---------------------------------------------------------------------------------
SHELL_FILES = $(shell grep -lE '^\#!/usr/bin/env bash' bin/* .ci/run 2>/dev/null) bin/lib.sh \
              $(wildcard tests/bats/*.bats tests/bats/test_helper/*.bash)

.PHONY: test
test: lint bats pytest ## everything CI runs: shellcheck, hadolint, bats, pytest

.PHONY: lint
lint: $(STAMPS)/setup ## shellcheck and hadolint
	.venv/bin/shellcheck -x $(SHELL_FILES)
	.venv/bin/hadolint docker/Dockerfile

.PHONY: bats
bats: $(STAMPS)/setup ## shell and Makefile tests
	$(BATS) tests/bats

.PHONY: pytest
pytest: $(STAMPS)/setup $(STAMPS)/assets ## Python tests (CPU; GPU tests skip with a reason)
	$(PYTHON) -m pytest

.PHONY: bench-data
bench-data: $(STAMPS)/python $(STAMPS)/assets ## tokeniser throughput table (a benchmark, not a test)
	$(JACPT) bench-data

.PHONY: bench
bench: $(STAMPS)/python $(STAMPS)/assets ## GPU throughput table: NeMo CPT/LoRA vs transformers vs peak, generation (BENCH_ARGS="--only cpt")
	$(JACPT) bench $(BENCH_ARGS)

.PHONY: clean
clean: ## remove generated data and runs (keeps downloads in data/raw, the venv and assets)
	find data -mindepth 1 -maxdepth 1 ! -name raw -exec rm -rf {} + 2>/dev/null || true
	rm -rf runs

.PHONY: distclean
distclean: clean ## also remove the venv, node_modules, assets, stamps and downloads
	rm -rf .venv node_modules assets data $(STAMPS)
