# shellcheck shell=bash
# Where the control-plane binaries live. Sourced by cluster-bins.sh; the Python
# harness (tests/cluster/binaries.py) applies the same rules. The versions are
# read from the pinned Go modules under hack/, so go.mod is the only place that
# names them.
#
#   source scripts/cluster-env.sh   # sets K8S_VERSION ... and *_BIN_DIR

_kd_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Prints the version that hack/<dir>/go.mod requires of <module>.
_kd_mod_version() {
  awk -v m="$2" '($1 == m || ($1 == "require" && $2 == m)) && $NF ~ /^v[0-9]/ {print $NF; exit}' \
    "${_kd_root}/hack/$1/go.mod"
}

KDISTILL_CACHE="${KDISTILL_CACHE:-${HOME}/.cache/kdistill}"
K8S_VERSION="$(_kd_mod_version k8s-bins k8s.io/kubernetes)"
ETCD_VERSION="$(_kd_mod_version etcd go.etcd.io/etcd/server/v3)"
KWOK_VERSION="$(_kd_mod_version kwok sigs.k8s.io/kwok)"
HELM_VERSION="$(_kd_mod_version helm helm.sh/helm/v3)"
KUEUE_VERSION="$(_kd_mod_version kueue sigs.k8s.io/kueue)"

K8S_BIN_DIR="${KDISTILL_CACHE}/k8s-${K8S_VERSION}/bin"
ETCD_BIN_DIR="${KDISTILL_CACHE}/etcd-${ETCD_VERSION}/bin"
KWOK_BIN_DIR="${KDISTILL_CACHE}/kwok-${KWOK_VERSION}/bin"
# helm carries the Kubernetes version it renders for (.Capabilities.KubeVersion, lint's
# deprecation checks) in its ldflags: a new K8S_VERSION means a new helm build.
HELM_BIN_DIR="${KDISTILL_CACHE}/helm-${HELM_VERSION}-k8s-${K8S_VERSION}/bin"

# Kueue: its binary in bin/, and in config/ the CRDs and webhook configurations copied from the
# module's config/components (the rung-3 harness, tests/cluster/kueue.py, installs them).
KUEUE_DIR="${KDISTILL_CACHE}/kueue-${KUEUE_VERSION}"
KUEUE_BIN_DIR="${KUEUE_DIR}/bin"

export KDISTILL_CACHE K8S_VERSION ETCD_VERSION KWOK_VERSION HELM_VERSION KUEUE_VERSION
export K8S_BIN_DIR ETCD_BIN_DIR KWOK_BIN_DIR HELM_BIN_DIR KUEUE_DIR KUEUE_BIN_DIR
