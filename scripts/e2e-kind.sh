#!/usr/bin/env bash
# make e2e-kind: kdistill on a kind cluster, end to end, as a user would run it:
#   1. create the cluster (e2e/kind/cluster.yaml: one control plane, two workers)
#   2. load the kdistill images into its nodes (built by scripts/images.sh if missing)
#   3. helm install the chart
#   4. prepare the quickstart data and apply the CPU example job (gpusPerNode: 0)
#   5. wait until the job is Succeeded
#   6. query the served student through `kubectl port-forward`
#
#   scripts/e2e-kind.sh                  # creates and, at the end, deletes the kind cluster
#   scripts/e2e-kind.sh --keep           # leaves the cluster running
#   KUBECONFIG=... scripts/e2e-kind.sh --existing [--nodes "n1 n2"] [--hostpath-pv DIR]
#       steps 3-6 on a cluster that already runs (the local real-pods cluster of
#       `make e2e-cluster`, for one); with --nodes, images are loaded into those node
#       containers with `ctr import` first (skipped where that image ID was loaded before).
#       A cluster without a default StorageClass (the local one) needs --hostpath-pv: a
#       folder that every node mounts at the same path (the local cluster's
#       ~/.cache/kdistill/e2e/shared); the quickstart claim gets a hostPath PV there.
#
#   The local cluster, from a second shell:
#     make e2e-cluster                   # prints KUBECONFIG=...
#     KUBECONFIG=... scripts/e2e-kind.sh --existing --nodes "kdistill-e2e-node1 kdistill-e2e-node2" \
#       --hostpath-pv ~/.cache/kdistill/e2e/shared
#
# Needs docker, kind (KIND, or built from the Go proxy into ~/.cache/kdistill), kubectl and
# helm (scripts/cluster-bins.sh). KIND_NODE_IMAGE picks the node image (default: kind's own).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${KDISTILL_CACHE:-${HOME}/.cache/kdistill}"
kind_version="${KIND_VERSION:-v0.30.0}"
cluster_name="${KIND_CLUSTER_NAME:-kdistill}"
namespace="${E2E_NAMESPACE:-default}"
job="quickstart-cpu"
version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "${root}/kdistill/__init__.py" | head -n1)"
operator_image="kdistill/operator:${version}"
trainer_image="kdistill/trainer:${version}"
mode=kind
keep=0
load_nodes=""
hostpath_dir=""
while (( $# )); do
  case "$1" in
    --existing) mode=existing ;;
    --keep) keep=1 ;;
    --nodes) load_nodes="$2"; shift ;;
    --hostpath-pv) hostpath_dir="$2"; shift ;;
    *) echo "usage: $0 [--keep] | --existing [--nodes \"NODE...\"] [--hostpath-pv DIR]" >&2; exit 2 ;;
  esac
  shift
done

started=$(date +%s)
cleanups=()
cleanup() { local c; for c in "${cleanups[@]}"; do eval "${c}" || true; done; }
trap cleanup EXIT
log() { printf '[e2e-kind %(%H:%M:%S)T +%4ss] %s\n' -1 "$(( $(date +%s) - started ))" "$*" >&2; }

bins="$("${root}/scripts/cluster-bins.sh" --print)"
kubectl_dir="$(sed -n 1p <<<"${bins}")"
helm_dir="$(sed -n 4p <<<"${bins}")"
export PATH="${kubectl_dir}:${helm_dir}:${PATH}"
command -v kubectl >/dev/null && command -v helm >/dev/null \
  || { echo "e2e-kind: kubectl/helm missing: run scripts/cluster-bins.sh" >&2; exit 1; }

if [[ -z "${DOCKER_HOST:-}" ]] || ! docker version >/dev/null 2>&1; then
  DOCKER_HOST="$("${root}/scripts/dockerd.sh" start)"
  export DOCKER_HOST
