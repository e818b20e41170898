# kdistill: the two commands a newcomer runs are `make quickstart` and `make test`;
# `make help` lists every target. Every Python start here uses -P (see CONTRIBUTING.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The venv is rebuilt only when pyproject.toml changes.
STAMP := $(VENV)/.stamp-$(shell sha1sum pyproject.toml | cut -c1-12)
# Whole logs of the long builds; a failed build prints the tail and names the file.
LOGS := build/logs
# The pure tests: no control plane, no docker, no helm, no multi-process torch (see CONTRIBUTING.md).
FAST_PATHS := tests/unit tests/operator

.DEFAULT_GOAL := help
.PHONY: help setup system-deps test fast unit lint crds manifests quickstart cluster-bins cluster images \
	e2e-prepare e2e-cluster e2e e2e-kind

help: ## this list
	@echo "kdistill make targets:"
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %-13s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: $(STAMP) ## create .venv and install kdistill with all extras (once per pyproject.toml)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -P -m venv $(VENV)
	$(PY) -P -m pip install -q --upgrade pip setuptools wheel
	$(PY) -P -m pip install -q -e '.[operator,trainer,serving,dev]'
	@rm -f $(VENV)/.stamp-* && touch $@

test: setup system-deps cluster-bins images ## the whole suite (rungs 1-3 and the images), images built first; two lanes side by side
	bash scripts/test.sh

fast: setup ## the pure tests only: no cluster, no docker, no multi-process (under 2 minutes)
	$(PY) -P -m pytest -q -m 'not cluster' $(FAST_PATHS)

unit: setup ## tests/unit only
	$(PY) -P -m pytest tests/unit

lint: setup ## ruff format --check, ruff check, mypy, import contracts; prints what each checked
	bash scripts/lint.sh

crds: setup ## regenerate the CRD, the API reference, the RBAC files and the chart version
	$(VENV)/bin/kdistill crds
	$(VENV)/bin/kdistill api-docs
	$(VENV)/bin/kdistill rbac
	$(VENV)/bin/kdistill chart-version
	@echo "now run 'make manifests' to copy the CRD and RBAC into the chart and manifests/"

manifests: setup cluster-bins ## render manifests/kdistill.yaml from the chart (a test keeps it current)
	bash scripts/render-manifests.sh

system-deps: ## Debian packages the tests need (docker.io, debootstrap, openssl, gcc), only if missing
	bash scripts/system-deps.sh

quickstart: setup ## train a small teacher, distill it, quantize to INT8 and serve it, on this machine
	bash scripts/quickstart.sh

cluster-bins: ## Kubernetes, etcd, kwok, helm and Kueue built from Go modules, cached under ~/.cache/kdistill
	bash scripts/cluster-bins.sh

cluster: setup cluster-bins ## a real control plane with kwok GPU nodes, for a person to poke at
	$(PY) -P scripts/run_module.py tests.cluster

images: system-deps ## the operator and trainer/server images (private dockerd, local Debian base)
	@mkdir -p $(LOGS)
	@echo "images: building; the whole log goes to $(LOGS)/images.log"
	@bash scripts/images.sh > $(LOGS)/images.log 2>&1 || { \
	  echo "images: the build failed; the last 60 lines of $(LOGS)/images.log:"; \
	  tail -n 60 $(LOGS)/images.log; exit 1; }
	@tail -n 3 $(LOGS)/images.log

e2e-prepare: system-deps cluster-bins ## what the e2e cluster needs: dockerd, CoreDNS, base/pause/node images
	@mkdir -p $(LOGS)
	@bash scripts/e2e-prepare.sh > $(LOGS)/e2e-prepare.log 2>&1 || { \
	  echo "e2e-prepare failed; the last 60 lines of $(LOGS)/e2e-prepare.log:"; \
	  tail -n 60 $(LOGS)/e2e-prepare.log; exit 1; }
	@grep '^\[e2e-prepare\]' $(LOGS)/e2e-prepare.log

e2e-cluster: setup e2e-prepare ## rung 4: a real multi-node cluster (kubelets + containerd in node containers)
	bash scripts/e2e-cluster.sh

# The images come from the `images` step (a warm rebuild takes seconds), so the test reuses them.
e2e: setup images e2e-prepare ## rung 4 test: helm install, a 2-node job, a node killed, rollout; rewrites docs/e2e-transcript.txt
	KDISTILL_E2E_SKIP_BUILD=1 $(PY) -P -m pytest e2e -v -s

e2e-kind: setup system-deps cluster-bins ## the same steps on kind, for laptops (see docs/install.md)
	bash scripts/e2e-kind.sh
