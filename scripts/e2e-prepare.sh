#!/usr/bin/env bash
# Everything the e2e cluster needs before it starts, each step cached:
# dockerd, Kubernetes binaries (kubelet and kube-proxy included), CoreDNS, the
# Debian base image, the pause and node images. Prints each step's seconds.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${root}"

step() {
  local name="$1"; shift
  local t0=$(date +%s)
  "$@" >/dev/null
  printf '[e2e-prepare] %-14s %4ss\n' "${name}" "$(( $(date +%s) - t0 ))" >&2
}
step dockerd scripts/dockerd.sh start
step cluster-bins scripts/cluster-bins.sh
step coredns scripts/e2e-bins.sh
step node-images scripts/e2e-images.sh