fi
for image in "${operator_image}" "${trainer_image}"; do
  docker image inspect "${image}" >/dev/null 2>&1 || "${root}/scripts/images.sh" "$(cut -d/ -f2 <<<"${image%%:*}")"
done

# -- 1-2: the cluster and its images ----------------------------------------------------------
if [[ "${mode}" == kind ]]; then
  kind="${KIND:-$(command -v kind || true)}"
  if [[ -z "${kind}" ]]; then
    kind="${cache}/kind-${kind_version}/bin/kind"
    if [[ ! -x "${kind}" ]]; then
      log "building kind ${kind_version} from the Go module proxy"
      GOBIN="$(dirname "${kind}")" go install "sigs.k8s.io/kind@${kind_version}"
    fi
  fi
  node_image_args=()
  [[ -n "${KIND_NODE_IMAGE:-}" ]] && node_image_args=(--image "${KIND_NODE_IMAGE}")
  export KUBECONFIG="${cache}/kind-${cluster_name}.kubeconfig"
  if [[ "${keep}" == 0 ]]; then
    cleanups+=('"${kind}" delete cluster --name "${cluster_name}" >/dev/null 2>&1')
  fi
  log "creating kind cluster ${cluster_name}"
  "${kind}" create cluster --name "${cluster_name}" --config "${root}/e2e/kind/cluster.yaml" \
    --kubeconfig "${KUBECONFIG}" --wait 180s "${node_image_args[@]}"
  for image in "${operator_image}" "${trainer_image}"; do
    log "loading ${image}"
    "${kind}" load docker-image --name "${cluster_name}" "${image}"
  done
