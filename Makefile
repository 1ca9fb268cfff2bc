# Needs only python3 (with its venv module) and make. `make demo` and `make test` create the
# virtual environment $(VENV) with $(PYTHON) and install into it; override either on the command
# line (`make test PYTHON=python3.11 VENV=.venv-py311`).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=
DEMO_OUT ?= demo_out
DEMO_ARGS ?=
# Lint tools are pinned here, not in requirements.txt (lint is not part of CI yet).
LINT_REQS := ruff==0.17.6 pyink==26.5.1

.PHONY: install install-test demo test lint format clean

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PIP) install -r requirements.txt
	$(PIP) install -e . --no-deps

install-test: install
	$(PIP) install -r requirements-test.txt
	$(PIP) install --no-deps -r requirements-demo.txt

# Train a small tokenizer on the bundled clips, evaluate it, write a reconstruction (see README).
demo: install
	$(PIP) install --no-deps -r requirements-demo.txt
	$(PY) -m vidtok_jax.demo --out $(DEMO_OUT) $(DEMO_ARGS)

# pytest exits non-zero on any failure or error, and with 5 when it collects no test; make fails
# on every one of them (nothing here swallows the exit code). `-p no:benchmark`: the base image
# ships pytest-benchmark, which only warns that xdist disables it.
test: install-test
	$(PY) -m pytest -q -n 2 --dist loadfile -p no:benchmark $(PYTEST_ARGS) tests

lint: $(PY)
	$(PIP) install $(LINT_REQS)
	$(PY) -m ruff check vidtok_jax tests configs
	$(PY) -m pyink --check --diff vidtok_jax tests configs

format: $(PY)
	$(PIP) install $(LINT_REQS)
	$(PY) -m pyink vidtok_jax tests configs

clean:
	rm -rf build dist *.egg-info .pytest_cache $(DEMO_OUT)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
