# Two entry points, both doing their own set-up on a fresh machine:
#   make demo   -> generate text with the embedded demo model, plus a throughput line
#   make test   -> lint + the test suite
# If the machine already has every dependency importable (the offline GPU machines), the system
# python3 is used and the tree installed into it editable with --no-deps (no network needed);
# otherwise a .venv is created and the package installed with its dependencies. Either way the
# tree is installed: `sharding/`, `checkpoints/`, `pallas_kernels/` import as `step3_jax.*`.
SHELL := /bin/bash
PY_IMPORTS := jax,flax,orbax.checkpoint,optax,chex,jaxtyping,safetensors,tokenizers,tqdm,matplotlib,pytest
VENV := .venv
HAVE_DEPS := $(shell python3 -c "import $(PY_IMPORTS)" >/dev/null 2>&1 && echo yes)
ifeq ($(HAVE_DEPS),yes)
  PY := python3
  SETUP := .installed-editable
else
  PY := $(VENV)/bin/python
  SETUP := $(VENV)/.installed
endif

.PHONY: demo test lint format setup
demo: $(SETUP)
	$(PY) -m step3_jax.cli generate

test: $(SETUP)
	@if $(PY) -m ruff --version >/dev/null 2>&1; then \
	  $(PY) -m ruff check . && $(PY) -m ruff format --check . ; \
	else echo "ruff not installed here: lint skipped"; fi
	$(PY) -m pytest -n 2 -q tests

setup: $(SETUP)

.installed-editable: pyproject.toml
	python3 -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[dev,cpu]"
	touch $@

format:
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .
