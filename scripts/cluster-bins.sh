#!/usr/bin/env bash
# Builds the control-plane binaries for the integration tests from their Go
# modules (no image or envtest registry is reachable): kube-apiserver,
# kube-controller-manager, kube-scheduler, kubelet, kubectl, etcd, kwok, helm, and
# the Kueue controller (with its CRDs and webhook configurations from the module).
#
# Each tool is pinned by its own module under hack/ (their dependency versions
# clash) and cached by version under ${KDISTILL_CACHE:-~/.cache/kdistill}.
# Only missing binaries are built. Usage:
#
#   scripts/cluster-bins.sh            # build what is missing
#   scripts/cluster-bins.sh --print    # print the binary folders and exit
#
# Timings go to ${KDISTILL_CACHE}/cluster-bins-last-run.json, and to cluster-bins-last-build.json
# when the run built anything.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=cluster-env.sh
source "${root}/scripts/cluster-env.sh"

if [[ "${1:-}" == "--print" ]]; then
  printf '%s\n' "${K8S_BIN_DIR}" "${ETCD_BIN_DIR}" "${KWOK_BIN_DIR}" "${KUEUE_BIN_DIR}" "${HELM_BIN_DIR}"
  exit 0
fi

command -v go >/dev/null || { echo "cluster-bins: go is not installed (need Go >= 1.24)" >&2; exit 1; }

export CGO_ENABLED="${CGO_ENABLED:-0}"
export GOFLAGS="-trimpath -buildvcs=false ${GOFLAGS:-}"
# GOTOOLCHAIN=auto lets an older local Go fetch the toolchain a module asks for.
export GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"

start_all=$(date +%s)
built=()
declare -A seconds=()

log() { printf '[cluster-bins %(%H:%M:%S)T] %s\n' -1 "$*"; }

# build <module dir> <package> <output> <extra ldflags>
build() {
  local dir="$1" pkg="$2" out="$3" ldflags="$4" name t0 tmp
  name="$(basename "${out}")"
  if [[ -x "${out}" ]]; then
    log "${name}: cached (${out})"
    return
  fi
  mkdir -p "$(dirname "${out}")"
  log "${name}: building ${pkg} (the first build of a Kubernetes binary takes several minutes)"
  t0=$(date +%s)
  tmp="${out}.tmp.$$"
  (cd "${root}/hack/${dir}" && go build -o "${tmp}" -ldflags "-s -w ${ldflags}" "${pkg}")
  mv -f "${tmp}" "${out}"
  seconds[${name}]=$(( $(date +%s) - t0 ))
  built+=("${name}")
  log "${name}: done in ${seconds[${name}]}s ($(du -h "${out}" | cut -f1))"
}

# Without these, `version` reports v0.0.0 and kubectl/helm version checks misbehave.
k8s_minor="${K8S_VERSION#v1.}"; k8s_minor="${k8s_minor%%.*}"
k8s_ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags+=" -X ${pkg}.gitVersion=${K8S_VERSION} -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=${k8s_minor}"
  k8s_ldflags+=" -X ${pkg}.gitTreeState=clean -X ${pkg}.buildDate=1970-01-01T00:00:00Z"
done

log "versions: kubernetes ${K8S_VERSION}, etcd ${ETCD_VERSION}, kwok ${KWOK_VERSION}, helm ${HELM_VERSION}"
log "cache: ${KDISTILL_CACHE}"

# The API server and etcd first: integration tests need them before anything else.
for cmd in kube-apiserver; do
  build k8s-bins "k8s.io/kubernetes/cmd/${cmd}" "${K8S_BIN_DIR}/${cmd}" "${k8s_ldflags}"
done
build etcd go.etcd.io/etcd/server/v3 "${ETCD_BIN_DIR}/etcd" ""
for cmd in kube-controller-manager kube-scheduler kubectl; do
  build k8s-bins "k8s.io/kubernetes/cmd/${cmd}" "${K8S_BIN_DIR}/${cmd}" "${k8s_ldflags}"
done
build kwok sigs.k8s.io/kwok/cmd/kwok "${KWOK_BIN_DIR}/kwok" \
  "-X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v} -X sigs.k8s.io/kwok/pkg/consts.KubeVersion=${K8S_VERSION#v}"
# helm's own release build sets these too: without them `helm template` renders for
# Kubernetes v1.20 (.Capabilities.KubeVersion) and `helm lint` checks deprecations against it.
helm_ldflags="-X helm.sh/helm/v3/internal/version.version=${HELM_VERSION} -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
  helm_ldflags+=" -X ${pkg}.k8sVersionMajor=1 -X ${pkg}.k8sVersionMinor=${k8s_minor}"
done
build helm helm.sh/helm/v3/cmd/helm "${HELM_BIN_DIR}/helm" "${helm_ldflags}"
# Kueue's controller for the rung-3 admission tests. Its CRDs and webhook configurations come
# from the same module's config/ (in the module cache once the build has downloaded it).
build kueue sigs.k8s.io/kueue/cmd/kueue "${KUEUE_BIN_DIR}/kueue" \
  "-X sigs.k8s.io/kueue/pkg/version.GitVersion=${KUEUE_VERSION}"
if [[ ! -f "${KUEUE_DIR}/config/webhook/manifests.yaml" ]]; then
  kueue_src="$(cd "${root}/hack/kueue" && go list -m -f '{{.Dir}}' sigs.k8s.io/kueue)"
  mkdir -p "${KUEUE_DIR}/config/crd" "${KUEUE_DIR}/config/webhook"
  cp "${kueue_src}"/config/components/crd/bases/*.yaml "${KUEUE_DIR}/config/crd/"
  cp "${kueue_src}/config/components/webhook/manifests.yaml" "${KUEUE_DIR}/config/webhook/"
  chmod -R u+w "${KUEUE_DIR}/config"
  log "kueue: CRDs and webhook configurations copied to ${KUEUE_DIR}/config"
fi
# The kubelet is only for the real-pods rung; build it last.
build k8s-bins k8s.io/kubernetes/cmd/kubelet "${K8S_BIN_DIR}/kubelet" "${k8s_ldflags}"
# kube-proxy serves ClusterIP Services on the real-pods rung (e2e/); built after the kubelet.
build k8s-bins k8s.io/kubernetes/cmd/kube-proxy "${K8S_BIN_DIR}/kube-proxy" "${k8s_ldflags}"

total=$(( $(date +%s) - start_all ))
log "all binaries ready in ${total}s (built: ${built[*]:-none})"
"${K8S_BIN_DIR}/kube-apiserver" --version
"${ETCD_BIN_DIR}/etcd" --version | sed -n 1p
"${KWOK_BIN_DIR}/kwok" --version | sed -n 1p
"${HELM_BIN_DIR}/helm" version --short
echo "kueue ${KUEUE_VERSION} ($(du -h "${KUEUE_BIN_DIR}/kueue" | cut -f1))"

times_json() {
  printf '{"total_seconds": %d, "built": [' "${total}"
  local sep="" n
  for n in "${built[@]}"; do printf '%s{"name": "%s", "seconds": %d}' "${sep}" "${n}" "${seconds[${n}]}"; sep=", "; done
  printf '], "k8s": "%s", "etcd": "%s", "kwok": "%s", "helm": "%s", "kueue": "%s", "cpus": %d, "go": "%s", "date": "%s"}\n' \
    "${K8S_VERSION}" "${ETCD_VERSION}" "${KWOK_VERSION}" "${HELM_VERSION}" "${KUEUE_VERSION}" "$(nproc)" "$(go env GOVERSION)" \
    "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
}
mkdir -p "${KDISTILL_CACHE}"
times_json > "${KDISTILL_CACHE}/cluster-bins-last-run.json"
# A run that built something keeps its timings apart, so that a later no-op run
# does not overwrite the cold figures (scripts/cluster-bench.py reads them).
if (( ${#built[@]} > 0 )); then
  cp "${KDISTILL_CACHE}/cluster-bins-last-run.json" "${KDISTILL_CACHE}/cluster-bins-last-build.json"
fi
