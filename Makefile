# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv if missing, installs tandem with everything, runs `tandem demo`
#   make test   the same set-up (and Chromium + PostgreSQL from apt when root), the architecture contracts
#               (lint-imports, [tool.importlinter] in pyproject.toml), then the whole test suite (CI runs this)
# constraints.txt pins every package, torch to the 2.13.0 CPU build (no multi-GB CUDA download).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tandem-installed

.PHONY: demo test test-fast bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@echo "installing tandem and its dependencies into $(VENV) (first run: a few minutes; pip is quiet meanwhile)..."
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	@echo "running tandem demo: train, export, classify held-out images (the full config: tandem demo --verbose)"
	$(BIN)/tandem demo

test: $(STAMP)
	bash scripts/system-deps.sh
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -ra

test-fast: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -m "not slow and not multiprocess" -ra

bench: $(STAMP)
	$(BIN)/python benchmarks/runtime.py
	$(BIN)/python benchmarks/train_overhead.py
	$(BIN)/python benchmarks/demo.py

clean:
	rm -rf $(VENV) tandem-demo .pytest_cache
