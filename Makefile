# The README's commands: `make demo` and `make test` set up on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: setup demo test test-fast lint typecheck bench clean

setup: $(STAMP)

# torch is installed first and pinned: an unpinned torch drags in a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet -c constraints.txt torch
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/adaptflow demo

# One worker per core (xdist): the end-to-end tests wait on servers and subprocesses much of their time.
test: setup
	$(BIN)/python -m pytest -q -n auto --dist worksteal

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy flows tasks adapters_impl

bench: setup
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
