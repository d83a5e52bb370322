# Two entry points, both safe on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean-demo

# torch goes in first and pinned: here that resolves to a local CPU wheel, and
# the project's own `torch>=2.4` is then already satisfied.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/subjectflow demo

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/tune.py

clean-demo:
	rm -rf .demo
