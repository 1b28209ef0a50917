# microgpt — `make help` lists the targets. Everything installs itself on first use.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned: an unpinned torch (or lightning before torch) pulls a multi-GB CUDA build.
# GPU users: make install TORCH_SPEC="torch==2.6.0 --index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
TEST_ARGS ?=
TRAIN_ARGS ?=
export TORCHAO_FORCE_SKIP_LOADING_SO_FILES := 1
# DeepSpeed JIT-builds its CPU helpers once; keep them between runs
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/microgpt/torch_extensions

.PHONY: help install train test test-fast test-llamacpp lint format bench clean slurm-up slurm-down

help: ## list the targets (colours only on a terminal)
	@if [ -t 1 ]; then c='\033[36m'; r='\033[0m'; else c=''; r=''; fi; \
	grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -v c="$$c" -v r="$$r" 'BEGIN {FS = ":.*?## "}; {printf "  %s%-12s%s %s\n", c, $$1, r, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	@$(PY) -c "import torch, lightning, hydra, deepspeed, torchao; print('installed: torch', torch.__version__, '(cuda', torch.version.cuda, ') lightning', lightning.__version__, 'hydra', hydra.__version__)"
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install torch (TORCH_SPEC) then microgpt with all extras

train: $(STAMP) ## train the default model (micro) on the embedded stdlib corpus, then print a sample
	$(PY) train.py $(TRAIN_ARGS)

test: $(STAMP) ## run the whole test suite (unit, config, integration)
	$(PY) -m pytest $(TEST_ARGS)

test-fast: $(STAMP) ## unit and config tests only (no training runs)
	$(PY) -m pytest -m "not slow" $(TEST_ARGS)

test-llamacpp: $(STAMP) ## opt-in: llama.cpp runs our GGUF exports (builds llama-cpp-python once, ~15-20 min; cached)
	bash scripts/llamacpp_wheel.sh $(PY)
	MICROGPT_LLAMACPP=1 $(PY) -m pytest tests/llamacpp -v -s $(TEST_ARGS)

lint: $(STAMP) ## ruff check + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP) ## ruff fix + format
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP) ## microgpt vs nanoGPT's own code, side by side (needs the developers' ../shared folder)
	$(PY) bench/vs_nanogpt.py

clean: ## remove run outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache

slurm-up: ## start a local SLURM cluster (as root; apt-installs it once; MICROGPT_SLURM_NODES=2: two nodes); clients: eval "$(bash scripts/local_slurm.sh env)"
	bash scripts/local_slurm.sh up

slurm-down: ## stop the local SLURM cluster started by slurm-up (its daemons, by PID)
	bash scripts/local_slurm.sh down
