# The two commands a newcomer needs:  make demo   and   make test.
# Both create .venv and install the project on first use (CPU torch 2.13.0 from the local wheel).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
WORKDIR ?= work/demo
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test test-unit test-integration test-e2e install bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/adapterops demo --workdir $(WORKDIR) --summary-json $(WORKDIR)/summary.json $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)
	$(PY) -m pytest -q tests/integration $(PYTEST_ARGS)
	$(PY) -m pytest -q tests/e2e $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

test-integration: $(STAMP)
	$(PY) -m pytest -q tests/integration $(PYTEST_ARGS)

test-e2e: $(STAMP)
	$(PY) -m pytest -q tests/e2e $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench.run

clean:
	rm -rf work .pytest_cache
