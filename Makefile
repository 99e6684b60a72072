# make recipe=NAME [ARGS="key=value ..."]   install on first use, then run a recipe
# make test                                 install, then run the whole test suite
# make bench                                benchmarks (ratios measured side by side)
# make list                                 the recipes and what they do
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.posttrain-installed
recipe ?=
ARGS ?=
PYTEST_ARGS ?=

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
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench

list: $(STAMP)
	@$(VENV)/bin/posttrain list

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
