# posttrain — the two commands a fresh clone needs: `make run` and `make test`.
# Both create .venv/ and install on first use (~3 min), and are quick once it exists.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
RECIPE ?=
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: setup run smoke test test-fast bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, exactly 2.13.0: its CPU build lies on this machine's disk; a looser requirement
	# pulls a multi-GB CUDA build. Everything after only asks for a range 2.13.0 satisfies.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/posttrain run $(RECIPE) --summary-json .posttrain/last-summary.json $(ARGS)

smoke: setup
	$(BIN)/posttrain run $(RECIPE) --smoke $(ARGS)

# The whole suite, slow end-to-end tests included (CI runs this).
test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf .posttrain
