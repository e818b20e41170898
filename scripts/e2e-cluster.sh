#!/usr/bin/env bash
# make e2e-cluster: a real local cluster (kubelets + containerd in node containers),
# left running in the foreground until Ctrl-C. It prints the KUBECONFIG to use.
#
#   scripts/e2e-cluster.sh [--nodes N]   # default 2 nodes
#
# Builds what is missing first: Kubernetes binaries (cluster-bins.sh), CoreDNS
# (e2e-bins.sh), the Debian base, the pause and node images (e2e-images.sh).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${root}"
PY="${PY:-${root}/.venv/bin/python}"

scripts/e2e-prepare.sh
eval "$(scripts/dockerd.sh env)"
export DOCKER_HOST
# -P with the repository root appended, not prepended: scripts/run_module.py says why.
exec "${PY}" -P scripts/run_module.py e2e.cluster "$@"
