# Two entry points, both doing their own set-up on a fresh machine:
#   make demo   -> generate text with the embedded demo model, plus compile and decode times
#   make test   -> lint + the test suite
# If $(PYTHON) (default python3) already imports every dependency (the offline GPU machines),
# it is used and the tree installed into it editable with --no-deps (no network needed);
# otherwise a .venv is created and the package installed with its dependencies. Either way the
# tree is installed: `sharding/`, `checkpoints/`, `pallas_kernels/` import as `step3_jax.*`.
# Every run prints the Python, jax and flax it uses and stops, with a message, on a version
# outside pyproject.toml's ranges (scripts/check_env.py).
#   make PYTHON=python3.12 ...   use another interpreter
#   make USE_VENV=1 ...          always use .venv, even if $(PYTHON) already has jax
SHELL := /bin/bash
PYTHON ?= python3
# The build requirements too (setuptools, wheel): the in-place install has no build isolation.
PY_IMPORTS := jax,flax,orbax.checkpoint,optax,chex,jaxtyping,safetensors,tokenizers,tqdm,matplotlib,jinja2,PIL,pytest,setuptools,wheel
VENV := .venv
ifeq ($(USE_VENV),1)
  HAVE_DEPS :=
else
  HAVE_DEPS := $(shell $(PYTHON) -c "import $(PY_IMPORTS)" >/dev/null 2>&1 && echo yes)
endif
ifeq ($(HAVE_DEPS),yes)
  PY := $(PYTHON)
  SETUP := .installed-editable
  WHERE := $(PYTHON) already imports jax and the other dependencies: using it, no .venv
else
  PY := $(VENV)/bin/python
  SETUP := $(VENV)/.installed
  WHERE := using $(VENV) (created from $(PYTHON) on first use)
endif

.PHONY: demo test lint format setup versions
demo: versions
	$(PY) -m step3_jax.cli generate

test: versions
	@if $(PY) -m ruff --version >/dev/null 2>&1; then \
	  $(PY) -m ruff check . && $(PY) -m ruff format --check . ; \
	else echo "ruff not installed here: lint skipped"; fi
	$(PY) -m pytest -n 2 -q --durations=15 tests

setup: versions

# Runs every time (cheap: reads package metadata, imports no jax).
versions: $(SETUP)
	@echo "make: $(WHERE)"
	@$(PY) scripts/check_env.py

.installed-editable: pyproject.toml
	@$(PYTHON) scripts/check_env.py  # refuse before installing into an unsupported interpreter
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) scripts/check_env.py --python-only
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[dev,cpu,serve]"  # serve: the server tests run too
	touch $@

format:
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .
