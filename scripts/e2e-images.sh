#!/usr/bin/env bash
# Builds the images the e2e cluster itself needs, all from local parts:
#   kdistill/pause:3.10 (tagged registry.k8s.io/pause:3.10 too, the name containerd asks for)
#   kdistill/node:<k8s version>  (docker/node.Dockerfile)
# Prerequisites: scripts/cluster-bins.sh (kubelet, kube-proxy) and
# scripts/build-base-image.sh (the Debian base). Prints the node image tag.
#
#   scripts/e2e-images.sh   # docker's layer cache makes an unchanged build take seconds
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=cluster-env.sh
source "${root}/scripts/cluster-env.sh"
eval "$("${root}/scripts/dockerd.sh" env)"
"${root}/scripts/dockerd.sh" start >/dev/null

log() { printf '[e2e-images %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

pause_tag="kdistill/pause:3.10"
node_tag="kdistill/node:${K8S_VERSION}"
base_tag="$("${root}/scripts/build-base-image.sh")"

for bin in kubelet kube-proxy; do
  [[ -x "${K8S_BIN_DIR}/${bin}" ]] || { log "missing ${K8S_BIN_DIR}/${bin}: run scripts/cluster-bins.sh"; exit 1; }
done

ctx="$(mktemp -d)"
trap 'rm -rf "${ctx}"' EXIT

{
  t0=$(date +%s)
  command -v gcc >/dev/null || { log "gcc is needed for the pause image: apt-get install -y gcc libc6-dev"; exit 1; }
  cp "${root}/docker/pause/Dockerfile" "${ctx}/Dockerfile"
  gcc -Os -static -Wall -Wextra -Werror -o "${ctx}/pause" "${root}/docker/pause/pause.c"
  strip "${ctx}/pause"
  docker build -q -t "${pause_tag}" -t registry.k8s.io/pause:3.10 "${ctx}" >/dev/null
  rm -f "${ctx}"/*
  log "${pause_tag} built in $(( $(date +%s) - t0 ))s"
}

{
  t0=$(date +%s)
  cp "${root}/docker/node.Dockerfile" "${ctx}/Dockerfile"
  cp "${root}/e2e/node/entrypoint.sh" "${root}/e2e/node/containerd.toml" "${root}/e2e/node/runc-shim.py" "${ctx}/"
  cp "${K8S_BIN_DIR}/kubelet" "${K8S_BIN_DIR}/kube-proxy" "${ctx}/"
  docker save registry.k8s.io/pause:3.10 -o "${ctx}/pause.tar"
  docker build -t "${node_tag}" --build-arg "BASE_IMAGE=${base_tag}" "${ctx}" >&2
  log "${node_tag} built in $(( $(date +%s) - t0 ))s"
}
echo "${node_tag}"
