#!/usr/bin/env bash
# Builds kdistill's container images with docker (`make images`), starting a private
# dockerd if none answers (scripts/dockerd.sh) and building the local Python base image
# when BASE_IMAGE is not given (scripts/build-base-image.sh).
#
#   scripts/images.sh                    # both images
#   scripts/images.sh operator           # only one
#   BASE_IMAGE=python:3.11-slim-bookworm scripts/images.sh   # where a registry is reachable
#   TORCH_SPEC='torch==2.15.*+cpu' PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu \
#     scripts/images.sh trainer       # a CPU-only trainer, where that index is reachable
#
# Tags: kdistill/operator:VERSION and kdistill/trainer:VERSION (VERSION from kdistill/__init__.py,
# or IMAGE_TAG). Sizes and build times go to ${KDISTILL_CACHE}/images-last-build.json, and with
# RECORD_RESULTS=1 also to benchmarks/results/images.json (committed; docs/install.md cites it):
#   RECORD_RESULTS=1 make images
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${KDISTILL_CACHE:-${HOME}/.cache/kdistill}"
version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "${root}/kdistill/__init__.py" | head -n1)"
tag="${IMAGE_TAG:-${version}}"
registry="${IMAGE_REPOSITORY_PREFIX:-kdistill}"
targets=("$@")
(( ${#targets[@]} )) || targets=(operator trainer)

log() { printf '[images %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
# A step that fails under `set -e` says which one it was (a silent exit leaves only the last log line).
trap 'log "failed (exit $?) at line ${LINENO}: ${BASH_COMMAND}"' ERR

if [[ -z "${DOCKER_HOST:-}" ]] || ! docker version >/dev/null 2>&1; then
  DOCKER_HOST="$("${root}/scripts/dockerd.sh" start)"
  export DOCKER_HOST
fi
# The classic builder: it needs no buildx plugin and no registry for its frontend.
export DOCKER_BUILDKIT=0

base="${BASE_IMAGE:-}"
if [[ -z "${base}" ]]; then
  base="$("${root}/scripts/build-base-image.sh")"
fi

# A small build context: only what the images install (the repo holds venvs and outputs).
ctx="$(mktemp -d "${TMPDIR:-/tmp}/kdistill-image-context.XXXXXX")"
trap 'rm -rf "${ctx}"' EXIT
(cd "${root}" && tar --exclude='__pycache__' --exclude='*.pyc' -cf - \
  pyproject.toml README.md kdistill api operator trainer serving cli docker) | tar -C "${ctx}" -xf -
# Behind a TLS-inspecting proxy pip needs the host's CA bundle; it stays in the build stage.
ca="${PIP_CERT:-${REQUESTS_CA_BUNDLE:-}}"
if [[ -n "${ca}" && -f "${ca}" ]]; then
  cp "${ca}" "${ctx}/pip-ca.crt"
fi

results=()
for target in "${targets[@]}"; do
  case "${target}" in
    operator|trainer) ;;
    *) echo "images.sh: unknown image '${target}' (operator | trainer)" >&2; exit 2 ;;
  esac
  image="${registry}/${target}:${tag}"
  log "building ${image} from ${base}"
  t0=$(date +%s)
  build_args=(--network host -f "${ctx}/docker/${target}.Dockerfile" --build-arg "BASE_IMAGE=${base}"
    --build-arg "TORCH_SPEC=${TORCH_SPEC:-}" --build-arg "PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL:-}")
  # The dependency stage gets a tag of its own: `docker image prune` then never drops the
  # multi-GB pip layer that later builds reuse (an untagged build stage counts as dangling).
  docker build "${build_args[@]}" --target build -t "${registry}/${target}-deps:${tag}" "${ctx}" >&2
  docker build "${build_args[@]}" -t "${image}" "${ctx}" >&2
  seconds=$(( $(date +%s) - t0 ))
  bytes=$(docker image inspect -f '{{.Size}}' "${image}")
  log "${image}: $(awk -v b="${bytes}" 'BEGIN {printf "%.0f MB", b/1e6}') in ${seconds}s"
  results+=("{\"image\": \"${image}\", \"bytes\": ${bytes}, \"build_seconds\": ${seconds}, \"base\": \"${base}\", \"torch_spec\": \"${TORCH_SPEC:-}\"}")
done

mkdir -p "${cache}"
(IFS=,; printf '[%s]\n' "${results[*]}") > "${ctx}/results.json"
# Merge with the last results, so that building one image keeps the other's figures.
python3 -P - "${ctx}/results.json" "${cache}/images-last-build.json" <<'PY'
import json
import pathlib
import sys

new = json.loads(pathlib.Path(sys.argv[1]).read_text())
path = pathlib.Path(sys.argv[2])
old = json.loads(path.read_text()) if path.exists() else []
names = {r["image"] for r in new}
merged = [r for r in old if r["image"] not in names] + new
path.write_text(json.dumps(merged, indent=1) + "\n")
print(f"{'IMAGE':<34} {'SIZE_MB':>10} {'BUILD_S':>8}")
for r in merged:
    print(f"{r['image']:<34} {r['bytes'] / 1e6:>10.0f} {r['build_seconds']:>8}")
PY
if [[ "${RECORD_RESULTS:-}" == 1 ]]; then
  python3 -P - "${cache}/images-last-build.json" "${root}/benchmarks/results/images.json" <<'PY'
import json
import os
import pathlib
import sys

report = {
    "command": "RECORD_RESULTS=1 make images",
    "cpus": os.cpu_count(),
    "load_average_at_end": list(os.getloadavg()),
    "images": json.loads(pathlib.Path(sys.argv[1]).read_text()),
}
pathlib.Path(sys.argv[2]).write_text(json.dumps(report, indent=2) + "\n")
PY
fi
