# `make demo` and `make test` create .venv on first use and install the pinned dependencies.
# torch comes first and pinned: 2.13.0 is the CPU build on these machines; an unpinned torch
# would pull a multi-GB CUDA build.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu

.PHONY: demo test test-unit install clean

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

test: $(STAMP)
	$(PY) -m pytest -q tests

test-unit: $(STAMP)
	$(PY) -m pytest -q -m unit tests

clean:
	rm -rf runs mlflow.db mlruns .pytest_cache
