# LoRA fine-tuning on MLX, one stage a target: make all runs them in order, skipping what is up to date.
# Variables you can set:  EXP=name  OVERRIDE=file.yaml  SET="section.key=value ..."  PYTHON=python3.11  VERBOSE=1
#                         MLX_EXTRA=cuda13 (Linux with an NVIDIA GPU: use requirements-cuda13.lock)
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DELETE_ON_ERROR:
MAKEFLAGS += --no-builtin-rules
.DEFAULT_GOAL := help

PYTHON ?= python3
EXP ?=
OVERRIDE ?=
SET ?=
MLX_EXTRA ?=
BUNDLE ?=
BENCH_ARGS ?=
DEST ?=

VENV := .venv
PY := $(VENV)/bin/python
LOCK := requirements$(if $(MLX_EXTRA),-$(MLX_EXTRA)).lock
SETUP_STAMP := $(VENV)/.setup-$(basename $(LOCK)).stamp
export PIPELINE_LOCK := $(LOCK)
STATE := .state
SLICES := $(STATE)/config
VERBOSE ?=
SECTION ?=
CONFIG_ARGS := $(if $(OVERRIDE),--override $(OVERRIDE)) $(SET)
# A stage is a module of scripts/: scripts/<stage>.py, or the folder scripts/<stage>/ (its __main__.py).
RUN_STAGE := PYTHONPATH=scripts $(PY) -m
STAGE_ARGS := $(CONFIG_ARGS) $(if $(VERBOSE),--verbose)

# llama-cpp-python compiles llama.cpp at install time. A native x86 build picks up AVX-512/AMX where
# present and has been seen to crash on the first decode, so Linux x86 builds a portable AVX2 library.
ifeq ($(shell uname -s)-$(shell uname -m),Linux-x86_64)
CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
endif
export CMAKE_ARGS

# Every goal but these reads the config: .state/config.mk is remade first (one JSON slice per config
# section, each rewritten only when its content changes: shared sections in .state/config/, each
# experiment's own in runs/<experiment>/.config/). It gives EXPERIMENTS (every configured experiment),
# SELECTED (EXP, or all of them) and, from the stage registry (scripts/pipeline/stages.py), each stage's
# <stage>_TARGETS (the manifests `make <stage>` builds) and prerequisites, <stage>_DEPS for a shared
# stage and <stage>_DEPS_<experiment> for the others: the code it runs (its script or folder and every
# project module they import), its config slices, the files it reads and the manifests before it.
NO_CONFIG_GOALS := help setup lock clean distclean doctor test lint format settings experiments verify thaw bench bench-setup chat serve
ifneq ($(filter-out $(NO_CONFIG_GOALS),$(or $(MAKECMDGOALS),$(.DEFAULT_GOAL))),)
include $(STATE)/config.mk
endif

$(STATE)/config.mk: $(SETUP_STAMP) FORCE
	@PYTHONPATH=scripts $(PY) -m pipeline.config slices --out $(SLICES) --experiments-root runs --mk $@ $(CONFIG_ARGS) $(if $(EXP),experiment.name=$(EXP))

.PHONY: FORCE
FORCE:

## Show this help (the default goal)
help:
	@echo "Usage: make <target> [EXP=name] [OVERRIDE=file.yaml] [SET=\"section.key=value ...\"]"
	@echo
	@awk '/^## /{desc=substr($$0,4); next} /^[a-z][a-z-]*:/{if (desc) {split($$1,t,":"); printf "  %-10s %s\n", t[1], desc}} {desc=""}' $(MAKEFILE_LIST)

## Create .venv from the pinned, hashed lock file (once; again only when the lock changes)
setup: $(SETUP_STAMP)

$(SETUP_STAMP): $(LOCK)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "setup needs Python >= 3.11, found " + sys.version.split()[0] + ": run make setup PYTHON=python3.11 (or newer)")'
	@echo "setup: installing $(LOCK) into $(VENV) (the first time takes ~6 minutes: llama.cpp is compiled)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(PY) -m pip check
	sha256sum $(LOCK) | cut -d' ' -f1 > $(VENV)/lock.sha256
	touch $@

## Regenerate the lock files from requirements.in (needs the network; MLX_EXTRA=cuda13 for CUDA)
lock: | $(SETUP_STAMP)
	$(VENV)/bin/uv pip compile requirements.in --universal --python-version 3.11 --generate-hashes --quiet -o requirements.lock
	mkdir -p $(STATE)
	sed 's/^mlx\[cpu\]/mlx[$(or $(MLX_EXTRA),cuda13)]/' requirements.in > $(STATE)/requirements-cuda.in
	$(VENV)/bin/uv pip compile $(STATE)/requirements-cuda.in --universal --python-version 3.11 --generate-hashes --quiet -o requirements-$(or $(MLX_EXTRA),cuda13).lock

## Check the machine: platform, device, versions, which BLAS is loaded and how fast a matmul runs
doctor: | $(SETUP_STAMP)
	$(RUN_STAGE) doctor $(STAGE_ARGS)

