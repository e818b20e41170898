# kdistill: the two commands a newcomer runs are `make quickstart` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The venv is rebuilt only when pyproject.toml changes.
STAMP := $(VENV)/.stamp-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: setup system-deps test unit lint crds manifests quickstart cluster-bins cluster images e2e-cluster e2e e2e-kind

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -P -m venv $(VENV)
	$(PY) -P -m pip install -q --upgrade pip setuptools wheel
	$(PY) -P -m pip install -q -e '.[operator,trainer,serving,dev]'
	@rm -f $(VENV)/.stamp-* && touch $@

test: setup system-deps cluster-bins
	$(PY) -P -m pytest --durations=30

unit: setup
	$(PY) -P -m pytest tests/unit

lint: setup
	$(VENV)/bin/ruff check .

crds: setup
	$(VENV)/bin/kdistill crds
	$(VENV)/bin/kdistill api-docs
	$(VENV)/bin/kdistill rbac
	$(VENV)/bin/kdistill chart-version
	@echo "now run 'make manifests' to copy the CRD and RBAC into the chart and manifests/"

# Plain install YAML rendered from the chart (a test keeps it current).
manifests: setup cluster-bins
	bash scripts/render-manifests.sh

# Debian packages the tests need (docker.io, debootstrap, openssl, gcc); installs only what is missing.
system-deps:
	bash scripts/system-deps.sh

quickstart: setup
	bash scripts/quickstart.sh

# Kubernetes binaries built from Go modules, cached under ~/.cache/kdistill.
cluster-bins:
	bash scripts/cluster-bins.sh

# A real control plane with kwok GPU nodes, for a person to poke at.
cluster: setup cluster-bins
	$(PY) -m tests.cluster

# The operator and trainer/server images, built with a private dockerd on a local Debian base.
images: system-deps
	bash scripts/images.sh

# Rung 4: a real multi-node cluster (kubelets + containerd in node containers) ...
e2e-cluster: setup system-deps cluster-bins
	bash scripts/e2e-cluster.sh

# ... and the end-to-end test on it: images, helm install, a 2-node job, a node killed, rollout.
e2e: setup system-deps cluster-bins
	bash scripts/e2e-prepare.sh
	$(PY) -P -m pytest e2e -v -s

# The same steps on kind, for laptops (see docs/install.md).
e2e-kind: setup system-deps cluster-bins
	bash scripts/e2e-kind.sh
