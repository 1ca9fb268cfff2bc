# Needs only python3 (with its venv module) and make. `make demo` and `make test` create the
# virtual environment $(VENV) with $(PYTHON) and install into it; override either on the command
# line (`make test PYTHON=python3.11 VENV=.venv-py311`).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The 25 slowest tests are listed at the end of each leg: CI's time budget is watched by them.
PYTEST_ARGS ?= --durations=25
DEMO_OUT ?= demo_out
DEMO_ARGS ?=
# `make test-latest` (CI's second leg): Python 3.12 in its own venv $(VENV_LATEST), with the
# newest releases of jax / jaxlib / flax / optax / orbax-checkpoint and the other core
# dependencies as of the day they were pinned: requirements-latest.txt pins every package
# (transitive ones too) with `==`, so a new upstream release cannot break CI; it is bumped on
# purpose. It runs the fast subset below (model parity, train step, streaming, convert,
# from_pretrained, core imports). Neither TensorFlow nor torch is installed there.
# `make test-newest` (not part of `make test`): the same subset in $(VENV_NEWEST) with whatever is
# newest today (requirements-newest.txt, unpinned): run it to see whether new releases break
# anything, then bump requirements-latest.txt to its `pip freeze`.
# python3.12 on PATH, else pyenv's newest 3.12.x (where pyenv's global is another version, its
# bare `python3.12` shim answers "command not found").
PYTHON_LATEST ?= $(shell python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null || \
	PYENV_VERSION=$$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12\.[0-9]+$$' | tail -n 1) \
	pyenv which python3.12 2>/dev/null)
VENV_LATEST ?= .venv-latest
PY_LATEST := $(VENV_LATEST)/bin/python
VENV_NEWEST ?= .venv-newest
# train_step_test first (see SLOW_TESTS): with its 8-device subprocess it is about half of this
# subset's CPU time (706 of ~1,440 CPU s measured on Python 3.12), and it used to be queued last.
# torch_zip_test is not here: torch writes its files and is not installed in these venvs, so it
# would only skip (the pinned leg runs it).
LATEST_TESTS ?= tests/train_step_test.py tests/layers_test.py tests/blocks_test.py \
	tests/regularizers_test.py tests/autoencoder_test.py tests/streaming_test.py \
	tests/convert_test.py tests/pretrained_test.py tests/core_imports_test.py
# The pinned leg's long files first, roughly longest first (minutes of subprocesses or compiles
# each). `--dist loadfile` hands each of the 2 workers whole files from a queue that xdist by
# default sorts by test count, most first: most of these have 1 to 7 tests, so they ran last and
# one worker could be left with them after the other had run out of work. `--no-loadscope-reorder`
# keeps the order given here; the other tests/*_test.py files follow in name order and fill in
# around the long ones.
SLOW_TESTS := tests/multihost_train_test.py tests/spatial_mesh_test.py tests/train_step_test.py \
	tests/command_matrix_test.py tests/aot_test.py tests/train_loop_test.py tests/eval_test.py \
	tests/stream_memory_test.py tests/reconstruct_test.py tests/tokenize_test.py \
	tests/demo_test.py tests/multihost_eval_test.py
PINNED_TESTS = $(SLOW_TESTS) $(filter-out $(SLOW_TESTS),$(sort $(wildcard tests/*_test.py)))
XDIST := -n 2 --dist loadfile --no-loadscope-reorder
# `make install-tpu`: libtpu (the one jax[tpu]==0.10.2 brings) in its own venv $(VENV_TPU) that sees
# $(VENV)'s packages, so TPU programs compile ahead of time on this CPU machine
# (`$(VENV_TPU)/bin/python -m vidtok_jax.planning --topology v5p:4x4x4 ...`) while $(VENV) stays
# CPU-only. `make test` runs its TPU compile test with it.
VENV_TPU ?= .venv-tpu
LIBTPU ?= libtpu==0.0.42.1
# `make docs`: the documentation site (Sphinx, MyST, myst-nb, the book theme; pins in
# docs/requirements.txt) into docs/_build/html, warnings as errors. Its tools live in $(VENV_DOCS),
# which sees $(VENV)'s packages (the .pth below, as install-tpu), so autodoc imports vidtok_jax
# and the getting-started notebook runs with the pinned jax while $(VENV) stays free of them.
VENV_DOCS ?= .venv-docs
# Lint tools are pinned here, not in requirements.txt (lint is not part of CI yet).
LINT_REQS := ruff==0.17.6 pyink==26.5.1

.PHONY: install install-tpu install-test install-docs docs demo test test-pinned install-latest test-latest test-newest lint format clean

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PIP) install -r requirements.txt
	$(PIP) install -e . --no-deps

install-tpu: install
	$(PYTHON) -m venv $(VENV_TPU)
	$(VENV_TPU)/bin/python -m pip install --no-deps "$(LIBTPU)"
	$(PY) -c "import site, sysconfig; print('import site; site.addsitedir(%r)' % sysconfig.get_paths()['purelib'])" > "$$($(VENV_TPU)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/vidtok_main_venv.pth"
	$(VENV_TPU)/bin/python -c "import jax, libtpu, vidtok_jax; print('$(VENV_TPU): jax', jax.__version__, '+ libtpu')"

install-docs: install
	$(PIP) install --no-deps -r requirements-demo.txt
	$(PYTHON) -m venv $(VENV_DOCS)
	$(VENV_DOCS)/bin/python -m pip install -r docs/requirements.txt
	$(PY) -c "import site, sysconfig; print('import site; site.addsitedir(%r)' % sysconfig.get_paths()['purelib'])" > "$$($(VENV_DOCS)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/vidtok_main_venv.pth"
	$(VENV_DOCS)/bin/python -c "import sphinx, myst_nb, vidtok_jax; print('$(VENV_DOCS): sphinx', sphinx.__version__, '+ vidtok_jax')"

docs: install-docs
	$(VENV_DOCS)/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html

install-test: install install-tpu
	$(PIP) install -r requirements-test.txt
	$(PIP) install --no-deps -r requirements-demo.txt

# Train a small tokenizer on the bundled clips, evaluate it, write a reconstruction (see README).
demo: install
	$(PIP) install --no-deps -r requirements-demo.txt
	$(PY) -m vidtok_jax.cli.demo --out $(DEMO_OUT) $(DEMO_ARGS)

# `make test`: both legs, the whole suite on the pinned set, then the fast subset on Python 3.12
# with the newest releases, then the docs site built with warnings as errors (CI runs this).
# pytest exits non-zero on any failure or error, and with 5 when it collects no test; make fails
# on every one of them (nothing here swallows the exit code). `-p no:benchmark`: the base image ships pytest-benchmark, which only warns that
# xdist disables it.
test: test-pinned test-latest docs

test-pinned: install-test
	$(PY) -m pytest -q $(XDIST) -p no:benchmark $(PYTEST_ARGS) $(PINNED_TESTS)

# $(1): venv, $(2): requirements file. A venv left over from other pins is reused: pip installs
# the exact versions the file names (downgrading where needed).
define latest_venv
	@test -n "$(PYTHON_LATEST)" || { echo "make $@: no Python 3.12 found (neither python3.12 on PATH nor pyenv's 3.12.x); pass PYTHON_LATEST=/path/to/python3.12, or run the pinned leg alone: make test-pinned" >&2; exit 1; }
	$(PYTHON_LATEST) -m venv $(1)
	$(1)/bin/python -m pip install --upgrade -r $(2)
	$(1)/bin/python -m pip install -e . --no-deps
	$(1)/bin/python -c "import sys, jax, jaxlib, flax, optax, orbax.checkpoint as o; \
	print('$(1): Python', sys.version.split()[0], '| jax', jax.__version__, '| jaxlib', \
	jaxlib.__version__, '| flax', flax.__version__, '| optax', optax.__version__, \
	'| orbax-checkpoint', o.__version__)"
endef

install-latest:
	$(call latest_venv,$(VENV_LATEST),requirements-latest.txt)

test-latest: install-latest
	$(PY_LATEST) -m pytest -q $(XDIST) -p no:benchmark $(PYTEST_ARGS) $(LATEST_TESTS)

test-newest:
	$(call latest_venv,$(VENV_NEWEST),requirements-newest.txt)
	$(VENV_NEWEST)/bin/python -m pytest -q $(XDIST) -p no:benchmark $(PYTEST_ARGS) $(LATEST_TESTS)

lint: $(PY)
	$(PIP) install $(LINT_REQS)
	$(PY) -m ruff check vidtok_jax tests configs
	$(PY) -m pyink --check --diff vidtok_jax tests configs

format: $(PY)
	$(PIP) install $(LINT_REQS)
	$(PY) -m pyink vidtok_jax tests configs

clean:
	rm -rf build dist *.egg-info .pytest_cache $(DEMO_OUT) docs/_build
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
