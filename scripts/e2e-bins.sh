#!/usr/bin/env bash
# Builds CoreDNS for the e2e cluster from its Go module (hack/coredns: only the
# plugins the cluster uses), cached under ${KDISTILL_CACHE:-~/.cache/kdistill}.
# The Kubernetes binaries, kube-proxy included, come from scripts/cluster-bins.sh.
#
#   scripts/e2e-bins.sh   # build what is missing; prints the binary's path
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${KDISTILL_CACHE:-${HOME}/.cache/kdistill}"
version="$(awk '$1 == "require" && $2 == "github.com/coredns/coredns" {print $3}' "${root}/hack/coredns/go.mod")"
out="${cache}/coredns-${version}/bin/coredns"

if [[ ! -x "${out}" ]]; then
  command -v go >/dev/null || { echo "e2e-bins: go is not installed" >&2; exit 1; }
  mkdir -p "$(dirname "${out}")"
  t0=$(date +%s)
  printf '[e2e-bins %(%H:%M:%S)T] coredns %s: building (several minutes the first time)\n' -1 "${version}" >&2
  (cd "${root}/hack/coredns" && CGO_ENABLED=0 GOFLAGS="-trimpath -buildvcs=false" GOTOOLCHAIN="${GOTOOLCHAIN:-auto}" \
    go build -ldflags "-s -w" -o "${out}.tmp.$$" .)
  mv -f "${out}.tmp.$$" "${out}"
  printf '[e2e-bins %(%H:%M:%S)T] coredns: done in %ss\n' -1 "$(( $(date +%s) - t0 ))" >&2
fi
echo "${out}"