## Talk to the model an experiment ships (ARTIFACT=id for another; prompts on stdin: one answer per line)
chat: | $(SETUP_STAMP)
	@$(RUN_STAGE) chat $(STAGE_ARGS) $(if $(EXP),experiment.name=$(EXP)) $(if $(ARTIFACT),chat.artifact=$(ARTIFACT))

## Serve the model an experiment ships over an OpenAI-compatible API (PORT=8080, HOST=127.0.0.1, ARTIFACT=id)
serve: | $(SETUP_STAMP)
	@$(RUN_STAGE) serve $(STAGE_ARGS) $(if $(EXP),experiment.name=$(EXP)) $(if $(ARTIFACT),serve.artifact=$(ARTIFACT)) $(if $(PORT),serve.port=$(PORT)) $(if $(HOST),serve.host=$(HOST))

## List every setting: its default, the values it allows and what it does (SECTION=train for one section)
settings: | $(SETUP_STAMP)
	@PYTHONPATH=scripts $(PY) -m pipeline.config describe $(SECTION)

## Run the whole pipeline for every configured experiment (or EXP=name)
all: model prepare search train fuse quantize eval package summary

## List the configured experiments and what each changes, without running anything
experiments: | $(SETUP_STAMP)
	@PYTHONPATH=scripts $(PY) -m pipeline.config experiments $(CONFIG_ARGS)

# The base model and prepared data the workspace's config names; an experiment that changes model, data
# or prepare gets its own (a variant, named after what it changes: runs/model-<variant>.manifest.json,
# data/<variant>/), made once for all experiments that share it, with the config of the first (OWNER).
# Pattern rules take each stem's prerequisites from config.mk.
.SECONDEXPANSION:

## Convert the base model (default: SmolLM2-135M-Instruct, shipped offline) into an MLX folder
model: $(model_TARGETS)

runs/model.manifest.json: $(model_DEPS) | $(SETUP_STAMP)
	$(RUN_STAGE) model $(STAGE_ARGS) experiment.name=$(model_OWNER)

runs/model-%.manifest.json: $$(model_DEPS_$$*) | $(SETUP_STAMP)
	$(RUN_STAGE) model $(STAGE_ARGS) experiment.name=$(model_OWNER_$*)

## Turn the configured dataset into train/valid/test JSONL with a data contract, catalog and quality report
prepare: $(prepare_TARGETS)

data/prepare.manifest.json: $(prepare_DEPS) | $(SETUP_STAMP)
	$(RUN_STAGE) prepare $(STAGE_ARGS) experiment.name=$(prepare_OWNER)

data/%/prepare.manifest.json: $$(prepare_DEPS_$$*) | $(SETUP_STAMP)
	$(RUN_STAGE) prepare $(STAGE_ARGS) experiment.name=$(prepare_OWNER_$*)

# Each experiment's stages: one pattern rule a stage (the stem is the experiment's name). `make all` goes
# on past a failing experiment: the stage records why (in its folder's logs/<stage>.failed.json), the
# experiment's later stages skip, and the summary at the end fails naming it. Other goals stop there.
KEEP_GOING ?= $(if $(filter all,$(MAKECMDGOALS)),1)
ON_FAILURE := $(if $(KEEP_GOING),|| true)
export PIPELINE_KEEP_GOING := $(KEEP_GOING)

## Run the hyperparameter search of sweep.search (Optuna, runs/search.db): each trial is an experiment
search: $(search_TARGETS)

# Each trial runs as `$(MAKE) package EXP=<trial> IN_SEARCH=1 KEEP_GOING=1`; outside the search a trial's
# stages wait for it (AFTER_<trial>, order-only), so `make -j2 all` never runs one twice at once.
runs/search.manifest.json: $(search_DEPS) | $(SETUP_STAMP)
	PIPELINE_MAKE="$(MAKE)" $(RUN_STAGE) search $(STAGE_ARGS)

## Fine-tune the base model on the prepared data (LoRA by default): runs/<experiment>/adapter, metrics, loss curve
train: $(train_TARGETS)

runs/%/train.manifest.json: $$(train_DEPS_$$*) | $(SETUP_STAMP) $$(AFTER_$$*)
	$(RUN_STAGE) train experiment.name=$* $(STAGE_ARGS) $(ON_FAILURE)

## Merge the experiment's adapter into full-precision base weights: runs/<experiment>/fused, artifacts.json
fuse: $(fuse_TARGETS)

runs/%/fuse.manifest.json: $$(fuse_DEPS_$$*) | $(SETUP_STAMP) $$(AFTER_$$*)
	$(RUN_STAGE) fuse experiment.name=$* $(STAGE_ARGS) $(ON_FAILURE)

## Make the deployable files: MLX quantized models and GGUFs (checked in llama.cpp against the fused model)
quantize: $(quantize_TARGETS)

runs/%/quantize.manifest.json: $$(quantize_DEPS_$$*) | $(SETUP_STAMP) $$(AFTER_$$*)
	$(RUN_STAGE) quantize experiment.name=$* $(STAGE_ARGS) $(ON_FAILURE)

