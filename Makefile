# kdistill: the two commands a newcomer runs are `make quickstart` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The venv is rebuilt only when pyproject.toml changes.
STAMP := $(VENV)/.stamp-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: setup test unit lint crds quickstart cluster-bins cluster

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[operator,trainer,serving,dev]'
	@rm -f $(VENV)/.stamp-* && touch $@

test: setup cluster-bins
	$(PY) -m pytest

unit: setup
	$(PY) -m pytest tests/unit

lint: setup
	$(VENV)/bin/ruff check .

crds: setup
	$(VENV)/bin/kdistill crds
	$(VENV)/bin/kdistill api-docs

quickstart: setup
	bash scripts/quickstart.sh

# Kubernetes binaries built from Go modules, cached under ~/.cache/kdistill.
cluster-bins:
	bash scripts/cluster-bins.sh

# A real control plane with kwok GPU nodes, for a person to poke at.
cluster: setup cluster-bins
	$(PY) -m tests.cluster
