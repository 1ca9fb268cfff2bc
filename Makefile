# Needs only python3 (with pip) and make. Override the interpreter with `make PYTHON=...`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
PYTEST_ARGS ?=
# Lint tools are pinned here, not in requirements.txt (lint is not part of CI yet).
LINT_REQS := ruff==0.17.6 pyink==26.5.1

.PHONY: install test lint format clean

install:
	$(PIP) install -r requirements.txt -r requirements-test.txt
	$(PIP) install -e . --no-deps

# pytest exits non-zero on any failure or error, and with 5 when it collects no test; make fails
# on every one of them (nothing here swallows the exit code). `-p no:benchmark`: the base image
# ships pytest-benchmark, which only warns that xdist disables it.
test: install
	$(PYTHON) -m pytest -q -n 2 --dist loadfile -p no:benchmark $(PYTEST_ARGS) tests

lint:
	$(PIP) install $(LINT_REQS)
	$(PYTHON) -m ruff check vidtok_jax tests configs
	$(PYTHON) -m pyink --check --diff vidtok_jax tests configs

format:
	$(PIP) install $(LINT_REQS)
	$(PYTHON) -m pyink vidtok_jax tests configs

clean:
	rm -rf build dist *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
