# `make demo` and `make test` create .venv on first use and install the pinned dependencies.
# torch comes first and pinned: 2.13.0 is the CPU build on these machines; an unpinned torch
# would pull a multi-GB CUDA build.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu

.PHONY: demo test test-unit lint install clean

install: $(STAMP)

$(STAMP): requirements.lock setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: $(STAMP)
	$(VENV)/bin/valleyforge demo

test: lint
	$(PY) -m pytest -q --durations=15 tests

test-unit: lint
	$(PY) -m pytest -q -m unit tests

# ruff.toml holds the rules; `ruff format .` fixes what the format check finds
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf runs mlflow.db mlruns .pytest_cache
