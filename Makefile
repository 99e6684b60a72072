# make recipe=NAME [ARGS="key=value ..."]   install on first use, then run a recipe
# make test                                 install, then run the whole test suite (2 workers)
# make bench                                benchmarks (ratios measured side by side)
# make list                                 the recipes and what they do
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.posttrain-installed
recipe ?=
ARGS ?=
PYTEST_ARGS ?=
# pytest-xdist workers, one math-library thread each (the suite is mostly single-threaded
# subprocess and recipe runs: two workers keep both cores of a 2-core machine busy)
TEST_WORKERS ?= 2
TEST_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
PYTEST := $(TEST_ENV) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

.DEFAULT_GOAL := run
.PHONY: run test test-fast bench list install clean

run: $(STAMP)
	@if [ -z "$(recipe)" ]; then \
	  echo 'usage: make recipe=NAME [ARGS="key=value ..."]   (recipes: make list)'; exit 2; fi
	@$(VENV)/bin/posttrain run $(recipe) $(ARGS)

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	@bash scripts/install.sh $(VENV)
	@touch $@

test: $(STAMP)
	$(PYTEST) --durations=15 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench

list: $(STAMP)
	@$(VENV)/bin/posttrain list

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
