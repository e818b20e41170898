#!/usr/bin/env bash
# Starts or stops a private dockerd for kdistill's image builds and image tests.
#
# The machines this project is built on have Debian's docker.io installed but no
# engine running (and no systemd), so this script runs dockerd in the background
# with its own socket and data root, leaving any other docker setup alone.
#
#   scripts/dockerd.sh start     # idempotent: prints the DOCKER_HOST to use
#   scripts/dockerd.sh stop      # idempotent
#   scripts/dockerd.sh status    # exit 0 when it answers
#   scripts/dockerd.sh env       # prints `export DOCKER_HOST=...` for eval
#
# Where the VM's capability bounding set lacks CAP_SYS_RESOURCE, `docker run
# --privileged` (which kind uses for its nodes) fails with "unable to apply caps".
# The daemon is then started with a runtime shim as default runtime that drops
# that one capability from the OCI bundle before calling runc.
set -euo pipefail

cache="${KDISTILL_CACHE:-${HOME}/.cache/kdistill}"
run_dir="${KDISTILL_DOCKER_RUN:-/run/kdistill-docker}"
sock="${run_dir}/docker.sock"
pidfile="${run_dir}/dockerd.pid"
data_root="${KDISTILL_DOCKER_DATA:-${cache}/docker}"
log="${run_dir}/dockerd.log"
export DOCKER_HOST="unix://${sock}"

answers() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

needs_caps_shim() {
  # Bit 24 of the bounding set is CAP_SYS_RESOURCE.
  local bnd
  bnd=$(awk '/^CapBnd:/ {print $2}' /proc/self/status)
  (( (16#${bnd} >> 24 & 1) == 0 ))
}

write_shim() {
  local shim="${run_dir}/runc-nosysresource"
  cat > "${shim}" <<'SHIM'
#!/usr/bin/env -S python3 -P
"""OCI runtime shim: removes CAP_SYS_RESOURCE, which this VM cannot grant, then runs runc."""
import json
import os
import sys

CAP = "CAP_SYS_RESOURCE"


def strip(process: dict) -> None:
    for kind in ("bounding", "effective", "inheritable", "permitted", "ambient"):
        caps = process.get("capabilities", {}).get(kind)
        if caps and CAP in caps:
            caps.remove(CAP)


def rewrite(path: str, is_process_file: bool) -> None:
    with open(path) as f:
        doc = json.load(f)
    strip(doc if is_process_file else doc.get("process", {}))
    with open(path, "w") as f:
        json.dump(doc, f)


args = sys.argv[1:]
cmd = next((a for a in args if a in ("create", "run", "exec")), None)
if cmd in ("create", "run"):
    bundle = "."
    for i, a in enumerate(args):
        if a in ("--bundle", "-b") and i + 1 < len(args):
            bundle = args[i + 1]
        elif a.startswith("--bundle="):
            bundle = a.split("=", 1)[1]
    cfg = os.path.join(bundle, "config.json")
    if os.path.exists(cfg):
        rewrite(cfg, False)
elif cmd == "exec":
    for i, a in enumerate(args):
        if a in ("--process", "-p") and i + 1 < len(args):
            rewrite(args[i + 1], True)
        elif a.startswith("--process="):
            rewrite(a.split("=", 1)[1], True)
os.execvp("runc", ["runc", *args])
SHIM
  chmod +x "${shim}"
  echo "${shim}"
}

start() {
  if answers; then
    echo "${DOCKER_HOST}"
    return 0
  fi
  command -v dockerd >/dev/null || {
    echo "dockerd.sh: dockerd is not installed; run: apt-get install -y docker.io" >&2
    exit 1
  }
  mkdir -p "${run_dir}" "${data_root}"
  rm -f "${sock}"
  local extra=()
  if needs_caps_shim; then
    extra+=(--add-runtime "nosysresource=$(write_shim)" --default-runtime nosysresource)
  fi
  # --exec-root keeps our containerd/runc state apart from any default daemon's.
  setsid dockerd --host "${DOCKER_HOST}" --data-root "${data_root}" \
    --exec-root "${run_dir}/exec" --pidfile "${pidfile}" "${extra[@]}" \
    >"${log}" 2>&1 < /dev/null &
  for _ in $(seq 1 60); do
    if answers; then
      echo "${DOCKER_HOST}"
      return 0
    fi
    sleep 0.5
  done
  echo "dockerd.sh: dockerd did not answer on ${sock} within 30 s; last log lines:" >&2
  tail -n 20 "${log}" >&2
  exit 1
}

stop() {
  [[ -f "${pidfile}" ]] || return 0
  local pid
  pid=$(cat "${pidfile}")
  if kill -0 "${pid}" 2>/dev/null; then
    kill "${pid}"
    for _ in $(seq 1 40); do
      kill -0 "${pid}" 2>/dev/null || break
      sleep 0.5
    done
  fi
  rm -f "${pidfile}"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) answers ;;
  env) echo "export DOCKER_HOST=${DOCKER_HOST}" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
