# EPD Serve. `make serve` and `make test` each install what they need on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# torch first, pinned: on a machine without CUDA an unpinned torch pulls several GB of CUDA wheels.
TORCH  ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
HOST   ?= 127.0.0.1
PORT   ?= 8000

.DEFAULT_GOAL := help
.PHONY: help install serve test lint bench bench-epd model

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install torch, the project and its test extras

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

model: install ## build the default model (epd-tiny) into the cache directory
	$(BIN)/epd model build

serve: install ## serve the default model on http://127.0.0.1:8000 (HOST=, PORT= to change)
	$(BIN)/epd serve --host $(HOST) --port $(PORT)

lint: install ## ruff check and format check
	$(BIN)/ruff check serving loadgen tests benchmarks
	$(BIN)/ruff format --check serving loadgen tests benchmarks

test: install lint ## lint, then the whole test suite (CPU, no GPU needed)
	$(BIN)/python -m pytest -q tests

bench: install ## engine, runtime and control-plane benchmarks on the small preset (prints tables)
	$(BIN)/python -m benchmarks.engine
	$(BIN)/python -m benchmarks.runtime
	$(BIN)/python -m benchmarks.control

bench-epd: install ## serve the small preset colocated and disaggregated on 2 cores; sweep both, side by side
	$(BIN)/python -m loadgen.compare