else
  [[ -n "${KUBECONFIG:-}" ]] || { echo "e2e-kind: --existing needs KUBECONFIG" >&2; exit 2; }
  if [[ -n "${load_nodes}" ]]; then
    scratch="$(mktemp -d)"
    cleanups+=('rm -rf "${scratch}"')
    # One empty file per docker image ID imported, on the node's containerd volume: the same
    # markers e2e/cluster/nodes.py keeps, so a multi-GB image is imported once per node.
    markers=/var/lib/containerd/kdistill-loaded
    for image in "${operator_image}" "${trainer_image}"; do
      id="$(docker image inspect -f '{{.Id}}' "${image}")"
      marker="${markers}/${id/:/-}"
      todo=()
      for node in ${load_nodes}; do
        docker exec "${node}" test -e "${marker}" || todo+=("${node}")
      done
      if (( ${#todo[@]} == 0 )); then
        log "${image}: already loaded in ${load_nodes}"
        continue
      fi
      log "loading ${image} into: ${todo[*]}"
      docker save -o "${scratch}/image.tar" "${image}"
      for node in "${todo[@]}"; do
        docker exec -i "${node}" ctr -n k8s.io images import --all-platforms - < "${scratch}/image.tar" >/dev/null
        docker exec "${node}" sh -c "mkdir -p ${markers} && touch ${marker}"
      done
      rm -f "${scratch}/image.tar"
    done
  fi
fi
kubectl get nodes -o wide

# -- 3: helm install --------------------------------------------------------------------------------
log "helm install kdistill"
helm upgrade --install kdistill "${root}/charts/kdistill" --namespace kdistill-system --create-namespace \
  --set image.pullPolicy=IfNotPresent --wait --timeout 5m
kubectl -n kdistill-system rollout status deployment/kdistill-operator --timeout=120s

# -- 4: data and the CPU job ---------------------------------------------------------------------
default_sc="$(kubectl get storageclass -o jsonpath='{range .items[?(@.metadata.annotations.storageclass\.kubernetes\.io/is-default-class=="true")]}{.metadata.name}{end}')"
if [[ -n "${hostpath_dir}" ]]; then
  # A PV bound to the example's claim ahead of time (claimRef), on a folder every node mounts.
  # With no default StorageClass the claim names no class, and binds a class-less PV.
  # hostPath volumes get no fsGroup ownership, so the folder is writable by all, like /tmp.
  pv_dir="${hostpath_dir}/${namespace}-quickstart"
  pv_phase="$(kubectl get pv "${namespace}-quickstart" -o jsonpath='{.status.phase}' 2>/dev/null || true)"
  if [[ "${pv_phase}" == Released ]]; then
    kubectl delete pv "${namespace}-quickstart" --wait=true
    pv_phase=""
  fi
  # A new PV starts empty: an old run's checkpoints would make the job resume, not train.
  [[ -n "${pv_phase}" ]] || rm -rf "${pv_dir}"
  mkdir -p "${pv_dir}"
  chmod 1777 "${pv_dir}"
  log "quickstart claim: hostPath PV on ${pv_dir}"
  kubectl apply -f - <<YAML
apiVersion: v1
kind: PersistentVolume
metadata: {name: ${namespace}-quickstart}
spec:
  capacity: {storage: 2Gi}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  hostPath: {path: "${pv_dir}", type: Directory}
  claimRef: {namespace: ${namespace}, name: quickstart}
YAML
elif [[ -z "${default_sc}" ]]; then
  echo "e2e-kind: the cluster has no default StorageClass for the quickstart claim; pass" \
    "--hostpath-pv DIR (a folder every node mounts at the same path)" >&2
  exit 2
fi
log "preparing the quickstart data (a small teacher trained on Python's docs)"
kubectl -n "${namespace}" apply -f "${root}/manifests/examples/quickstart-data.yaml"
kubectl -n "${namespace}" wait --for=condition=complete job/quickstart-data --timeout=30m
log "applying ${job}"
kubectl -n "${namespace}" apply -f "${root}/manifests/examples/cpu-quickstart.yaml"

# -- 5: Succeeded ----------------------------------------------------------------------------------
deadline=$(( $(date +%s) + ${E2E_JOB_TIMEOUT:-3600} ))
last=""
while :; do
  row="$(kubectl -n "${namespace}" get dj "${job}" --no-headers 2>/dev/null || true)"
  # Logged when something other than the AGE column changed.
  [[ "${row% *}" != "${last% *}" ]] && { log "${row}"; last="${row}"; }
  phase="$(kubectl -n "${namespace}" get dj "${job}" -o jsonpath='{.status.phase}' 2>/dev/null || true)"
  [[ "${phase}" == Succeeded ]] && break
  if [[ "${phase}" == Failed ]] || (( $(date +%s) > deadline )); then
    kubectl -n "${namespace}" get dj "${job}" -o yaml >&2 || true
    kubectl -n "${namespace}" get pods -o wide >&2 || true
    echo "e2e-kind: ${job} ended ${phase:-without a phase}" >&2
    exit 1
  fi
  sleep 5
done
endpoint="$(kubectl -n "${namespace}" get dj "${job}" -o jsonpath='{.status.endpoint}')"
log "${job} Succeeded; endpoint ${endpoint}"

# -- 6: the endpoint, through port-forward ---------------------------------------------------------
port="${E2E_LOCAL_PORT:-18080}"
kubectl -n "${namespace}" port-forward "svc/${job}-serving" "${port}:8080" >/dev/null 2>&1 &
forward=$!
cleanups=('kill "${forward}" 2>/dev/null' "${cleanups[@]}")
for _ in $(seq 1 60); do
  curl -fsS "http://127.0.0.1:${port}/v2/health/ready" >/dev/null 2>&1 && break
  sleep 1
done
answer="$(curl -fsS "http://127.0.0.1:${port}/v1/completions" -H 'content-type: application/json' \
  -d '{"prompt": "The for statement", "max_tokens": 16}')"
kill "${forward}" 2>/dev/null || true
python3 -P -c 'import json,sys; body=json.loads(sys.argv[1]); print("completion:", repr(body["choices"][0]["text"]))' "${answer}"
log "done in $(( $(date +%s) - started ))s"
