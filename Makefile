# posttrain — the two commands a fresh clone needs: `make run` and `make test`.
# Both create .venv/ and install on first use (~3 min), and are quick once it exists.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
BENCH_STAMP := $(VENV)/.bench-stamp
RECIPE ?=
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: setup run smoke test test-fast gpu-check bench clean

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

# On a machine with a CUDA GPU: the device-placement tests, then the SmolLM2 smoke recipe (its base
# the packaged Q4_1 GGUF, docs/real-models.md) trained in bf16; meant to finish in under 10 minutes.
# `setup` installs the torch==2.13.0 this machine has on disk: on a GPU host install a CUDA build of
# torch 2.13.0 into .venv first. GPU_ARGS adds `--set` overrides (e.g. for stages the recipe lacks).
GPU_BF16 := --set fetch.gguf_dtype=bfloat16 --set sft.precision=bf16 --set grpo.precision=bf16 \
	--set refine.precision=bf16
GPU_ARGS ?=
gpu-check: setup
	$(BIN)/python -c "import sys, torch; sys.exit(None if torch.cuda.is_available() else 'gpu-check: torch sees no CUDA device')"
	$(BIN)/python -m pytest -m cuda tests/test_gpu.py
	$(BIN)/posttrain run smollm2-r1 --smoke --state-dir .posttrain/gpu-check $(GPU_BF16) $(GPU_ARGS)

# Benchmarks (benchmarks/README.md): writes benchmarks/results.json and benchmarks/results.md.
# The `bench` extra (TRL, the peer we compare with) is installed with every package already in the
# venv pinned by a constraints file, so it can add packages but never change one (torch,
# transformers, deepspeed, ... stay exactly as `setup` left them); pip fails loudly if it cannot.
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip freeze --exclude-editable | LC_ALL=C sort > $(VENV)/.bench-constraints.txt
	$(BIN)/pip install -q -c $(VENV)/.bench-constraints.txt -e '.[bench]'
	$(BIN)/pip freeze --exclude-editable | LC_ALL=C sort > $(VENV)/.bench-after.txt
	@changed=$$(LC_ALL=C comm -23 $(VENV)/.bench-constraints.txt $(VENV)/.bench-after.txt); \
	  if [ -n "$$changed" ]; then echo "bench extra changed installed packages: $$changed" >&2; exit 1; fi
	touch $(BENCH_STAMP)

BENCH_ARGS ?=
bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf .posttrain