## Score every artifact on the test split: eval_out/<experiment>/report.md, metrics.json, generation_policy.json
eval: $(eval_TARGETS)

eval_out/%/eval.manifest.json: $$(eval_DEPS_$$*) | $(SETUP_STAMP) $$(AFTER_$$*)
	$(RUN_STAGE) eval experiment.name=$* $(STAGE_ARGS) $(ON_FAILURE)

## Pack the GGUF eval ships for Ollama (Modelfile) and Docker Model Runner (OCI image): runs/<experiment>/package/
package: $(package_TARGETS)

runs/%/package.manifest.json: $$(package_DEPS_$$*) | $(SETUP_STAMP) $$(AFTER_$$*)
	$(RUN_STAGE) package experiment.name=$* $(STAGE_ARGS) $(ON_FAILURE)

## Bundle an experiment as one deterministic tarball: dist/<experiment>-<hash>.tar.gz (SHA256SUMS inside)
freeze: $(freeze_TARGETS)

dist/%.freeze.manifest.json: $$(freeze_DEPS_$$*) | $(SETUP_STAMP)
	$(RUN_STAGE) freeze experiment.name=$* $(STAGE_ARGS)

## Replay an experiment bit for bit in a fresh folder and compare every artifact's sha256 (EXP=name)
repro: | $(SETUP_STAMP)
	@$(if $(SELECTED),,echo "repro: no experiment to replay" >&2; exit 2)
	@for experiment in $(SELECTED); do \
	  test -f eval_out/$$experiment/repro.sh || { echo "repro: eval_out/$$experiment/repro.sh: missing -- fix: run make eval EXP=$$experiment first" >&2; exit 2; }; \
	  bash eval_out/$$experiment/repro.sh || exit $$?; \
	done

## Check a bundle without extracting it: checksums, its run manifest, the recorded sha256s (BUNDLE=file)
verify: | $(SETUP_STAMP)
	$(RUN_STAGE) verify "$(BUNDLE)" $(if $(VERBOSE),--verbose)

## Extract a bundle safely, after verifying it (BUNDLE=file DEST=folder)
thaw: | $(SETUP_STAMP)
	$(RUN_STAGE) thaw "$(BUNDLE)" "$(DEST)" $(if $(VERBOSE),--verbose)

## Compare the experiments: runs/experiments.csv, eval_out/summary.md (+ charts); fails naming any unfinished
summary: $(summary_TARGETS)

eval_out/summary.manifest.json: $(summary_DEPS) | $(SETUP_STAMP)
	$(RUN_STAGE) summary $(STAGE_ARGS) $(if $(EXP),experiment.name=$(EXP))

## Install the PyTorch + PEFT reference `make bench` compares with, into .bench-venv (never the pipeline's)
bench-setup: .bench-venv/.setup.stamp

.bench-venv/.setup.stamp: bench/requirements-torch.lock
	@echo "bench-setup: installing $< into .bench-venv (PyTorch and its CUDA libraries: several GB)"
	test -x .bench-venv/bin/python || $(PYTHON) -m venv .bench-venv
	.bench-venv/bin/python -m pip install --quiet --require-hashes --no-deps -r $<
	touch $@

## Measure the pipeline against mlx_lm lora and PyTorch + PEFT side by side: bench/results.json, results.md
bench: | $(SETUP_STAMP)
	PYTHONPATH=scripts $(PY) bench/run.py $(if $(VERBOSE),--verbose) $(BENCH_ARGS)

## Check style: ruff lint and format (ruff.toml); `make format` applies the fixes
lint: | $(SETUP_STAMP)
	$(PY) -m ruff check scripts tests bench
	$(PY) -m ruff format --check scripts tests bench

format: | $(SETUP_STAMP)
	$(PY) -m ruff check --fix scripts tests bench
	$(PY) -m ruff format scripts tests bench

# Each worker's stages get one thread (BLAS, llama.cpp): two workers with two threads each on two cores
# oversubscribe them, and spinning BLAS and llama.cpp threads then slow each other down several times over.
TEST_WORKERS ?= 2
TEST_THREADS ?= 1
## Run the lint, then every test (end-to-end too) on TEST_WORKERS processes; those marked serial, alone
test: lint | $(SETUP_STAMP)
	OPENBLAS_NUM_THREADS=$(TEST_THREADS) PIPELINE_THREADS=$(TEST_THREADS) \
	  $(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal -m "not serial"
	$(PY) -m pytest -m serial

## Remove everything the pipeline generated (keeps .venv and the converted-model cache)
clean:
	rm -rf $(STATE) runs/* data/* eval_out/* dist/* runs/.staging-* data/.staging-* eval_out/.staging-*
	touch runs/.gitkeep data/.gitkeep eval_out/.gitkeep dist/.gitkeep

## Remove generated files, the converted-model cache and .venv
distclean: clean
	rm -rf $(VENV) .cache

.PHONY: help setup lock doctor settings bench bench-setup chat serve all experiments model prepare search train fuse quantize eval package freeze repro verify thaw summary lint format test clean distclean
