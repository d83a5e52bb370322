# Two entry points, both safe on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup browser demo test bench clean-demo

# torch goes in first and pinned: here that resolves to a local CPU wheel, and
# the project's own `torch>=2.4` is then already satisfied.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,crf,dask,ray]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/subjectflow demo

# The dashboard's browser test drives Debian's own Chromium through its chromedriver, so
# nothing downloads a browser at test time; with both installed this is two `test -x`.
BROWSER := /usr/bin/chromium /usr/bin/chromedriver

browser:
	@for f in $(BROWSER); do test -x $$f || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  command -v apt-get >/dev/null || { echo >&2 "the browser test needs $(BROWSER) (Debian: chromium, chromium-driver) and there is no apt-get here to install them"; exit 1; }; \
	  echo "installing chromium and chromium-driver for the dashboard's browser test"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
	    || { echo >&2 "apt-get could not install chromium and chromium-driver (it needs root); install them, then rerun"; exit 1; }; \
	fi

test: setup browser
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/tune.py
	$(BIN)/python bench/joint.py
	$(BIN)/python bench/oneactor.py
	$(BIN)/python bench/tokens.py
	$(BIN)/python bench/refine.py
	$(BIN)/python bench/refresh.py --sizes 10 100
	$(BIN)/python -m bench.scaleout
	$(BIN)/python bench/tables.py
	$(BIN)/python -m bench.versioning --sizes 100 1000

clean-demo:
	rm -rf .demo
